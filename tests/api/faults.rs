//! Faults while the real producer sends a known stream (valid orders with
//! invalid, malformed and duplicate ones mixed in), each followed by an exact
//! reconciliation against what the broker holds: every valid order is in
//! PostgreSQL once and served identically over HTTP, every rejected message is
//! in the dead-letter topic once with its reason. Each test prints its row of
//! the table and writes it to `artifacts/faults/`; `scripts/stack faults` runs
//! them with a longer stream and prints the table.
//!
//! Sizes come from FAULT_ORDERS (messages per scenario, default 1500),
//! FAULT_RATE (messages/s, default 150), FAULT_KILLS (default 3),
//! FAULT_PG_OUTAGE_SECS (default 30), FAULT_ENV_OUTAGE_SECS (default 10),
//! FAULT_FREEZE_SECS (default 55, past the default 45 s session timeout) and FAULT_BROKER_FREEZE_SECS (default 35).
//! Each scenario prints its seed (the producer's stream and the moments of
//! its faults); FAULT_SEED=N replays it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use order_service::domain::{parse_order, Limits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

use crate::broker::Broker;
use crate::helpers::{self, free_port, sample_with_uid, Record, Service, TcpProxy, TestEnv};
use crate::postgres_server::{PostgresServer, SmallDisk};

const PARTITIONS: i32 = 4;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn stream_len() -> u64 {
    setting("FAULT_ORDERS", 1500)
}

/// How long the stream lasts at the configured rate.
fn stream_duration() -> Duration {
    Duration::from_secs_f64(stream_len() as f64 / setting("FAULT_RATE", 150) as f64)
}

async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}

/// A scenario's seed, printed so that a failure can be replayed with FAULT_SEED.
struct Seed {
    value: u64,
    rng: StdRng,
}

impl Seed {
    fn new(scenario: &str) -> Self {
        let value = std::env::var("FAULT_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| rand::rng().random_range(1..1_000_000));
        println!("{scenario}: seed {value} (replay with FAULT_SEED={value})");
        Self {
            value,
            rng: StdRng::seed_from_u64(value),
        }
    }

    /// A moment between a tenth and `share` of the stream's length.
    fn random_point(&mut self, share: f64) -> Duration {
        stream_duration().mul_f64(self.rng.random_range(0.1..share))
    }
}

/// `order-service produce` sending the scenario's stream.
struct Stream(Child);

#[derive(Debug, Default)]
struct Delivered {
    total: usize,
    by_kind: HashMap<String, usize>,
}

impl Stream {
    fn start(env: &TestEnv, seed: u64) -> Self {
        let n = stream_len();
        let child = Command::new(env!("CARGO_BIN_EXE_order-service"))
            .arg("produce")
            .args(["--count", &n.to_string()])
            .args(["--rate", &setting("FAULT_RATE", 150).to_string()])
            .args(["--seed", &seed.to_string()])
            .args(["--invalid-rate", "0.1"])
            .args(["--malformed", &(n / 50).max(1).to_string()])
            .args(["--duplicate-rate", "0.05"])
            .args(["--max-items", "3"])
            .env_clear()
            .env("KAFKA_BROKERS", &env.brokers)
            .env("KAFKA_TOPIC", &env.topic)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the producer");
        Self(child)
    }

    /// Waits for the producer and reads its summary of what the broker acknowledged.
    async fn finish(self) -> Delivered {
        let out = tokio::task::spawn_blocking(move || self.0.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let summary = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the producer failed:\n{summary}");
        let mut delivered = Delivered::default();
        for line in summary.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["sent", _, "delivered", n, ..] = words[..] {
                delivered.total = n.trim_end_matches(',').parse().unwrap();
            }
            if let [kind, "sent", _, "delivered", n, ..] = words[..] {
                delivered
                    .by_kind
                    .insert(kind.to_owned(), n.parse().unwrap());
            }
        }
        assert!(
            delivered.total > 0,
            "no summary from the producer:\n{summary}"
        );
        delivered
    }
}

/// One line of the reconciliation table.
#[derive(Debug, Default)]
struct Row {
    sent: usize,
    stored: usize,
    duplicates: usize,
    dead_lettered: usize,
    lost: usize,
    doubled: usize,
    problems: Vec<String>,
}

impl Row {
    fn problem(&mut self, text: String) {
        if self.problems.len() < 20 {
            self.problems.push(text);
        }
    }
}

/// Waits until every message is processed and committed, then checks each one.
/// `counters` is the instance that lived through the whole stream, if any.
async fn reconcile(
    env: &TestEnv,
    scenario: &str,
    delivered: Delivered,
    reader: &Service,
    counters: Option<&Service>,
) {
    let messages = env.read_topic(&env.topic, PARTITIONS);
    let mut row = Row {
        sent: messages.len(),
        ..Row::default()
    };
    assert_eq!(
        messages.len(),
        delivered.total,
        "the topic holds what the producer had acknowledged"
    );

    // What each message should have become, by the same rules the service uses.
    let limits = Limits::default();
    let mut orders: HashMap<String, Value> = HashMap::new();
    let mut rejected: HashMap<(i32, i64), Vec<String>> = HashMap::new();
    for m in &messages {
        match parse_order(&m.payload, &limits) {
            Ok(order) => {
                let value: Value = serde_json::from_slice(&m.payload).unwrap();
                match orders.get(order.uid().as_str()) {
                    Some(first) => {
                        assert_eq!(first, &value, "the producer only re-sends exact copies");
                        row.duplicates += 1;
                    }
                    None => {
                        orders.insert(order.uid().to_string(), value);
                    }
                }
            }
            Err(rejection) => {
                rejected.insert((m.partition, m.offset), rejection.reasons());
            }
        }
    }
    let kind = |k: &str| delivered.by_kind.get(k).copied().unwrap_or(0);
    assert_eq!(
        rejected.len(),
        kind("invalid") + kind("malformed"),
        "every invalid and malformed message is recognised as such"
    );
    assert_eq!(
        orders.len() + row.duplicates,
        kind("valid") + kind("duplicate")
    );

    let committed = "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets";
    let deadline = Instant::now() + Duration::from_secs(180);
    while env.count(committed).await < messages.len() as i64 {
        assert!(
            Instant::now() < deadline,
            "{scenario}: {} of {} messages committed; logs of the reading instance:\n{}",
            env.count(committed).await,
            messages.len(),
            reader.log_text()
        );
        pause(Duration::from_millis(200)).await;
    }

    // PostgreSQL: each order once, with all its items.
    let stored: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT o.order_uid, o.document, (SELECT count(*) FROM items i WHERE i.order_uid = o.order_uid) \
         FROM orders o",
    )
    .fetch_all(&env.db)
    .await
    .unwrap();
    let mut seen = HashSet::new();
    for (uid, document, items) in &stored {
        let Some(expected) = orders.get(uid) else {
            row.doubled += 1;
            row.problem(format!("{uid}: stored but never sent as a valid order"));
            continue;
        };
        seen.insert(uid.clone());
        let document: Value = serde_json::from_str(document).unwrap();
        if &document != expected {
            row.problem(format!("{uid}: stored content differs from what was sent"));
        }
        let expected_items = expected["items"].as_array().unwrap().len() as i64;
        if *items != expected_items {
            row.doubled += usize::from(*items > expected_items);
            row.problem(format!("{uid}: {items} item rows, sent {expected_items}"));
        }
    }
    row.stored = seen.len();
    for uid in orders.keys().filter(|uid| !seen.contains(*uid)) {
        row.lost += 1;
        row.problem(format!("{uid}: sent, never stored"));
    }

