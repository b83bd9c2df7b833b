//! The service behind a connection pooler, as many deployments reach
//! PostgreSQL: PgBouncer in session pooling, which refuses any startup
//! parameter it does not know. Every path of the write (`COPY`, the staging
//! tables of a batch with a conflict, the dead-letter record) and the reads
//! work through it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{admin, free_port, sample_with_uid, TestEnv};
use crate::postgres_server::is_root;

struct Pgbouncer {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Pgbouncer {
    /// Session pooling in front of the suite's server, for `role` with `password`.
    fn start(role: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let server = admin();
        let config = format!(
            "[databases]\n* = host={} port={}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = plain\nauth_file = {}\npool_mode = session\n",
            server.get_host(),
            server.get_port(),
            dir.path().join("users.txt").display(),
        );
        std::fs::write(dir.path().join("pgbouncer.ini"), config).unwrap();
        std::fs::write(
            dir.path().join("users.txt"),
            format!("\"{role}\" \"{password}\"\n"),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("pgbouncer.log")).unwrap();
        let mut command =
            Command::new(std::env::var("TEST_PGBOUNCER").unwrap_or("pgbouncer".into()));
        // It refuses to run as root; it reads its files before it switches.
        if is_root() {
            command.args(["-u", "nobody"]);
        }
        let child = command
            .arg(dir.path().join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start pgbouncer (scripts/stack test installs it; TEST_PGBOUNCER names it)");
        let bouncer = Self { child, dir, port };
        crate::helpers::wait_listening(port, Duration::from_secs(10), || {
            format!("pgbouncer never listened: {}", bouncer.log())
        });
        bouncer
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_service_works_behind_pgbouncer() {
    let env = TestEnv::new().await;
    let mut url = url::Url::parse(&env.service_url).unwrap();
    let password = url.password().unwrap_or_default().to_owned();
    let bouncer = Pgbouncer::start(url.username(), &password);
    url.set_port(Some(bouncer.port)).unwrap();
    let service = env.spawn_with(&[("DATABASE_URL", url.as_str())]);
    service.wait_ready().await;

    let first = sample_with_uid("pooled-1").to_string();
    let second = sample_with_uid("pooled-2").to_string();
    env.produce(&[
        (Some("pooled-1"), first.as_bytes()),
        (Some("pooled-2"), second.as_bytes()),
    ])
    .await;
    service
        .wait_for_order("pooled-2", Duration::from_secs(30))
        .await;
    // A redelivery and an order that reuses an id with other content: the
    // batch's `COPY` is refused and it goes through the staging tables.
    let mut conflicting = sample_with_uid("pooled-1");
    conflicting["delivery"]["name"] = json!("Another Name");
    let conflicting = conflicting.to_string();
    env.produce(&[
        (Some("pooled-1"), first.as_bytes()),
        (Some("pooled-1"), conflicting.as_bytes()),
        (Some("broken"), b"{\"order_uid\": \"broken\""),
    ])
    .await;
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters",
        2,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 2);

    let orders: Value = service.get("/api/orders").await.json().await.unwrap();
    assert_eq!(orders["orders"].as_array().unwrap().len(), 2, "{orders}");
    let letters: Value = service.get("/api/dead-letters").await.json().await.unwrap();
    let mut stages: Vec<&str> = letters["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["stage"].as_str().unwrap())
        .collect();
    stages.sort_unstable();
    assert_eq!(stages, ["conflict", "parse"], "{letters}");
    assert_eq!(service.metric("ingest_consumer_paused").await, 0.0);
    assert!(
        !bouncer.log().contains("unsupported startup parameter"),
        "{}",
        bouncer.log()
    );
}
