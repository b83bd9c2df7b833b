//! A PostgreSQL server of a test's own, from the binaries of the one the
//! stack installed, so that a test may crash and restart it without
//! disturbing the tests that share the suite's server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

pub struct PostgresServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// `postgres` when the test runs as root, which PostgreSQL refuses to run as.
    run_as: Option<&'static str>,
}

impl PostgresServer {
    /// Initialises a cluster (trust authentication, 127.0.0.1 only) on a free
    /// port, starts it, and creates the roles the suite's server has: the
    /// owner role and the service role, both named as there.
    pub async fn start() -> Self {
        let dir = owned_temp_dir("pg");
        std::fs::create_dir_all(&dir).unwrap();
        let run_as = is_root().then_some("postgres");
        if let Some(user) = run_as {
            let (uid, gid) = (id(&["-u", user]), id(&["-g", user]));
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let server = Self {
            bin: bindir(),
            dir,
            port,
            run_as,
        };
        let data = server.dir.display().to_string();
        server.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        server.start_again();

        let owner = admin_role();
        let service = std::env::var("TEST_SERVICE_ROLE").unwrap_or("order_service".into());
        let mut template1 = server
            .options("postgres")
            .database("template1")
            .connect()
            .await
            .expect("connect to the test's own server");
        for statement in [
            format!("CREATE ROLE {owner} LOGIN CREATEDB"),
            format!("CREATE ROLE {service} LOGIN"),
            // As PostgreSQL 15 makes it for every new database, on any version.
            format!("ALTER SCHEMA public OWNER TO {owner}"),
        ] {
            sqlx::query(&statement)
                .execute(&mut template1)
                .await
                .unwrap();
        }
        template1.close().await.unwrap();
        // The template the suite names before PostgreSQL 15, made the same way.
        let template = std::env::var("TEST_DATABASE_TEMPLATE").unwrap_or("template1".into());
        if template != "template1" {
            let mut conn = server.options("postgres").connect().await.unwrap();
            sqlx::query(&format!(
                "CREATE DATABASE {template} TEMPLATE template1 IS_TEMPLATE true"
            ))
            .execute(&mut conn)
            .await
            .unwrap();
        }
        server
    }

    /// The owner role's connection, as `TEST_DATABASE_URL` gives the suite's.
    pub fn admin(&self) -> PgConnectOptions {
        self.options(&admin_role())
    }

    /// A tablespace `name` on a disk of its own that holds `bytes`, owned by
    /// the server's user, so that a test can fill the disk under the tables
    /// it moves there and free space again.
    pub async fn tablespace_on_small_disk(&self, name: &str, bytes: u64) -> SmallDisk {
        let disk = SmallDisk::mount(bytes, self.run_as);
        let mut conn = self.options("postgres").connect().await.unwrap();
        let location = disk.path.display();
        sqlx::query(&format!("CREATE TABLESPACE {name} LOCATION '{location}'"))
            .execute(&mut conn)
            .await
            .unwrap();
        disk
    }

    /// Turns TLS on with this certificate and key (kept in the data
    /// directory, readable by the server's user alone), without a restart.
    pub async fn enable_tls(&self, cert: &Path, key: &Path) {
        let (uid, gid) = match self.run_as {
            Some(user) => (Some(id(&["-u", user])), Some(id(&["-g", user]))),
            None => (None, None),
        };
        for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
            let to = self.dir.join(name);
            std::fs::copy(from, &to).unwrap();
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            std::os::unix::fs::chown(&to, uid, gid).unwrap();
        }
        let mut conn = self.options("postgres").connect().await.unwrap();
        for statement in ["ALTER SYSTEM SET ssl = on", "SELECT pg_reload_conf()"] {
            sqlx::query(statement).execute(&mut conn).await.unwrap();
        }
    }

    /// A superuser's connection to `database`.
    pub fn superuser(&self, database: &str) -> PgConnectOptions {
        self.options("postgres").database(database)
    }

    fn options(&self, user: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username(user)
            .database("postgres")
    }