    // HTTP: each order served as sent.
    let served: Vec<(String, Option<Value>)> = futures::stream::iter(orders.keys().cloned())
        .map(|uid| async move {
            let r = reader.get(&format!("/order/{uid}")).await;
            let body = if r.status() == 200 {
                r.json().await.ok()
            } else {
                None
            };
            (uid, body)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (uid, body) in served {
        if body.as_ref() != orders.get(&uid) {
            row.problem(format!(
                "{uid}: GET /order/{uid} does not return the order as sent"
            ));
        }
    }

    // Dead letters: each rejected message once, with its reasons.
    let letters = env.read_topic(&env.dlq_topic, 1);
    let mut letters_per_source: HashMap<(i32, i64), usize> = HashMap::new();
    for letter in &letters {
        let source = (
            letter.header("dlq-source-partition").parse().unwrap_or(-1),
            letter.header("dlq-source-offset").parse().unwrap_or(-1),
        );
        *letters_per_source.entry(source).or_default() += 1;
        match rejected.get(&source) {
            Some(reasons) if letter.reasons() == reasons.as_slice() => {}
            Some(reasons) => row.problem(format!(
                "{source:?}: dead-lettered with {:?}, expected {reasons:?}",
                letter.reasons()
            )),
            None => {
                row.doubled += 1;
                row.problem(format!("{source:?}: dead-lettered but valid"));
            }
        }
    }
    for source in rejected.keys() {
        match letters_per_source.get(source).copied().unwrap_or(0) {
            0 => {
                row.lost += 1;
                row.problem(format!("{source:?}: rejected, never dead-lettered"));
            }
            1 => row.dead_lettered += 1,
            n => {
                row.dead_lettered += 1;
                row.doubled += n - 1;
                row.problem(format!("{source:?}: dead-lettered {n} times"));
            }
        }
    }

    // Their record in PostgreSQL, written with the offsets: the same letters.
    let recorded: Vec<(i32, i64, sqlx::types::Json<Vec<String>>)> = sqlx::query_as(
        "SELECT source_partition, source_offset, reasons FROM dead_letters WHERE source_topic = $1",
    )
    .bind(&env.topic)
    .fetch_all(&env.db)
    .await
    .unwrap();
    for (partition, offset, reasons) in &recorded {
        match rejected.get(&(*partition, *offset)) {
            Some(expected) if &reasons.0 == expected => {}
            Some(expected) => row.problem(format!(
                "({partition}, {offset}): recorded with {:?}, expected {expected:?}",
                reasons.0
            )),
            None => row.problem(format!(
                "({partition}, {offset}): recorded as a letter but valid"
            )),
        }
    }
    if recorded.len() != rejected.len() {
        row.problem(format!(
            "{} letters recorded in PostgreSQL, {} messages rejected",
            recorded.len(),
            rejected.len()
        ));
    }

    if let Some(service) = counters {
        let metrics = service.get("/metrics").await.text().await.unwrap();
        for (family, expected) in [
            ("orders_messages_consumed_total", row.sent),
            ("orders_stored_total", row.stored),
            ("orders_duplicates_total", row.duplicates),
            ("orders_dead_letters_total", row.dead_lettered),
        ] {
            let value = sum_of(&metrics, family);
            if value != expected as f64 {
                row.problem(format!("{family} is {value}, expected {expected}"));
            }
        }
    }

    let line = format!(
        "| {scenario} | {} | {} | {} | {} | {} | {} |",
        row.sent, row.stored, row.duplicates, row.dead_lettered, row.lost, row.doubled
    );
    println!("{line}");
    write_row(scenario, &line);
    assert!(
        row.problems.is_empty() && row.lost == 0 && row.doubled == 0,
        "{line}\n{}\nlogs of the reading instance:\n{}",
        row.problems.join("\n"),
        reader.log_text()
    );
}

/// The sum of a metric family's series in a Prometheus exposition.
fn sum_of(metrics: &str, family: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| {
            line.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn write_row(scenario: &str, line: &str) {
    // Named at run time by `scripts/stack faults`: a test binary built in
    // another checkout of the same sources would otherwise write there.
    let dir = std::env::var_os("FAULT_TABLE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts/faults"));
    std::fs::create_dir_all(&dir).unwrap();
    let file: String = scenario
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    std::fs::write(dir.join(format!("{file}.md")), format!("{line}\n")).unwrap();
}

#[tokio::test]
async fn kill_9_at_random_points() {
    let env = TestEnv::new().await;
    let mut seed = Seed::new("(a)");
    let stream = Stream::start(&env, seed.value);
    // Restarted with the same command and no other settings, as a
    // supervisor (or a person) would: the same address, hence the same
    // default member name, so the partitions come straight back.
    let addr = format!("127.0.0.1:{}", free_port());
    let spawn = || env.spawn_with(&[("HTTP_ADDR", addr.as_str())]);
    let mut service = spawn();
    let kills = setting("FAULT_KILLS", 3);
    for _ in 0..kills {
        pause(seed.random_point(0.3)).await;
        service.kill();
        service = spawn();
    }
    let delivered = stream.finish().await;
    service.wait_ready().await;
    let scenario = format!("(a) kill -9 {kills} times, restarted");
    reconcile(&env, &scenario, delivered, &service, None).await;
}

/// Waits until `share` orders are stored.
async fn stored_at_least(env: &TestEnv, share: i64) {
    helpers::eventually(
        Duration::from_secs(120),
        || async { (env.count("SELECT count(*) FROM orders").await >= share).then_some(()) },
        || format!("never stored {share} orders"),
    )
    .await;
}

/// Shares of the valid orders of `delivered` (about nine in ten messages),
/// the first `of` of `of + 1` equal steps, at which to strike.
fn shares(delivered: &Delivered, of: u64) -> impl Iterator<Item = i64> {
    let valid = delivered.total as i64 * 8 / 10;
    let of = of as i64;
    (1..=of).map(move |k| valid * k / (of + 1))
}

/// The whole stream first, then the service started on that backlog with
/// batches of 100, so that nearly every batch starts its transaction behind
/// another, two at a time; stopped by `stop` each time it has stored another
/// share of it, and started again with the same command. A batch stopped
/// behind one not yet committed must not have moved the offsets past it.
async fn stopped_while_a_backlog_is_written_two_batches_at_a_time(
    label: &str,
    how: &str,
    stop: fn(Service),
) {
    let env = TestEnv::new().await;
    let seed = Seed::new(label);
    let delivered = Stream::start(&env, seed.value).finish().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let settings = [("HTTP_ADDR", addr.as_str()), ("INGEST_BATCH_SIZE", "100")];
    let mut service = env.spawn_with(&settings);
    let stops = setting("FAULT_KILLS", 3);
    for share in shares(&delivered, stops) {
        stored_at_least(&env, share).await;
        tokio::task::spawn_blocking(move || stop(service))
            .await
            .unwrap();
        service = env.spawn_with(&settings);
    }
    service.wait_ready().await;
    let scenario =
        format!("{label} {how} {stops} times while a backlog is written two batches at a time");
    reconcile(&env, &scenario, delivered, &service, None).await;
}

#[tokio::test]
async fn kill_9_while_a_backlog_is_written_two_batches_at_a_time() {
    stopped_while_a_backlog_is_written_two_batches_at_a_time("(r)", "kill -9", Service::kill).await;
}

/// The graceful stop: both writes in flight finish (or are given up) in
/// order within the shutdown bound, and the process exits 0.
#[tokio::test]
async fn sigterm_while_a_backlog_is_written_two_batches_at_a_time() {
    // SHUTDOWN_TIMEOUT_MS (10 s by default), then leaving the group.
    stopped_while_a_backlog_is_written_two_batches_at_a_time("(t)", "SIGTERM", |service| {
        service.terminate_within(Duration::from_secs(15))
    })
    .await;
}

/// Stopped (SIGTERM) at several points of its start, while its group may
/// still be forming, then started again the same way: it gets its partitions
/// and consumes. (A leader that left a forming group would leave it without
/// a leader on the local broker, for good; librdkafka finishes a join and
/// sync in flight before it leaves, and this holds it to that.)
#[tokio::test]
async fn stopped_while_joining_then_started_again_consumes() {
    let env = TestEnv::with_partitions(1).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let settings = [("HTTP_ADDR", addr.as_str())];
    for after_ms in [1_500, 3_000, 4_500, 6_000, 7_500] {
        let service = env.spawn_with(&settings);
        pause(Duration::from_millis(after_ms)).await;
        let status = tokio::task::spawn_blocking(move || service.terminate())
            .await
            .unwrap();
        assert!(status.success(), "stopped after {after_ms} ms: {status:?}");
    }
    let service = env.spawn_with(&settings);
    helpers::produce_orders(&env, &helpers::generated_orders(93, 5)).await;
    env.wait_for_count("SELECT count(*) FROM orders", 5, Duration::from_secs(60))
        .await;
    service.wait_ready().await;
}

#[tokio::test]
async fn postgres_away_for_30_seconds() {
    let env = TestEnv::new().await;
    let (proxy, service) = env
        .spawn_behind_proxy(&[("INGEST_MAX_BACKOFF_MS", "1000")])
        .await;
    service.wait_ready().await;
    let mut seed = Seed::new("(b)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    proxy.cut();
    pause(Duration::from_secs(setting("FAULT_PG_OUTAGE_SECS", 30))).await;
    proxy.restore();
    let delivered = stream.finish().await;
    let scenario = format!(
        "(b) PostgreSQL away {} s",
        setting("FAULT_PG_OUTAGE_SECS", 30)
    );
    reconcile(&env, &scenario, delivered, &service, Some(&service)).await;
}

/// PostgreSQL crashes (stopped without a checkpoint, sessions cut, commits
/// in flight unanswered) and starts again, recovering from its log: a server
/// of the test's own, the service connected to it directly.
#[tokio::test]
async fn postgres_crashed_and_restarted() {
    let server = PostgresServer::start().await;
    let env = TestEnv::on_postgres(server.admin()).await;
    let service = env.spawn_with(&[("INGEST_MAX_BACKOFF_MS", "1000")]);
    service.wait_ready().await;
    let mut seed = Seed::new("(n)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    server.crash();
    wait_paused_by(&service, "database").await;
    pause(env_outage()).await;
    server.start_again();
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(n) PostgreSQL crashed, restarted",
        delivered,
        &service,
        Some(&service),
    )
    .await;
}

/// Freezes the server (SIGSTOP) until ingest pauses on it, then for the
/// outage, then thaws it.
async fn frozen_until_ingest_pauses(server: &PostgresServer, service: &Service) {
    server.signal("STOP");
    service
        .wait_for_log("ingest paused", Duration::from_secs(90))
        .await;
    pause(env_outage()).await;
    server.signal("CONT");
}

/// PostgreSQL frozen, then crashed, while a backlog is written two batches at
/// a time (of 100). Frozen once the first batch is stored, with nearly all of
/// the backlog still to write: both writes in flight are held until the
/// write timeout gives them up. Crashed as soon as ingest resumes, while it
/// writes the rest: both transactions in flight are cut, and the commit
/// ahead may have landed unanswered. Either way the batch behind must neither
/// be lost nor have moved the offsets past the one ahead. A server of the
/// test's own.
#[tokio::test]
async fn postgres_frozen_then_crashed_while_a_backlog_is_written_two_batches_at_a_time() {
    let server = PostgresServer::start().await;
    let env = TestEnv::on_postgres(server.admin()).await;
    let seed = Seed::new("(s)");
    let delivered = Stream::start(&env, seed.value).finish().await;
    let service = env.spawn_with(&[
        ("INGEST_BATCH_SIZE", "100"),
        ("INGEST_MAX_BACKOFF_MS", "1000"),
    ]);
    stored_at_least(&env, 1).await;
    frozen_until_ingest_pauses(&server, &service).await;
    service
        .wait_for_log("ingest resumed", Duration::from_secs(90))
        .await;
    server.crash();
    // The crash must cut writes in flight, or the scenario tests less than it
    // says: ingest pauses again.
    helpers::eventually(
        env_outage(),
        || async { (service.log_text().matches("ingest paused").count() >= 2).then_some(()) },
        || format!("the crash cut no write: {}", service.log_text()),
    )
    .await;
    pause(env_outage()).await;
    server.start_again();
    let scenario =
        "(s) PostgreSQL frozen, then crashed, while a backlog is written two batches at a time";
    reconcile(&env, scenario, delivered, &service, Some(&service)).await;
}

/// PostgreSQL frozen (SIGSTOP to the server and its sessions: a paused VM, a
/// host swapping): nothing answers, nothing is closed, until it is thawed. A
/// write in flight is abandoned at the write timeout (30 s by default), and a
/// commit sent before the freeze may land only at the thaw, unseen: the retry
/// must find it. A server of the test's own.
#[tokio::test]
async fn postgres_frozen_then_thawed() {
    let server = PostgresServer::start().await;
    let env = TestEnv::on_postgres(server.admin()).await;
    let service = env.spawn_with(&[("INGEST_MAX_BACKOFF_MS", "1000")]);
    service.wait_ready().await;
    let mut seed = Seed::new("(p)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    frozen_until_ingest_pauses(&server, &service).await;
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(p) PostgreSQL frozen, thawed",
        delivered,
        &service,
        Some(&service),
    )
    .await;
    assert_each_pause_told_once(&service, "").await;
}

#[tokio::test]
async fn redis_stopped_and_started() {
    let env = TestEnv::new().await;
    let (proxy, redis_url) = TcpProxy::to_redis().await;
    let service = env.spawn_with(&[("REDIS_URL", &redis_url)]);
    service.wait_ready().await;
    let mut seed = Seed::new("(c)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.4)).await;
    proxy.cut();
    pause(stream_duration() / 3).await;
    proxy.restore();
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(c) Redis stopped, started",
        delivered,
        &service,
        Some(&service),
    )
    .await;
}

/// A broker of the scenario's own (its storage lives as long as the first
/// value) and a test environment on it.
async fn own_broker() -> (tempfile::TempDir, Broker, TestEnv) {
    let storage = tempfile::tempdir().unwrap();
    let broker = Broker::start(storage.path().to_owned(), free_port());
    let env = TestEnv::on_broker(format!("127.0.0.1:{}", broker.port), PARTITIONS).await;
    (storage, broker, env)
}

/// [`own_broker`], and a ready service on it.
async fn on_own_broker(settings: &[(&str, &str)]) -> (tempfile::TempDir, Broker, TestEnv, Service) {
    let (storage, broker, env) = own_broker().await;
    let service = env.spawn_with(settings);
    service.wait_ready().await;
    (storage, broker, env, service)
}

#[tokio::test]
async fn broker_restarted_mid_stream() {
    let (_storage, mut broker, env, service) = on_own_broker(&[]).await;
    let mut seed = Seed::new("(d)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    broker = tokio::task::spawn_blocking(move || broker.restart(Duration::from_secs(2)))
        .await
        .unwrap();
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(d) broker restarted",
        delivered,
        &service,
        Some(&service),
    )
    .await;
    drop(broker);
}

/// Started while its broker is down (a host booting, the broker slower to
/// come up): the service serves what PostgreSQL holds, `/readyz` names the
/// broker as one it cannot reach (not as a slow one, which a frozen broker
/// is), and once the broker is up it consumes without a restart.
#[tokio::test]
async fn started_while_the_broker_is_down() {
    let (storage, broker, env) = own_broker().await;
    let port = broker.port;
    let orders = helpers::generated_orders(73, 20);
    let first = env.spawn();
    helpers::store_orders(&env, &orders[..10]).await;
    assert!(first.terminate().success());
    drop(broker);

    let service = env.spawn();
    service
        .wait_unready("Connection refused", ("kafka_broker", "unreachable"))
        .await;
    // Whether the topic exists cannot be known meanwhile.
    let readiness: Value = service.get("/readyz").await.json().await.unwrap();
    assert_eq!(readiness["checks"]["kafka_topic"], "unknown", "{readiness}");
    service
        .wait_for_log("the broker cannot be reached", Duration::from_secs(10))
        .await;
    let served = service
        .wait_for_order(&orders[0].0, Duration::from_secs(30))
        .await;
    assert_eq!(
        served,
        serde_json::from_slice::<Value>(&orders[0].1).unwrap()
    );
    let dir = storage.path().to_owned();
    let broker = tokio::task::spawn_blocking(move || Broker::start(dir, port))
        .await
        .unwrap();
    helpers::produce_orders(&env, &orders[10..]).await;
    env.wait_for_count("SELECT count(*) FROM orders", 20, Duration::from_secs(90))
        .await;
    service.wait_ready().await;
    env.assert_no_dead_letters();
    drop(broker);
}

/// The broker stopped, its storage wiped (as a container without its volume)
/// and started again empty, with the scenario's topics created again.
async fn lose_data(storage: &tempfile::TempDir, broker: Broker, env: &TestEnv) -> Broker {
    let port = broker.port;
    drop(broker);
    for entry in std::fs::read_dir(storage.path()).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let broker = Broker::start(storage.path().to_owned(), port);
    env.create_topic(&env.topic, PARTITIONS).await;
    env.create_topic(&env.dlq_topic, 1).await;
    broker
}

/// The broker loses its data (its storage wiped, as a container without its
/// volume; or the topic deleted and created again) while PostgreSQL keeps the
/// positions: they are past the end of the new topic (which holds fewer
/// messages per partition than were consumed before, on every partition with
/// these orders). Its orders must not be passed over as already consumed: the
/// service says so and consumes the partitions again from their beginning.
/// Rejected messages at the positions of letters recorded before the loss
/// (the first two of one partition, by their key) are recorded too.
#[tokio::test]
async fn broker_data_lost_while_postgres_kept_the_positions() {
    let (storage, broker, env, service) = on_own_broker(&[]).await;
    let orders = helpers::generated_orders(71, 80);
    let key = Some("rejected");
    env.produce(&[(key, b"{lost-1"), (key, b"{lost-2")]).await;
    helpers::produce_orders(&env, &orders[..60]).await;
    env.wait_for_committed(62, Duration::from_secs(60)).await;
    assert!(service.terminate().success());

    let broker = lose_data(&storage, broker, &env).await;
    env.produce(&[(key, b"{not json"), (key, b"[]")]).await;
    helpers::produce_orders(&env, &orders[60..]).await;

    let service = env.spawn();
    env.wait_for_count("SELECT count(*) FROM orders", 80, Duration::from_secs(60))
        .await;
    env.wait_for_committed(22, Duration::from_secs(30)).await;
    let logs = service.log_text();
    assert_eq!(
        logs.matches("past the end of the partition").count(),
        PARTITIONS as usize,
        "{logs}"
    );
    assert_eq!(service.metric("orders_stored_total").await, 20.0, "{logs}");
    assert_eq!(env.dead_letters(2, Duration::from_secs(10)).len(), 2);
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE source_offset < 2")
            .await,
        4
    );

    // Started again, it resumes where it stopped on the new topic: nothing
    // consumed twice, no letter sent again.
    assert!(service.terminate().success());
    let service = env.spawn();
    service.wait_ready().await;
    env.produce(&[(None, b"{again")]).await;
    env.wait_for_committed(23, Duration::from_secs(30)).await;
    assert_eq!(env.dead_letters(3, Duration::from_secs(10)).len(), 3);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 5);
    let logs = service.log_text();
    assert!(!logs.contains("past the end"), "{logs}");
    drop(broker);
}

/// The broker loses its data while the service is stopped, and the new topic
/// grows past the positions PostgreSQL keeps before the service starts
/// again: no position is past the end, so only the message before each
/// position, read again and compared with the one consumed there, tells that
/// the messages below it are others. They must be consumed from the
/// beginning, not passed over; and once that is done, a restart compares the
/// right message again and consumes nothing twice.
#[tokio::test]
async fn broker_data_lost_and_the_new_topic_grown_past_the_positions() {
    let (storage, broker, env, service) = on_own_broker(&[]).await;
    let orders = helpers::generated_orders(75, 101);
    helpers::produce_orders(&env, &orders[..20]).await;
    env.wait_for_committed(20, Duration::from_secs(60)).await;
    assert!(service.terminate().success());

    let broker = lose_data(&storage, broker, &env).await;
    helpers::produce_orders(&env, &orders[20..100]).await;
    let service = env.spawn();
    env.wait_for_count("SELECT count(*) FROM orders", 100, Duration::from_secs(60))
        .await;
    env.wait_for_committed(80, Duration::from_secs(30)).await;
    let logs = service.log_text();
    assert_eq!(
        logs.matches("is not the one consumed there").count(),
        PARTITIONS as usize,
        "{logs}"
    );
    assert_eq!(service.metric("orders_stored_total").await, 80.0, "{logs}");
    env.assert_no_dead_letters();

    assert!(service.terminate().success());
    let service = env.spawn();
    service.wait_ready().await;
    helpers::produce_orders(&env, &orders[100..]).await;
    env.wait_for_committed(81, Duration::from_secs(30)).await;
    env.wait_for_count("SELECT count(*) FROM orders", 101, Duration::from_secs(30))
        .await;
    let logs = service.log_text();
    assert!(!logs.contains("not the one consumed"), "{logs}");
    assert_eq!(service.metric("orders_stored_total").await, 1.0, "{logs}");
    assert_eq!(
        service.metric("orders_duplicates_total").await,
        0.0,
        "{logs}"
    );
    drop(broker);
}

/// How a running service's broker loses the messages below its positions.
enum Loss {
    /// Its messages and groups lost: a rebalance comes first. (A wiped
    /// storage with the topics made again gives them new ids, and this
    /// broker's answer to a fetch by an old one kills the consumer inside
    /// librdkafka, as the README says; a restart then finds the loss, which
    /// `broker_data_lost_while_postgres_kept_the_positions` tests.)
    MessagesAndGroups,
    /// Its messages deleted, its topics and group kept: no rebalance, so only
    /// the partitions' ends, read while consuming, tell. (Deleting a topic
    /// under a live group stops this broker's storage for good, so the
    /// messages are deleted in its storage while it is stopped.)
    Messages,
}

/// The broker loses its messages while the service consumes: the positions
/// it holds, in memory and in PostgreSQL, are past the new ends, and the new
/// messages arrive below them. They must not be passed over as consumed (nor
/// dropped as already seen): the service finds the ends below its positions,
/// says so, and consumes the partitions again from their beginning, with no
/// restart.
async fn messages_lost_while_consumed(loss: Loss) {
    let (_storage, broker, env, service) = on_own_broker(&[]).await;
    let orders = helpers::generated_orders(74, 80);
    helpers::produce_orders(&env, &orders[..60]).await;
    env.wait_for_committed(60, Duration::from_secs(60)).await;
    let restart = match loss {
        Loss::MessagesAndGroups => Broker::restart_losing_messages_and_groups,
        Loss::Messages => Broker::restart_losing_messages,
    };
    let broker = tokio::task::spawn_blocking(move || restart(broker))
        .await
        .unwrap();
    let key = Some("rejected");
    env.produce(&[(key, b"{after the loss")]).await;
    helpers::produce_orders(&env, &orders[60..]).await;
    env.wait_for_count("SELECT count(*) FROM orders", 80, Duration::from_secs(90))
        .await;
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters WHERE payload_preview = '{after the loss'",
        1,
        Duration::from_secs(30),
    )
    .await;
    env.wait_for_committed(21, Duration::from_secs(30)).await;
    let logs = service.log_text();
    assert_eq!(
        logs.matches("past the end of the partition").count(),
        PARTITIONS as usize,
        "{logs}"
    );
    assert_eq!(service.metric("orders_stored_total").await, 80.0, "{logs}");
    drop(broker);
}

#[tokio::test]
async fn broker_data_lost_while_the_service_consumes() {
    messages_lost_while_consumed(Loss::MessagesAndGroups).await;
}

#[tokio::test]
async fn broker_messages_lost_under_a_live_group_while_the_service_consumes() {
    messages_lost_while_consumed(Loss::Messages).await;
}

/// The broker loses its producers' state with its messages and groups while
/// the service runs. Its dead-letter producer is then answered
/// `UNKNOWN_PRODUCER_ID` to every try on this broker (the README's
/// local-broker section), so ingest pauses at the next rejected message and
/// says so; restarted the same way, the service sends that letter under a
/// new producer id and resumes: every order stored, one letter and one
/// record for the rejected message.
#[tokio::test]
async fn broker_producer_state_lost_then_the_service_restarted() {
    let (_storage, broker, env) = own_broker().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let spawn = || env.spawn_with(&[("HTTP_ADDR", addr.as_str())]);
    let service = spawn();
    service.wait_ready().await;
    let orders = helpers::generated_orders(75, 40);
    let key = Some("rejected");
    env.produce(&[(key, b"{before the loss")]).await;
    helpers::produce_orders(&env, &orders[..20]).await;
    env.wait_for_committed(21, Duration::from_secs(60)).await;
    let broker = tokio::task::spawn_blocking(move || broker.restart_losing_all_but_the_topics())
        .await
        .unwrap();
    env.produce(&[(key, b"{after the loss")]).await;
    helpers::produce_orders(&env, &orders[20..]).await;
    wait_paused_by(&service, "not acknowledged").await;
    service.kill();

    let service = spawn();
    env.wait_for_count("SELECT count(*) FROM orders", 40, Duration::from_secs(90))
        .await;
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters WHERE payload_preview = '{after the loss'",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(env.dead_letters(1, Duration::from_secs(10)).len(), 1);
    drop((service, broker));
}

/// The dead-letter position stored before the broker lost its data is past
/// the end of the new dead-letter topic. A crash between a letter sent there
/// and its record must not send it again: the letters are read back from the
/// new topic's beginning, not from the old position (which would find none).
#[tokio::test]
async fn a_letter_sent_after_the_broker_lost_its_data_is_not_sent_again_after_a_crash() {
    let (storage, broker, env) = own_broker().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let spawn = || env.spawn_with(&[("HTTP_ADDR", addr.as_str())]);
    let service = spawn();
    service.wait_ready().await;
    let key = Some("rejected");
    env.produce(&[(key, b"{lost-1"), (key, b"{lost-2"), (key, b"{lost-3")])
        .await;
    env.wait_for_committed(3, Duration::from_secs(60)).await;
    assert!(service.terminate().success());
    let stale = "SELECT max(dlq_next_offset) FROM consumer_offsets";
    assert_eq!(env.count(stale).await, 3);

    let broker = lose_data(&storage, broker, &env).await;
    let role = &env.service_role;
    env.execute(&format!("REVOKE INSERT ON dead_letters FROM {role}"))
        .await;
    let service = spawn();
    service.wait_ready().await;
    env.produce(&[(key, b"{after-the-loss")]).await;
    wait_paused_by(&service, "permission denied for table dead_letters").await;
    assert_eq!(env.dead_letters(1, Duration::from_secs(10)).len(), 1);
    service.kill();

    env.execute(&format!("GRANT INSERT ON dead_letters TO {role}"))
        .await;
    let service = spawn();
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters WHERE payload_preview = '{after-the-loss'",
        1,
        Duration::from_secs(60),
    )
    .await;
    let letters = env.dead_letters(1, Duration::from_secs(10));
    assert_eq!(letters.len(), 1, "not sent again: {letters:#?}");
    let logs = service.log_text();
    assert!(
        logs.contains("dead-letter position stored in PostgreSQL is past the end"),
        "{logs}"
    );
    drop(broker);
}

