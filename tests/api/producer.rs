use std::process::Command;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::helpers::{brokers, TestEnv, SAMPLE};

fn produce(env: &TestEnv, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_order-service"))
        .arg("produce")
        .args(args)
        .env_clear()
        .env("KAFKA_BROKERS", brokers())
        .env("KAFKA_TOPIC", &env.topic)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Messages in the topic, from the partitions' watermarks.
fn messages_in(topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            high - low
        })
        .sum()
}

#[tokio::test]
async fn a_counted_run_delivers_exactly_that_many() {
    let env = TestEnv::new().await;
    let (ok, summary) = produce(
        &env,
        &[
            "--count",
            "300",
            "--rate",
            "0",
            "--invalid-rate",
            "0.1",
            "--duplicate-rate",
            "0.05",
            "--malformed",
            "5",
        ],
    );
    assert!(ok, "{summary}");
    assert!(
        summary.contains("sent 300, delivered 300, failed 0"),
        "{summary}"
    );
    assert!(summary.contains("malformed  sent        5"), "{summary}");
    assert_eq!(messages_in(&env.topic), 300);
}

#[tokio::test]
async fn files_are_sent_as_json_arrays_or_ndjson() {
    let env = TestEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let sample: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    let array = dir.path().join("orders.json");
    std::fs::write(
        &array,
        serde_json::to_string_pretty(&vec![sample.clone(); 3]).unwrap(),
    )
    .unwrap();
    let ndjson = dir.path().join("orders.ndjson");
    std::fs::write(&ndjson, format!("{sample}\n{sample}\nnot json\n")).unwrap();

    let (ok, summary) = produce(&env, &["--file", array.to_str().unwrap(), "--rate", "0"]);
    assert!(
        ok && summary.contains("sent 3, delivered 3, failed 0"),
        "{summary}"
    );
    let (ok, summary) = produce(&env, &["--file", ndjson.to_str().unwrap(), "--rate", "500"]);
    assert!(
        ok && summary.contains("sent 3, delivered 3, failed 0"),
        "{summary}"
    );
    assert_eq!(messages_in(&env.topic), 6);
}

/// Every message `--file` would send, from a dry run's `--output`.
fn sent_from_file(env: &TestEnv, file: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let out = file.with_extension("out");
    let args = [
        &["--file", file.to_str().unwrap()],
        extra,
        &["--output", out.to_str().unwrap(), "--dry-run"],
    ]
    .concat();
    let (ok, summary) = produce(env, &args);
    assert!(ok, "{summary}");
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A broken line in an NDJSON file is sent as the message it is; its
/// neighbours are sent whole, each as its own message.
#[tokio::test]
async fn file_lines_are_sent_one_message_each_whatever_their_neighbours() {
    let env = TestEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let sample: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    for hostile in ["{", "[", "{\"order_uid\":", "not json", "{} {}", "null"] {
        let lines = [sample.to_string(), hostile.to_owned(), sample.to_string()];
        for (name, extra) in [
            ("orders.json", &[][..]),
            ("orders.ndjson", &[][..]),
            ("orders", &["--format", "ndjson"][..]),
        ] {
            let file = dir.path().join(name);
            std::fs::write(&file, lines.join("\n")).unwrap();
            assert_eq!(
                sent_from_file(&env, &file, extra),
                lines,
                "{hostile:?} in {name}"
            );
        }
    }
    // Pretty-printed documents one after another: one message each.
    let file = dir.path().join("pretty.json");
    let pretty = serde_json::to_string_pretty(&sample).unwrap();
    std::fs::write(&file, format!("{pretty}\n{pretty}\n")).unwrap();
    let sent = sent_from_file(&env, &file, &[]);
    assert_eq!(sent.len(), 2, "{sent:?}");
    for message in sent {
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&message).unwrap(),
            sample
        );
    }
}

#[tokio::test]
async fn a_file_document_over_the_message_limit_stops_the_run_with_its_position() {
    let env = TestEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orders.ndjson");
    let huge = format!("{{\"order_uid\":\"{}\"}}", "x".repeat(17 * 1024 * 1024));
    let sample: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    std::fs::write(&file, format!("{sample}\n{huge}\n{sample}\n")).unwrap();
    let out = dir.path().join("out.ndjson");
    let (ok, stderr) = produce(
        &env,
        &[
            "--file",
            file.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--dry-run",
        ],
    );
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "document #2 of {} is {} bytes; a message may have at most 16777216",
            file.display(),
            huge.len()
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn output_writes_what_would_be_sent() {
    let env = TestEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let dry_run = |out: &std::path::Path| {
        let out = out.to_str().unwrap().to_owned();
        let args = [
            "--count",
            "25",
            "--rate",
            "0",
            "--seed",
            "5",
            "--output",
            &out,
            "--dry-run",
        ];
        produce(&env, &args)
    };
    let out = dir.path().join("out.ndjson");
    let (ok, summary) = dry_run(&out);
    assert!(ok, "{summary}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 25);
    for line in text.lines() {
        order_service::domain::parse_order(line.as_bytes(), &Default::default())
            .expect("generated orders are valid");
    }
    assert_eq!(messages_in(&env.topic), 0, "a dry run sends nothing");
    // The same seed gives the same orders.
    let again = dir.path().join("again.ndjson");
    dry_run(&again);
    assert_eq!(std::fs::read_to_string(&again).unwrap(), text);
    // `-` is standard output, with the summary apart on standard error.
    let piped = Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(["produce", "--count", "25", "--rate", "0", "--seed", "5"])
        .args(["--output", "-", "--dry-run"])
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    assert!(piped.status.success());
    assert_eq!(String::from_utf8(piped.stdout).unwrap(), text);
    assert!(!dir.path().join("-").exists());
}

/// A run stopped by SIGTERM (a `kill`, `timeout`, a service manager) ends as
/// one stopped by Ctrl-C does: what was queued is delivered, the summary is
/// printed, and what it counts as delivered is what the topic holds.
#[tokio::test]
async fn sigterm_ends_a_run_with_its_summary() {
    let env = TestEnv::new().await;
    let child = Command::new(env!("CARGO_BIN_EXE_order-service"))
        .arg("produce")
        .args(["--rate", "200"])
        .env_clear()
        .env("KAFKA_BROKERS", brokers())
        .env("KAFKA_TOPIC", &env.topic)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let topic = env.topic.clone();
    crate::helpers::eventually(
        Duration::from_secs(30),
        || {
            let topic = topic.clone();
            async move {
                let n = tokio::task::spawn_blocking(move || messages_in(&topic))
                    .await
                    .unwrap();
                (n >= 100).then_some(())
            }
        },
        || "the run never reached 100 messages".into(),
    )
    .await;
    crate::helpers::signal(&child, "TERM");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{summary}");
    let delivered: i64 = summary
        .lines()
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[..] {
                ["sent", _, "delivered", n, "failed", "0", ..] => {
                    n.trim_end_matches(',').parse().ok()
                }
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("no summary:\n{summary}"));
    assert!(delivered >= 100, "{summary}");
    assert_eq!(messages_in(&env.topic), delivered, "{summary}");
}
