//! A broker of a test's own, on storage of its own: restarting, freezing or
//! reconfiguring it disturbs no other test.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers;

/// The broker's program (`TEST_TANSU` names another).
pub fn tansu() -> Command {
    Command::new(std::env::var("TEST_TANSU").unwrap_or_else(|_| "tansu".into()))
}

/// tansu 0.6.0's storage, its messages deleted.
const LOSE_MESSAGES: &str =
    "DELETE FROM header; DELETE FROM record; UPDATE watermark SET low = 0, high = 0;";
/// tansu 0.6.0's storage, its groups (members and committed offsets) deleted.
const LOSE_GROUPS: &str =
    "DELETE FROM consumer_offset; DELETE FROM consumer_group_detail; DELETE FROM consumer_group;";

pub struct Broker {
    child: Child,
    dir: PathBuf,
    pub port: u16,
}

impl Broker {
    /// Sends `name` (`STOP`, `CONT`) to the broker's process.
    pub fn signal(&self, name: &str) {
        helpers::signal(&self.child, name);
    }

    pub fn start(dir: PathBuf, port: u16) -> Self {
        Self::start_with_storage(dir, port, "sqlite://tansu.db")
    }

    pub fn start_with_storage(dir: PathBuf, port: u16, storage: &str) -> Self {
        Self::start_with_args(dir, port, storage, &[])
    }

    /// Started with broker arguments of the test's own (`--authentication`).
    pub fn start_with_args(dir: PathBuf, port: u16, storage: &str, args: &[&str]) -> Self {
        Self::launch(dir, port, port, storage, args)
    }

    /// Listening on `port`, and telling clients to connect to `advertised`.
    fn launch(dir: PathBuf, port: u16, advertised: u16, storage: &str, args: &[&str]) -> Self {
        let listener = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{advertised}");
        let child = tansu()
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", storage])
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu (TEST_TANSU names the binary)");
        helpers::wait_listening(port, Duration::from_secs(30), || {
            "the broker never listened".into()
        });
        Self { child, dir, port }
    }

    pub fn restart(mut self, down_for: Duration) -> Self {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down_for);
        Self::start(std::mem::take(&mut self.dir), self.port)
    }

    /// Restarts the broker on the same storage with other arguments.
    pub fn restart_with_args(mut self, args: &[&str]) -> Self {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::take(&mut self.dir);
        Self::start_with_args(dir, self.port, "sqlite://tansu.db", args)
    }

    /// Restarts the broker on the same storage, telling clients to connect
    /// to `advertised` (a proxy in front of it) instead.
    pub fn restart_advertising(mut self, advertised: u16) -> Self {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::take(&mut self.dir);
        Self::launch(dir, self.port, advertised, "sqlite://tansu.db", &[])
    }

    /// Restarts the broker as `scripts/stack up` does: with its groups'
    /// membership forgotten while it is stopped.
    pub fn restart_forgetting_groups(self) -> Self {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/broker-forget-groups.sql");
        self.restart_after_sql(&std::fs::read_to_string(&file).unwrap())
    }

    /// Restarts the broker with every message of every topic gone, as after
    /// a storage restored from an empty backup; its topics and groups stay.
    pub fn restart_losing_messages(self) -> Self {
        self.restart_after_sql(LOSE_MESSAGES)
    }

    /// Restarts the broker with every message and every group (members and
    /// committed offsets) gone, as after its storage was lost and the topics
    /// made again, except that they keep their ids: a consumer fetching by an
    /// id this broker does not know is killed inside librdkafka (the README's
    /// local-broker section).
    pub fn restart_losing_messages_and_groups(self) -> Self {
        self.restart_after_sql(&format!("{LOSE_MESSAGES} {LOSE_GROUPS}"))
    }

    /// [`Self::restart_losing_messages_and_groups`], its producers' state
    /// (their ids and sequences) lost too.
    pub fn restart_losing_all_but_the_topics(self) -> Self {
        self.restart_after_sql(&format!(
            "{LOSE_MESSAGES} {LOSE_GROUPS} \
             DELETE FROM producer_detail; DELETE FROM producer_epoch; DELETE FROM producer;"
        ))
    }

    /// Restarts the broker after running `sql` on its storage while it is stopped.
    fn restart_after_sql(mut self, sql: &str) -> Self {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut sqlite = Command::new("sqlite3")
            .arg(self.dir.join("tansu.db"))
            .stdin(Stdio::piped())
            .spawn()
            .expect("sqlite3 (scripts/stack test installs it)");
        let mut input = sqlite.stdin.take().unwrap();
        input.write_all(sql.as_bytes()).unwrap();
        drop(input);
        let status = sqlite.wait().unwrap();
        assert!(status.success(), "{sql}: {status:?}");
        Self::start(std::mem::take(&mut self.dir), self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