/// Records the broker deleted for its retention before the group read them
/// can be neither stored nor dead-lettered. The service must not pass over
/// them in silence: on the assignment it logs the partition and the offsets
/// once, counts them, and goes on with what follows. The group stopped at
/// offset 10; offsets 0 to 29 carry a timestamp older than the topic's
/// retention and are deleted, offset 30 is recent and stays.
#[tokio::test]
async fn records_expired_before_they_were_consumed_are_reported() {
    let storage = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = Broker::start_with_storage(
        storage.path().to_owned(),
        port,
        "sqlite://tansu.db?maintenance_interval=1s",
    );
    let brokers = format!("127.0.0.1:{port}");
    let env = TestEnv::on_broker(brokers.clone(), 1).await;
    let topic = format!("{}-retained", env.topic);
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let retained = NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", "600000");
    for result in admin
        .create_topics(&[retained], &AdminOptions::new())
        .await
        .unwrap()
    {
        result.expect("topic created");
    }
    sqlx::query(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, 0, 10)",
    )
    .bind(&env.group)
    .bind(&topic)
    .execute(&env.db)
    .await
    .unwrap();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    for (i, (uid, order)) in helpers::generated_orders(7, 31).iter().enumerate() {
        let old = i < 30;
        let record = FutureRecord::to(&topic)
            .key(uid)
            .payload(order)
            .timestamp(if old { now - 3_600_000 } else { now });
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("acknowledged");
    }
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (low, _) = consumer
            .fetch_watermarks(&topic, 0, Duration::from_secs(5))
            .unwrap();
        if low == 30 {
            break;
        }
        assert!(Instant::now() < deadline, "retention never ran: low {low}");
        pause(Duration::from_millis(500)).await;
    }

    let service = env.spawn_with(&[("KAFKA_TOPIC", topic.as_str())]);
    service.wait_ready().await;
    env.wait_for_count("SELECT count(*) FROM orders", 1, Duration::from_secs(30))
        .await;
    let metrics = service.get("/metrics").await.text().await.unwrap();
    assert_eq!(sum_of(&metrics, "orders_messages_expired_total"), 20.0);
    let logs = service.log_text();
    let reports: Vec<Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("messages expired"))
        })
        .collect();
    assert_eq!(reports.len(), 1, "{logs}");
    assert_eq!(
        (&reports[0]["from"], &reports[0]["to"], &reports[0]["count"]),
        (&Value::from(10), &Value::from(30), &Value::from(20)),
        "{logs}"
    );
    drop(broker);
}

