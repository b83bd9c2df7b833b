//! Brokers, PostgreSQL and Redis reached over TLS, and brokers asking clients
//! to sign in. Every Kafka client of the service (consumer, dead-letter
//! producer and reader, `produce`) uses the `KAFKA_SECURITY_PROTOCOL`,
//! `KAFKA_SASL_*` and `KAFKA_SSL_*` settings; PostgreSQL's URL its `sslmode`
//! and `sslrootcert`; Redis a `rediss://` URL. Wrong credentials or a server
//! whose certificate is not trusted are environment faults: named, nothing
//! stored or dead-lettered, no message skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sqlx::ConnectOptions;
use std::time::Duration;

use crate::broker::{tansu, Broker};
use crate::helpers::{free_port, redis_url, sample_with_uid, wait_listening, TestEnv};
use crate::postgres_server::PostgresServer;

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
    assert_eq!(refused.metric("kafka_broker_refused").await, 1.0);
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
    certificate_with_key_passphrase(dir, name, None)
}

/// As [`certificate`], its key encrypted with `passphrase` if one is given.
fn certificate_with_key_passphrase(
    dir: &Path,
    name: &str,
    passphrase: Option<&str>,
) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let key_protection = match passphrase {
        Some(passphrase) => vec!["-passout".to_owned(), format!("pass:{passphrase}")],
        None => vec!["-nodes".to_owned()],
    };
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-days", "1"])
        .args(key_protection)
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
        Self::asking_for_client_certificates(port, broker, cert, key, None)
    }

    /// With `client_ca`, only clients presenting a certificate it signed get through.
    fn asking_for_client_certificates(
        port: u16,
        broker: u16,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Self {
        use std::os::unix::process::CommandExt;
        let verify = match client_ca {
            Some(ca) => format!("verify=1,cafile={}", ca.display()),
            None => "verify=0".to_owned(),
        };
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,{verify},cert={},key={}",
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
        wait_listening(port, Duration::from_secs(10), || {
            "the TLS proxy never listened".into()
        });
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

/// A broker of the test's own holding the messages of [`produce_some`],
/// restarted to send its clients to `tls_port`, where the test puts a TLS
/// proxy; and the broker's certificate and key for that proxy. Topics and
/// messages are made over the plain listener first.
/// Dropped in field order: the broker stops before its storage goes.
struct BrokerBehindTls {
    broker: Broker,
    env: TestEnv,
    storage: tempfile::TempDir,
    tls_port: u16,
    cert: PathBuf,
    key: PathBuf,
}

impl BrokerBehindTls {
    async fn start(prefix: &str) -> Self {
        let storage = tempfile::tempdir().unwrap();
        let port = free_port();
        let broker = Broker::start(storage.path().to_owned(), port);
        let env = TestEnv::on_broker(format!("127.0.0.1:{port}"), 2).await;
        produce_some(&env, prefix).await;
        let tls_port = free_port();
        let broker = tokio::task::spawn_blocking(move || broker.restart_advertising(tls_port))
            .await
            .unwrap();
        let (cert, key) = certificate(storage.path(), "broker");
        Self {
            storage,
            broker,
            env,
            tls_port,
            cert,
            key,
        }
    }

    /// Settings that reach the broker over TLS, trusting its certificate.
    fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KAFKA_BROKERS", format!("127.0.0.1:{}", self.tls_port)),
            ("KAFKA_SECURITY_PROTOCOL", "ssl".to_owned()),
            ("KAFKA_SSL_CA_LOCATION", self.cert.display().to_string()),
        ]
    }

    fn spawn(&self, settings: &[(&str, String)]) -> crate::helpers::Service {
        let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.env.spawn_with(&settings)
    }
}

#[tokio::test]
async fn tls_to_the_brokers_trusts_only_the_authority_given_and_recovers_when_it_is_shown() {
    let tls = BrokerBehindTls::start("tls").await;
    let (stranger, stranger_key) = certificate(tls.storage.path(), "stranger");
    let port = tls.broker.port;
    let proxy = TlsProxy::start(tls.tls_port, port, &stranger, &stranger_key);
    let service = tls.spawn(&tls.settings());

    // The broker shows a certificate the given authority did not sign.
    service
        .wait_unready("refuses this client", ("kafka_broker", "refused"))
        .await;
    assert_nothing_taken(&tls.env).await;
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
    let _proxy = TlsProxy::start(tls.tls_port, port, &tls.cert, &tls.key);
    wait_for_all(&tls.env).await;
    service.wait_ready().await;
}