    /// Stops the server as a crash does: no checkpoint, sessions cut, and
    /// recovery from the write-ahead log at the next start.
    pub fn crash(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    }

    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        self.pg_ctl(&["start", "-w", "-l", &log, "-o", &options]);
    }

    /// Sends `name` (`STOP`, `CONT`) to the server and to every process it
    /// started, one per session: stopped, it answers nothing and closes
    /// nothing, as on a paused VM. The server first, so that it starts no
    /// session the signal would miss.
    pub fn signal(&self, name: &str) {
        assert!(
            self.try_signal(name),
            "kill -{name}: the server is not running"
        );
    }

    /// [`PostgresServer::signal`]; false if the server is not running.
    fn try_signal(&self, name: &str) -> bool {
        let Ok(pid_file) = std::fs::read_to_string(self.dir.join("postmaster.pid")) else {
            return false;
        };
        let pid = pid_file.lines().next().unwrap_or_default().trim();
        let flag = format!("-{name}");
        let sent = Command::new("kill")
            .args([&flag, pid])
            .status()
            .is_ok_and(|s| s.success());
        // pkill exits 1 when the server has no session to signal.
        let _ = Command::new("pkill").args([&flag, "-P", pid]).status();
        sent
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.display().to_string();
        let mut all = vec!["-D", data.as_str()];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all);
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?}: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        command.current_dir(&self.dir);
        command
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // A stopped server would not act on pg_ctl's signal.
        self.try_signal("CONT");
        let data = self.dir.display().to_string();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "stop", "-m", "immediate", "-w"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A tmpfs mounted for a tablespace or a broker's storage; unmounted when
/// dropped (before the server that uses it, which stops at once and is
/// removed).
pub struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// A disk that holds `bytes`, owned by `user` (by default the tests' own).
    pub fn mount(bytes: u64, user: Option<&str>) -> Self {
        let path = owned_temp_dir("disk");
        std::fs::create_dir_all(&path).unwrap();
        let (uid, gid) = match user {
            Some(user) => (id(&["-u", user]), id(&["-g", user])),
            None => (id(&["-u"]), id(&["-g"])),
        };
        let options = format!("size={bytes},uid={uid},gid={gid},mode=0700");
        privileged("mount", &["-t", "tmpfs", "-o", &options, "tmpfs"], &path);
        SmallDisk { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Shrinks the disk to what it holds: the next page a table needs is
    /// refused with ENOSPC, as on a full disk. (A shrink below what the disk
    /// holds is refused; the server may write between the reading and the
    /// shrink, so it reads again.)
    pub fn fill(&self) {
        for _ in 0..50 {
            let output = Command::new("df")
                .args(["--output=used", "-B1"])
                .arg(&self.path)
                .output()
                .expect("df");
            let used: u64 = String::from_utf8_lossy(&output.stdout)
                .lines()
                .nth(1)
                .and_then(|line| line.trim().parse().ok())
                .expect("df prints the bytes used");
            let options = format!("remount,size={}", used.max(4096));
            let shrunk = as_root("mount")
                .args(["-o", &options])
                .arg(&self.path)
                .output()
                .is_ok_and(|o| o.status.success());
            if shrunk {
                return;
            }
        }
        panic!("{} never shrank to what it holds", self.path.display());
    }

    pub fn resize(&self, bytes: u64) {
        let options = format!("remount,size={bytes}");
        privileged("mount", &["-o", &options], &self.path);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Never panics here: a drop may run while a failed test unwinds.
        let _ = as_root("umount").arg("-l").arg(&self.path).output();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A new path for a `kind` of thing the test makes, named after the test's
/// process: `scripts/stack` removes those whose process is gone (a run
/// killed mid-test cannot drop them).
fn owned_temp_dir(kind: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "order-service-{kind}-{}-{}",
        std::process::id(),
        crate::helpers::unique_suffix()
    ))
}

/// `program` run as root: directly when the tests run as root, else through
/// `sudo -n` (a sudo user's run; it must not ask for a password).
fn as_root(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", program]);
        c
    }
}

fn privileged(program: &str, args: &[&str], path: &Path) {
    let output = as_root(program)
        .args(args)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn admin_role() -> String {
    let url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or("postgres://order_owner:order_owner_local@127.0.0.1:5432/postgres".into());
    PgConnectOptions::from_str(&url)
        .expect("TEST_DATABASE_URL is a PostgreSQL URL")
        .get_username()
        .to_owned()
}

/// The server binaries: `TEST_POSTGRES_BINDIR`, else those of the newest
/// PostgreSQL installed the Debian way (as `scripts/stack` installs it).
fn bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("TEST_POSTGRES_BINDIR") {
        return PathBuf::from(dir);
    }
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|version| root.join(version.to_string()).join("bin/initdb").exists())
        .max()
        .expect("PostgreSQL's server binaries (initdb, pg_ctl) under /usr/lib/postgresql/<version>/bin, or TEST_POSTGRES_BINDIR");
    root.join(newest.to_string()).join("bin")
}

pub fn is_root() -> bool {
    id(&["-u"]) == 0
}

fn id(args: &[&str]) -> u32 {
    let output = Command::new("id").args(args).output().expect("id");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("a numeric id")
}