/// Freezes the broker (SIGSTOP) and waits until `/readyz` names it.
async fn freeze_until_named(broker: &Broker, service: &Service) {
    broker.signal("STOP");
    service
        .wait_unready("the broker did not answer", ("kafka_broker", "slow"))
        .await;
}

/// A broker that stops answering without going away, as one wedged behind a
/// long storage call: `/readyz` names it and the service logs it once, ingest
/// waits, and once the broker answers again everything is reconciled. It is
/// thawed as soon as it is named, inside the group's session timeout: the
/// local broker does not give a member that timed out its partitions back
/// (see the README).
#[tokio::test]
async fn broker_frozen_then_thawed() {
    let (_storage, broker, env, service) = on_own_broker(&[]).await;
    let mut seed = Seed::new("(j)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    freeze_until_named(&broker, &service).await;
    broker.signal("CONT");
    let delivered = stream.finish().await;
    service.wait_ready().await;
    reconcile(
        &env,
        "(j) broker frozen",
        delivered,
        &service,
        Some(&service),
    )
    .await;
    // One line on entering and one on leaving each slow spell (a long stream
    // can make the local broker slow again on its own).
    let logs = service.log_text();
    let (slow, again) = (
        logs.matches("the broker is slow").count(),
        logs.matches("the broker answers in time again").count(),
    );
    assert!(
        again >= 1 && (again..=again + 1).contains(&slow),
        "{slow} slow, {again} recovered:\n{logs}"
    );
    assert!(slow <= 3, "logged per probe, not per spell:\n{logs}");
    drop(broker);
}

/// The broker frozen for 35 s, as a broker host that swaps: longer than a
/// producer's message would once wait (30 s for the producer, 15 s for
/// letters), inside a session timeout raised for it (the local broker does
/// not give a group whose coordinator froze past the session timeout its
/// partitions back; see the README). Producers must wait, not give up: an
/// idempotent producer whose message times out renumbers its messages under
/// a new epoch, which the local broker cannot follow (its storage task
/// panics and it fails every later request), and a message resent after a
/// timeout may be stored twice. After the thaw everything is reconciled.
#[tokio::test]
async fn broker_frozen_past_the_producers_patience() {
    let frozen = Duration::from_secs(setting("FAULT_BROKER_FREEZE_SECS", 35));
    let session = (frozen.as_millis() * 2 + 10_000).to_string();
    let (_storage, broker, env, service) =
        on_own_broker(&[("KAFKA_SESSION_TIMEOUT_MS", session.as_str())]).await;
    let mut seed = Seed::new("(l)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    broker.signal("STOP");
    pause(frozen).await;
    broker.signal("CONT");
    let delivered = stream.finish().await;
    service.wait_ready().await;
    let scenario = format!("(l) broker frozen {} s", frozen.as_secs());
    reconcile(&env, &scenario, delivered, &service, Some(&service)).await;
    drop(broker);
}

/// SIGTERM while every call to the broker hangs (seeks, reads of the
/// dead-letter topic, leaving the group): the service still exits, cleanly,
/// within SHUTDOWN_TIMEOUT_MS and the bound on leaving the group.
#[tokio::test]
async fn sigterm_with_the_broker_frozen_exits_within_the_bound() {
    let (_storage, broker, _env, service) = on_own_broker(&[("SHUTDOWN_TIMEOUT_MS", "3000")]).await;
    freeze_until_named(&broker, &service).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || service.terminate())
        .await
        .unwrap();
    let took = started.elapsed();
    broker.signal("CONT");
    assert!(status.success(), "{status:?}");
    // SHUTDOWN_TIMEOUT_MS, then at most 3 s to leave the group, then exit.
    assert!(took < Duration::from_secs(8), "took {took:?}");
}

/// SIGTERM with a batch in hand while the broker drops every connection at
/// once, as tansu does once its storage has failed: the consumer's close,
/// which has no bound of its own, never hears from the group's coordinator
/// (it held the exit for 45 s here, and once for good), and the service still
/// exits, cleanly, within the bound.
#[tokio::test]
async fn sigterm_with_every_broker_connection_dropped_exits_within_the_bound() {
    let (_storage, broker, env) = own_broker().await;
    let proxy = TcpProxy::start(format!("127.0.0.1:{}", broker.port)).await;
    let advertised = proxy.port;
    let _broker = tokio::task::spawn_blocking(move || broker.restart_advertising(advertised))
        .await
        .unwrap();
    let brokers = format!("127.0.0.1:{advertised}");
    let service = env.spawn_with(&[
        ("KAFKA_BROKERS", brokers.as_str()),
        ("SHUTDOWN_TIMEOUT_MS", "3000"),
        ("INGEST_BATCH_LINGER_MS", "60000"),
        ("INGEST_BATCH_SIZE", "100000"),
    ]);
    service.wait_ready().await;
    helpers::produce_orders(&env, &helpers::generated_orders(31, 5)).await;
    helpers::eventually(
        Duration::from_secs(60),
        || async { (service.metric("orders_messages_consumed_total").await >= 5.0).then_some(()) },
        || "never consumed".into(),
    )
    .await;
    proxy.cut();
    service
        .wait_for_log("Disconnected", Duration::from_secs(30))
        .await;
    // SHUTDOWN_TIMEOUT_MS, at most 3 s to leave the group and 10 s to close.
    tokio::task::spawn_blocking(move || service.terminate_within(Duration::from_secs(20)))
        .await
        .unwrap();
    // The batch in hand was committed: PostgreSQL was there.
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 5);
}

