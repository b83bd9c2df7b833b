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
//!
//! By what fails: `process` (the service killed, stopped or frozen),
//! `databases` (PostgreSQL and Redis away, crashed or frozen), `broker` (the
//! broker restarted, frozen, losing data or out of disk) and `environment`
//! (grants, schema, connections, disk and password of PostgreSQL).

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

mod broker;
mod databases;
mod environment;
mod process;

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

/// Waits until `share` orders are stored.
async fn stored_at_least(env: &TestEnv, share: i64) {
    helpers::eventually(
        Duration::from_secs(120),
        || async { (env.count("SELECT count(*) FROM orders").await >= share).then_some(()) },
        || format!("never stored {share} orders"),
    )
    .await;
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
