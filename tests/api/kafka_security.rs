//! Brokers reached over TLS or asking clients to sign in: every Kafka client
//! of the service (consumer, dead-letter producer and reader, `produce`) uses
//! the `KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_*` and `KAFKA_SSL_*` settings,
//! and wrong credentials or an untrusted broker are environment faults: named,
//! nothing stored or dead-lettered, no message skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::broker::{tansu, Broker};
use crate::helpers::{free_port, sample_with_uid, TestEnv};

/// Three valid orders and one invalid message, produced to `env`'s topic.
async fn produce_some(env: &TestEnv, prefix: &str) {
    let orders: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            let uid = format!("{prefix}-{i}");
            let body = sample_with_uid(&uid).to_string().into_bytes();
            (uid, body)
        })
        .collect();
    let mut messages: Vec<(Option<&str>, &[u8])> = orders
        .iter()
        .map(|(uid, body)| (Some(uid.as_str()), body.as_slice()))
        .collect();
    messages.push((None, b"{\"order_uid\":\"not-an-order\"}"));
    env.produce(&messages).await;
}

/// Waits until the three orders and the one dead letter of [`produce_some`]
/// are in PostgreSQL. A letter's record is written only once the broker
/// acknowledged the letter, so this proves the dead-letter producer too.
async fn wait_for_all(env: &TestEnv) {
    env.wait_for_count("SELECT count(*) FROM orders", 3, Duration::from_secs(60))
        .await;
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters",
        1,
        Duration::from_secs(60),
    )
    .await;
}

/// Nothing stored and nothing dead-lettered: the service waits.
async fn assert_nothing_taken(env: &TestEnv) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
}

const USER: &str = "order-service";
const PASSWORD: &str = "s3cret-Pa55";

/// The settings that sign in as `USER` with `password`.
fn sign_in(password: &str) -> [(&'static str, String); 4] {
    [
        ("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT".to_owned()),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512".to_owned()),
        ("KAFKA_SASL_USERNAME", USER.to_owned()),
        ("KAFKA_SASL_PASSWORD", password.to_owned()),
    ]
}

#[tokio::test]
async fn scram_sign_in_is_used_by_every_client_and_a_wrong_password_loses_nothing() {
    let storage = tempfile::tempdir().unwrap();
    let port = free_port();
    // Topics, messages and the user are made while the broker still lets
    // anyone in; then it is restarted to require signing in.
    let broker = Broker::start(storage.path().to_owned(), port);
    let env = TestEnv::on_broker(format!("127.0.0.1:{port}"), 2).await;
    produce_some(&env, "sasl").await;
    let status = tansu()
        .args([
            "user",
            "create",
            "--broker",
            &format!("tcp://127.0.0.1:{port}"),
        ])
        .args(["--mechanism", "scram512", USER, PASSWORD])
        .status()
        .expect("tansu user create");
    assert!(status.success(), "tansu user create: {status:?}");
    let broker =
        tokio::task::spawn_blocking(move || broker.restart_with_args(&["--authentication"]))
            .await
            .unwrap();

    // A wrong password: the broker is named, nothing is stored, nothing dead-lettered.
    let wrong = sign_in("not-the-password");
    let refused = env.spawn_with(&wrong.each_ref().map(|(k, v)| (*k, v.as_str())));
    refused
        .wait_unready("refuses this client", ("kafka_broker", "refused"))
        .await;
    assert_nothing_taken(&env).await;
    assert!(
        !refused.log_text().contains(PASSWORD) && !refused.log_text().contains("not-the-password"),
        "a password reached the log"
    );
    refused.terminate();

    // The right one: every message is accounted for.
    let right = sign_in(PASSWORD);
    let service = env.spawn_with(&right.each_ref().map(|(k, v)| (*k, v.as_str())));
    wait_for_all(&env).await;

    // `produce` signs in the same way, and says at once when it cannot.
    let produce = |settings: &[(&str, String)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_order-service"))
            .args(["produce", "--count", "2", "--rate", "0"])
            .env_clear()
            .env("KAFKA_BROKERS", &env.brokers)
            .env("KAFKA_TOPIC", &env.topic)
            .envs(settings.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (sent, stderr) = produce(&wrong);
    assert!(!sent, "{stderr}");
    assert!(
        stderr.contains("the broker refuses this client") && stderr.contains("SASL"),
        "{stderr}"
    );
    let (sent, stderr) = produce(&right);
    assert!(sent, "{stderr}");
    env.wait_for_count("SELECT count(*) FROM orders", 5, Duration::from_secs(60))
        .await;
    drop(service);
    drop(broker);
}

/// A self-signed certificate for 127.0.0.1 and its key.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl (scripts/stack test installs it)");
    assert!(status.success(), "openssl req: {status:?}");
    (cert, key)
}

/// TLS ended on `port` in front of a broker's plain listener (socat, one
/// process per connection, all in one process group).
struct TlsProxy(Child);

impl TlsProxy {
    fn start(port: u16, broker: u16, cert: &Path, key: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
            cert.display(),
            key.display()
        );
        let child = Command::new("socat")
            .arg(listen)
            .arg(format!("TCP:127.0.0.1:{broker}"))
            .process_group(0)
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (scripts/stack test installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the TLS proxy never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn tls_to_the_brokers_trusts_only_the_authority_given_and_recovers_when_it_is_shown() {
    let storage = tempfile::tempdir().unwrap();
    let port = free_port();
    // Topics and messages are made over the plain listener; then the broker
    // is restarted to send its clients to the TLS proxy.
    let broker = Broker::start(storage.path().to_owned(), port);
    let env = TestEnv::on_broker(format!("127.0.0.1:{port}"), 2).await;
    produce_some(&env, "tls").await;
    let tls_port = free_port();
    let broker = tokio::task::spawn_blocking(move || broker.restart_advertising(tls_port))
        .await
        .unwrap();
    let (cert, key) = certificate(storage.path(), "broker");
    let (stranger, stranger_key) = certificate(storage.path(), "stranger");
    let proxy = TlsProxy::start(tls_port, port, &stranger, &stranger_key);
    let settings = [
        ("KAFKA_BROKERS", format!("127.0.0.1:{tls_port}")),
        ("KAFKA_SECURITY_PROTOCOL", "ssl".to_owned()),
        ("KAFKA_SSL_CA_LOCATION", cert.display().to_string()),
    ];
    let service = env.spawn_with(&settings.each_ref().map(|(k, v)| (*k, v.as_str())));

    // The broker shows a certificate the given authority did not sign.
    service
        .wait_unready("refuses this client", ("kafka_broker", "refused"))
        .await;
    assert_nothing_taken(&env).await;
    // librdkafka repeats its errors many times a second; each is logged
    // once a minute at most.
    let log = service.log_text();
    assert!(log.contains("certificate verify failed"), "{log}");
    for repeated in ["kafka consumer error", "kafka client error"] {
        let lines = log.matches(repeated).count();
        assert!(
            (1..=4).contains(&lines),
            "{lines} lines of {repeated}:\n{log}"
        );
    }

    // It shows the right one: the service consumes without a restart.
    drop(proxy);
    let _proxy = TlsProxy::start(tls_port, port, &cert, &key);
    wait_for_all(&env).await;
    service.wait_ready().await;
    drop(service);
    drop(broker);
}