/// A laptop asleep, a VM paused, a process stopped in a debugger: the
/// service freezes for longer than the group's session timeout, with its
/// default settings, and then goes on. The group took its partitions away
/// meanwhile; it must get them back and reconcile exactly.
#[tokio::test]
async fn service_frozen_past_the_session_timeout() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let mut seed = Seed::new("(k)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    service.signal("STOP");
    pause(Duration::from_secs(setting("FAULT_FREEZE_SECS", 55))).await;
    service.signal("CONT");
    let delivered = stream.finish().await;
    let scenario = format!("(k) service frozen {} s", setting("FAULT_FREEZE_SECS", 55));
    // No counter check: the group took the partitions away mid-batch, so the
    // instance consumes some messages twice (once per assignment) by design.
    reconcile(&env, &scenario, delivered, &service, None).await;
}

#[tokio::test]
async fn three_instances_one_killed() {
    let env = TestEnv::new().await;
    let instance = |name: &str| env.spawn_with(&[("KAFKA_GROUP_INSTANCE_ID", name)]);
    let first = instance("first");
    let second = instance("second");
    first.wait_ready().await;
    let mut seed = Seed::new("(e)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.3)).await;
    let third = instance("third");
    third.wait_ready().await;
    pause(seed.random_point(0.3)).await;
    // The last to join is killed: the local broker keeps a dead group leader
    // as leader, so a group whose leader dies never finishes its next
    // rebalance there (Apache Kafka elects a new one). It also waits for a
    // killed static member to come back, so its supervisor restarts it under
    // its name, as in (a).
    third.kill();
    let _restarted = instance("third");
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(e) 2 then 3 instances, one killed",
        delivered,
        &second,
        None,
    )
    .await;
    drop(first);
}