/// A broker that asks for the client's own certificate gets it, its key
/// read with the passphrase given.
#[tokio::test]
async fn tls_client_certificates_with_an_encrypted_key_are_presented() {
    let tls = BrokerBehindTls::start("mtls").await;
    let passphrase = "key-Pa55phrase";
    let (client, client_key) =
        certificate_with_key_passphrase(tls.storage.path(), "client", Some(passphrase));
    let _proxy = TlsProxy::asking_for_client_certificates(
        tls.tls_port,
        tls.broker.port,
        &tls.cert,
        &tls.key,
        Some(&client),
    );

    // Without one, the broker turns the service away.
    let refused = tls.spawn(&tls.settings());
    refused
        .wait_unready("refuses this client", ("kafka_broker", "refused"))
        .await;
    assert_nothing_taken(&tls.env).await;
    refused.terminate();

    let mut settings = tls.settings();
    settings.extend([
        (
            "KAFKA_SSL_CERTIFICATE_LOCATION",
            client.display().to_string(),
        ),
        ("KAFKA_SSL_KEY_LOCATION", client_key.display().to_string()),
        ("KAFKA_SSL_KEY_PASSWORD", passphrase.to_owned()),
    ]);
    let service = tls.spawn(&settings);
    wait_for_all(&tls.env).await;
    assert!(
        !service.log_text().contains(passphrase),
        "the passphrase reached the log"
    );
}

#[tokio::test]
async fn postgres_over_tls_is_verified_against_the_authority_in_the_url() {
    let server = PostgresServer::start().await;
    let certificates = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(certificates.path(), "postgres");
    let (stranger, _) = certificate(certificates.path(), "stranger");
    server.enable_tls(&cert, &key).await;
    let env = TestEnv::on_postgres(server.admin()).await;
    produce_some(&env, "pg-tls").await;
    let url_trusting = |ca: &Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            env.service_url,
            ca.display()
        )
    };

    // A server whose certificate the named authority did not sign.
    let untrusting = url_trusting(&stranger);
    let refused = env.spawn_with(&[("DATABASE_URL", &untrusting)]);
    refused
        .wait_unready("certificate verify failed", ("postgres", "down"))
        .await;
    assert_nothing_taken(&env).await;
    refused.terminate();

    let trusting = url_trusting(&cert);
    let service = env.spawn_with(&[("DATABASE_URL", &trusting)]);
    wait_for_all(&env).await;
    service.wait_ready().await;
    // Every session of the service is encrypted (seen as a superuser, who
    // sees every session's state).
    let role = url::Url::parse(&env.service_url)
        .unwrap()
        .username()
        .to_owned();
    let mut superuser = server.superuser("postgres").connect().await.unwrap();
    let sessions = |ssl: bool| {
        format!(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE usename = '{role}' AND ssl = {ssl}"
        )
    };
    let encrypted: i64 = sqlx::query_scalar(&sessions(true))
        .fetch_one(&mut superuser)
        .await
        .unwrap();
    let clear: i64 = sqlx::query_scalar(&sessions(false))
        .fetch_one(&mut superuser)
        .await
        .unwrap();
    assert!(encrypted > 0, "no encrypted session");
    assert_eq!(clear, 0, "a session in the clear");
}

#[tokio::test]
async fn redis_over_tls_is_used_once_its_certificate_is_trusted() {
    let env = TestEnv::new().await;
    let certificates = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(certificates.path(), "redis");
    let (stranger, _) = certificate(certificates.path(), "stranger");
    let redis_port = url::Url::parse(&redis_url())
        .unwrap()
        .port()
        .unwrap_or(6379);
    let tls_port = free_port();
    let _proxy = TlsProxy::start(tls_port, redis_port, &cert, &key);
    let prefix = format!("tls-{}:", crate::helpers::unique_suffix());
    let tls_url = format!("rediss://127.0.0.1:{tls_port}/");
    // OpenSSL's own setting for the authorities it trusts.
    let trusting = |ca: &Path| {
        env.spawn_with(&[
            ("REDIS_URL", tls_url.as_str()),
            ("REDIS_KEY_PREFIX", prefix.as_str()),
            ("SSL_CERT_FILE", &ca.display().to_string()),
        ])
    };

    // Not trusted: the tier is down, the service serves on without it.
    let untrusting = trusting(&stranger);
    untrusting.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ready: serde_json::Value = untrusting.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["checks"]["redis"], "down", "{ready}");
    let log = untrusting.log_text();
    assert!(log.contains("certificate verify failed"), "{log}");
    untrusting.terminate();

    let service = trusting(&cert);
    service.wait_ready().await;
    crate::helpers::eventually(
        Duration::from_secs(15),
        || async {
            let ready: serde_json::Value = service.get("/readyz").await.json().await.ok()?;
            (ready["checks"]["redis"] == "up").then_some(())
        },
        || format!("Redis never up over TLS:\n{}", service.log_text()),
    )
    .await;
    produce_some(&env, "redis-tls").await;
    wait_for_all(&env).await;
    // The orders went through the TLS proxy into the shared Redis.
    let client = redis::Client::open(redis_url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    crate::helpers::eventually(
        Duration::from_secs(10),
        || {
            let mut conn = conn.clone();
            let pattern = format!("{prefix}order:*");
            async move {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(pattern)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                (keys.len() == 3).then_some(())
            }
        },
        || "the orders never reached Redis".to_owned(),
    )
    .await;
}