/// A group whose rebalance never completes is named in the log, not waited
/// on in silence. On the local broker: its leader killed, another member
/// joining (Apache Kafka would expire the leader and assign). The stack's
/// remedy, a broker restart that forgets the groups' membership, ends it.
#[tokio::test]
async fn a_rebalance_that_never_completes_is_reported_and_a_stack_restart_ends_it() {
    let timeout = [("KAFKA_SESSION_TIMEOUT_MS", "6000")];
    // A broker of its own: the stuck group stays in its storage for good.
    let (_storage, broker, env, leader) = on_own_broker(&timeout).await;
    leader.kill();
    let other = env.spawn_with(&timeout);
    other
        .wait_for_log(
            "no partition assignment since joining the group",
            Duration::from_secs(60),
        )
        .await;
    let ready = other.get("/readyz").await;
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["kafka_assignment"], "waiting");
    let broker = broker.restart_forgetting_groups();
    other
        .wait_for_log(
            "the group assigned partitions at last",
            Duration::from_secs(90),
        )
        .await;
    other.wait_ready().await;
    drop(broker);
}

fn env_outage() -> Duration {
    Duration::from_secs(setting("FAULT_ENV_OUTAGE_SECS", 10))
}

async fn wait_paused_by(service: &Service, cause: &str) {
    service.wait_unready(cause, ("ingest", "paused")).await;
}

/// Time paused is counted, `cause` was logged, and every pause ended. Within
/// one pause each wording of a cause is told once, never once per retry: on
/// pausing or as a change of cause while paused (a fault can first show as
/// another, e.g. ended sessions before a refused password; or be met in two
/// places, e.g. INSERT refused on `items` by a batch that had written
/// `orders` before the revoke, then on `orders` by its retry). A fault may
/// pause ingest more than once: a full disk lets a few orders into the free
/// space left in its pages between pauses. (A long stream can also pause on a
/// busy local broker; such pauses are logged on their own lines, each ended too.)
async fn assert_each_pause_told_once(service: &Service, cause: &str) {
    assert!(service.metric("ingest_paused_seconds_total").await > 0.0);
    let logs = service.log_text();
    let (mut paused, mut resumed, mut told) = (0, 0, 0);
    let mut this_pause: HashSet<&str> = HashSet::new();
    for line in logs.lines() {
        if line.contains("ingest resumed") {
            resumed += 1;
            this_pause.clear();
            continue;
        }
        if line.contains("ingest paused") {
            paused += 1;
        } else if !line.contains("the cause changed") {
            continue;
        }
        let Some(wording) = line.split("\"cause\":").nth(1) else {
            continue;
        };
        if wording.contains(cause) {
            told += 1;
            assert!(
                this_pause.insert(wording),
                "told twice in one pause: {logs}"
            );
        }
    }
    assert!(told > 0, "{logs}");
    assert_eq!(resumed, paused, "{logs}");
}

/// One fault of the environment during the stream: `begin` it at a random
/// moment, wait until `/readyz` names `cause`, let it last, `end` it, then
/// reconcile. Not one valid order may be dead-lettered for it.
async fn environment_fault(
    env: &TestEnv,
    service: &Service,
    label: &str,
    cause: &str,
    begin: impl std::future::Future<Output = ()>,
    end: impl std::future::Future<Output = ()>,
) {
    let mut seed = Seed::new(label);
    let stream = Stream::start(env, seed.value);
    pause(seed.random_point(0.4)).await;
    begin.await;
    wait_paused_by(service, cause).await;
    pause(env_outage()).await;
    end.await;
    let delivered = stream.finish().await;
    let scenario = format!("{label} {} s", env_outage().as_secs());
    reconcile(env, &scenario, delivered, service, Some(service)).await;
    assert_each_pause_told_once(service, cause).await;
}

/// (u) Clients opening more connections than the service may hold (live
/// feeds, as from many open pages; those past the feeds' share are refused)
/// under an open-files limit the service cannot raise, while its PostgreSQL
/// sessions are ended: ingest opens new ones and goes on storing, the
/// connections past the limit wait, and no file runs out.
#[tokio::test]
async fn clients_hold_every_connection_while_postgres_sessions_end() {
    const LIMIT: u64 = 256;
    let env = TestEnv::new().await;
    let service = Service::spawn_with_open_files(env.service_env(), LIMIT, LIMIT);
    service.wait_ready().await;
    let allowed = service.metric("http_connections_limit").await;
    assert_eq!(
        allowed,
        (LIMIT / 2) as f64,
        "half of a small limit is the clients'"
    );
    let scenario = "(u) clients hold every connection";
    let mut seed = Seed::new(scenario);
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.3)).await;

    let mut feeds = Vec::new();
    for _ in 0..LIMIT + 50 {
        feeds.push(service.hold_feed().await);
    }
    service
        .wait_for_log("the most allowed", Duration::from_secs(30))
        .await;
    env.end_service_sessions().await;
    let stored = || env.count("SELECT count(*) FROM orders");
    let before = stored().await;
    helpers::eventually(
        Duration::from_secs(30),
        || async { (stored().await >= before + 50).then_some(()) },
        || "ingest stopped storing while clients held every connection".into(),
    )
    .await;
    drop(feeds);

    let delivered = stream.finish().await;
    reconcile(&env, scenario, delivered, &service, Some(&service)).await;
    let logs = service.log_text();
    assert!(
        !logs.contains("Too many open files"),
        "files ran out:\n{logs}"
    );
    assert_eq!(
        logs.matches("the most allowed").count(),
        1,
        "the limit is told once a minute:\n{logs}"
    );
}

/// A DBA's permission slip: INSERT on the order tables revoked from the
/// service role mid-stream, then granted back.
#[tokio::test]
async fn insert_revoked_then_granted() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let (tables, role) = ("orders, deliveries, payments, items", &env.service_role);
    let revoke = format!("REVOKE INSERT ON {tables} FROM {role}");
    let grant = format!("GRANT INSERT ON {tables} TO {role}");
    environment_fault(
        &env,
        &service,
        "(f) INSERT revoked",
        "permission denied for table",
        env.execute(&revoke),
        env.execute(&grant),
    )
    .await;
}

/// A table the service writes gone mid-stream (renamed, as by a migration
/// that swaps tables; SQLSTATE 42P01), then back under its name. The sibling
/// of (h), where the tables are missing from the start.
#[tokio::test]
async fn orders_table_renamed_then_restored() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    environment_fault(
        &env,
        &service,
        "(q) orders table renamed",
        "does not exist",
        env.execute("ALTER TABLE orders RENAME TO orders_renamed"),
        env.execute("ALTER TABLE orders_renamed RENAME TO orders"),
    )
    .await;
}

/// (v) A column added mid-stream that every new row must fill, as a DBA
/// readies the tables for a future writer (NOT NULL with a default to fill
/// the rows there, the default then dropped; SQLSTATE 23502), then dropped.
/// A data error for every order, yet no order is at fault: the sample order
/// is refused too, so ingest pauses instead of dead-lettering valid orders.
#[tokio::test]
async fn a_column_every_row_must_fill_added_then_dropped() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    environment_fault(
        &env,
        &service,
        "(v) a column every row must fill added",
        "refuses the sample order too",
        async {
            env.execute("ALTER TABLE items ADD COLUMN size_code text NOT NULL DEFAULT 'M'")
                .await;
            env.execute("ALTER TABLE items ALTER COLUMN size_code DROP DEFAULT")
                .await;
        },
        env.execute("ALTER TABLE items DROP COLUMN size_code"),
    )
    .await;
}

/// The dead-letter record refused (its grant revoked) after the letters are
/// acknowledged, then a crash: the letters are on the topic and nothing is
/// committed. The instance restarted the same way, with the grant back,
/// records each letter exactly once and sends none again.
#[tokio::test]
async fn crash_between_the_letters_and_their_record() {
    let env = TestEnv::new().await;
    let role = &env.service_role;
    env.execute(&format!("REVOKE INSERT ON dead_letters FROM {role}"))
        .await;
    let addr = format!("127.0.0.1:{}", free_port());
    let spawn = || env.spawn_with(&[("HTTP_ADDR", addr.as_str())]);
    let service = spawn();
    service.wait_ready().await;
    let valid: Vec<(String, Vec<u8>)> = (0..2)
        .map(|i| {
            let uid = format!("crash-valid-{i}");
            (uid.clone(), sample_with_uid(&uid).to_string().into_bytes())
        })
        .collect();
    let mut messages: Vec<(Option<&str>, &[u8])> = valid
        .iter()
        .map(|(uid, bytes)| (Some(uid.as_str()), bytes.as_slice()))
        .collect();
    messages.extend([
        (Some("crash-bad-0"), &b"not json"[..]),
        (Some("crash-bad-1"), &br#"{"order_uid":"crash-bad-1""#[..]),
        (Some("crash-bad-2"), &b"[]"[..]),
    ]);
    env.produce(&messages).await;
    wait_paused_by(&service, "permission denied for table dead_letters").await;
    // The batch that paused sent its letters; a later one may wait in hand.
    let sent = env.dead_letters(3, Duration::from_secs(5)).len();
    assert!((1..=3).contains(&sent), "{sent} letters before the crash");
    // (A batch without letters may have been committed meanwhile.)
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);

    service.kill();
    env.execute(&format!("GRANT INSERT ON dead_letters TO {role}"))
        .await;
    let service = spawn();
    env.wait_for_count("SELECT count(*) FROM orders", 2, Duration::from_secs(60))
        .await;
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters",
        3,
        Duration::from_secs(30),
    )
    .await;
    service.wait_ready().await;
    let letters = env.dead_letters(3, Duration::from_secs(10));
    assert_eq!(letters.len(), 3, "no letter sent twice: {letters:#?}");
    let mut on_topic: Vec<(i32, i64)> = letters.iter().map(Record::source).collect();
    let mut recorded: Vec<(i32, i64)> =
        sqlx::query_as("SELECT source_partition, source_offset FROM dead_letters ORDER BY 1, 2")
            .fetch_all(&env.db)
            .await
            .unwrap();
    on_topic.sort_unstable();
    recorded.sort_unstable();
    assert_eq!(recorded, on_topic, "one record per letter");
}

/// A failover to a read-only server and back: the database turns read-only
/// for new sessions, the service's sessions are cut, then it turns writable.
#[tokio::test]
async fn database_read_only_then_writable() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let begin = async {
        env.set_read_only(true).await;
        env.end_service_sessions().await;
    };
    environment_fault(
        &env,
        &service,
        "(g) database read-only",
        "read-only transaction",
        begin,
        env.set_read_only(false),
    )
    .await;
}

/// The database refuses new sessions (its connection limit reached, SQLSTATE
/// 53300) and the service's sessions are ended: every reconnection is refused
/// until the limit is lifted.
#[tokio::test]
async fn connections_refused_then_allowed() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let limit = |n: i32| format!("ALTER DATABASE {} CONNECTION LIMIT {n}", env.name);
    let begin = async {
        // Opened first: the limit refuses new sessions, not this one.
        let mut own = env.service_session().await;
        env.execute(&limit(0)).await;
        crate::helpers::end_other_sessions(&mut own).await;
    };
    environment_fault(
        &env,
        &service,
        "(m) connections refused",
        "too many connections",
        begin,
        env.execute(&limit(-1)),
    )
    .await;
}

/// The disk under the orders table fills up mid-stream (PostgreSQL refuses
/// the next page with SQLSTATE 53100), then space is freed. A full disk is
/// the environment's fault: ingest pauses naming it, not one order is
/// dead-lettered for it, and it resumes by itself. (The write-ahead log stays
/// on the server's own disk: a full log stops the server, which
/// `postgres_crashed_and_restarted` covers.)
#[tokio::test]
async fn disk_full_then_space_freed() {
    let server = PostgresServer::start().await;
    let disk = server
        .tablespace_on_small_disk("small_disk", 64 << 20)
        .await;
    let env = TestEnv::on_postgres(server.admin()).await;
    let mut superuser = sqlx::ConnectOptions::connect(&server.superuser(&env.name))
        .await
        .unwrap();
    sqlx::query("ALTER TABLE orders SET TABLESPACE small_disk")
        .execute(&mut superuser)
        .await
        .unwrap();
    let service = env.spawn_with(&[("INGEST_MAX_BACKOFF_MS", "1000")]);
    service.wait_ready().await;
    environment_fault(
        &env,
        &service,
        "(o) disk full",
        "No space left on device",
        async { disk.fill() },
        async { disk.resize(64 << 20) },
    )
    .await;
}

/// The broker's disk full: it still hands out what it holds, but cannot
/// take the letters of the bad messages among them (nor, on the local broker,
/// the group's join). Nothing is dead-lettered or recorded for the fault, the
/// instance is not ready, and librdkafka's retries are not logged one line
/// each; once space is freed every message is stored or dead-lettered, once.
#[tokio::test]
async fn broker_disk_full_then_space_freed() {
    let disk = SmallDisk::mount(64 << 20, None);
    let broker = Broker::start(disk.path().to_owned(), free_port());
    let env = TestEnv::on_broker(format!("127.0.0.1:{}", broker.port), PARTITIONS).await;
    let orders = helpers::generated_orders(23, 200);
    helpers::produce_orders(&env, &orders).await;
    let bad: Vec<String> = (0..20).map(|i| format!("{{bad-{i}")).collect();
    let bad: Vec<(Option<&str>, &[u8])> = bad.iter().map(|b| (None, b.as_bytes())).collect();
    env.produce(&bad).await;
    disk.fill();

    let service = env.spawn();
    pause(env_outage()).await;
    assert_eq!(service.get("/readyz").await.status(), 503);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    let logs = service.log_text();
    let mut lines: HashMap<&str, usize> = HashMap::new();
    for line in logs.lines().filter(|l| l.contains("\"librdkafka: ")) {
        let message = line.split("\"message\":").nth(1).unwrap_or(line);
        *lines.entry(message).or_default() += 1;
    }
    assert!(
        lines.values().all(|&n| n == 1),
        "a line logged again within the minute: {lines:#?}"
    );

    disk.resize(64 << 20);
    env.wait_for_committed(220, Duration::from_secs(90)).await;
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 200);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 20);
    let letters = env.dead_letters(20, Duration::from_secs(10));
    let sources: HashSet<(i32, i64)> = letters.iter().map(Record::source).collect();
    assert_eq!((letters.len(), sources.len()), (20, 20), "{letters:#?}");
    drop(broker);
}

/// `serve` started before `migrate`: it waits, naming the missing table,
/// and takes the whole stream in once the tables exist.
#[tokio::test]
async fn served_before_migrations() {
    let env = TestEnv::unmigrated().await;
    let service = env.spawn();
    let mut seed = Seed::new("(h)");
    let stream = Stream::start(&env, seed.value);
    wait_paused_by(&service, "does not exist").await;
    // Its partitions' positions are unread: readiness says so.
    service
        .wait_unready("stored positions", ("kafka_assignment", "loading"))
        .await;
    pause(seed.random_point(0.5)).await;
    env.migrate().await;
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(h) serve before migrate",
        delivered,
        &service,
        Some(&service),
    )
    .await;
    assert_each_pause_told_once(&service, "does not exist").await;
}

/// The service role's password changed and its sessions ended (as when a
/// secret is rotated before the service has the new one), then changed back.
/// Uses a role of the tests' own, whose host connections always check the
/// password (scripts/stack sets it up).
#[tokio::test]
async fn password_changed_then_restored() {
    let role = std::env::var("TEST_ROTATING_ROLE").unwrap_or("order_service_rotating".into());
    let password =
        std::env::var("TEST_ROTATING_PASSWORD").unwrap_or("order_service_rotating_local".into());
    let env = TestEnv::new().await;
    let url = env.service_url_as(&role, &password).await;
    let service = env.spawn_with(&[("DATABASE_URL", url.as_str())]);
    service.wait_ready().await;
    // A role may change its own password; this session outlives the change.
    let own = tokio::sync::Mutex::new(
        sqlx::ConnectOptions::connect(
            &<sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&url).unwrap(),
        )
        .await
        .expect("connect as the rotating role"),
    );
    let set_password = |p: String| {
        let own = &own;
        async move {
            let mut own = own.lock().await;
            sqlx::query(&format!("ALTER ROLE CURRENT_USER PASSWORD '{p}'"))
                .execute(&mut *own)
                .await
                .unwrap();
        }
    };
    let begin = async {
        set_password("rotated-elsewhere".into()).await;
        crate::helpers::end_other_sessions(&mut *own.lock().await).await;
    };
    environment_fault(
        &env,
        &service,
        "(i) password changed",
        "password authentication failed",
        begin,
        set_password(password.clone()),
    )
    .await;
}
