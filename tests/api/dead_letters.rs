use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{sample_with_uid, Service, TcpProxy, TestEnv};

const COUNT_LETTERS: &str = "SELECT count(*) FROM dead_letters";
const NOT_UTF8: &[u8] = b"\xff\xfe not utf-8";

async fn json_of(service: &Service, path: &str) -> Value {
    let response = service.get(path).await;
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

fn uids(page: &Value) -> Vec<&str> {
    page["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["order_uid"].as_str().unwrap_or("-"))
        .collect()
}

/// `order-service dead-letters ARGS` against this test's database and topics.
fn dead_letters_cli(env: &TestEnv, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-service"));
    command
        .arg("dead-letters")
        .args(args)
        .env_clear()
        .envs(env.service_env());
    command
}

/// Runs `dead_letters_cli`; its exit status, stdout and stderr.
fn dead_letters_command(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    outcome(dead_letters_cli(env, args).output().unwrap())
}

fn outcome(out: Output) -> (bool, String, String) {
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every rejected message is recorded with its reasons and can be found by
/// the id it claimed (even from a truncated order), its key, its stage or its
/// time; its payload is served as a JSON string; the order's 404 says why.
#[tokio::test]
async fn dead_letters_are_recorded_searchable_and_served_as_data() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let mut bad = sample_with_uid("dl-bad");
    bad["payment"]["amount"] = json!(-1);
    let bad = bad.to_string();
    let hostile =
        r#"{"order_uid":"dl-xss","entry":"<script>alert(1)</script><img src=x onerror=alert(2)>"}"#;
    let valid = sample_with_uid("dl-valid").to_string();
    env.produce(&[
        (Some("dl-valid"), valid.as_bytes()),
        (Some("dl-bad"), bad.as_bytes()),
        (None, br#"{"order_uid":"dl-cut","track_number":"#),
        (Some("dl-xss"), hostile.as_bytes()),
        (Some("raw-key"), NOT_UTF8),
    ])
    .await;
    env.wait_for_count(COUNT_LETTERS, 4, Duration::from_secs(30))
        .await;
    service
        .wait_for_order("dl-valid", Duration::from_secs(10))
        .await;

    let all = json_of(&service, "/api/dead-letters").await;
    let mut found = uids(&all);
    found.sort_unstable();
    // Not an order at all: its key, a valid id, stands in.
    assert_eq!(found, ["dl-bad", "dl-cut", "dl-xss", "raw-key"], "{all:#}");
    assert_eq!(all["next_cursor"], Value::Null);
    let by_uid = |uid: &str| {
        all["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["order_uid"] == uid)
            .unwrap()
            .clone()
    };
    let letter = by_uid("dl-bad");
    assert_eq!(letter["stage"], "validate");
    assert_eq!(letter["key"], "dl-bad");
    assert_eq!(letter["source"]["topic"], env.topic.as_str());
    assert_eq!(letter["payload_bytes"], bad.len());
    assert!(
        letter["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("payment.amount"),
        "{letter}"
    );
    assert_eq!(by_uid("dl-cut")["stage"], "parse");
    assert_eq!(by_uid("dl-cut")["key"], Value::Null);

    // Newest first, page by page, with no overlap.
    let mut paged = Vec::new();
    let mut path = "/api/dead-letters?limit=3".to_owned();
    loop {
        let page = json_of(&service, &path).await;
        paged.extend(uids(&page).into_iter().map(str::to_owned));
        let Some(cursor) = page["next_cursor"].as_str() else {
            break;
        };
        path = format!("/api/dead-letters?limit=3&before={cursor}");
    }
    assert_eq!(paged, uids(&all), "pages follow the full list");

    for (query, expected) in [
        ("order_uid=dl-bad", vec!["dl-bad"]),
        ("key=dl-xss", vec!["dl-xss"]),
        ("key=raw-key&stage=parse", vec!["raw-key"]),
        ("stage=parse&order_uid=dl-cut", vec!["dl-cut"]),
        ("stage=conflict", vec![]),
        ("since=2999-01-01T00:00:00Z", vec![]),
        ("order_uid=dl-valid", vec![]),
    ] {
        let page = json_of(&service, &format!("/api/dead-letters?{query}")).await;
        assert_eq!(uids(&page), expected, "{query}");
    }
    let since = json_of(
        &service,
        "/api/dead-letters?since=2000-01-01T00:00:00%2B02:00",
    )
    .await;
    assert_eq!(uids(&since).len(), 4);
    for (query, reason) in [
        (
            "stage=bogus",
            "stage must be one of too_large, parse, validate, conflict, store",
        ),
        (
            "since=yesterday",
            "since must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z",
        ),
        ("limit=0", "limit must be a whole number from 1 to 100"),
        (
            "uid=x",
            "unknown parameter \"uid\"; use order_uid, key, stage, since, limit, before",
        ),
    ] {
        let response = service.get(&format!("/api/dead-letters?{query}")).await;
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], reason, "{query}");
    }

    // One letter, its payload as data.
    let href = by_uid("dl-xss")["href"].as_str().unwrap().to_owned();
    let response = service.get(&href).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "never served as a document"
    );
    let one: Value = response.json().await.unwrap();
    assert_eq!(one["payload_preview"], hostile);
    assert_eq!(one["payload_complete"], true);
    assert_eq!(one["payload_utf8"], true);
    assert_eq!(one["stage"], "validate");
    let raw = json_of(&service, by_uid("raw-key")["href"].as_str().unwrap()).await;
    assert_eq!(raw["payload_utf8"], false);
    assert_eq!(raw["payload_bytes"], NOT_UTF8.len());
    let topic = &env.topic;
    for (path, status) in [
        (format!("/api/dead-letters/{topic}/0/999999"), 404),
        ("/api/dead-letters/no-such-topic/0/0".to_owned(), 404),
        (format!("/api/dead-letters/{topic}/zero/1"), 400),
        (format!("/api/dead-letters/{topic}/0/%d1"), 400),
        ("/api/dead-letters/%ff/0/1".to_owned(), 400),
    ] {
        let response = service.get(&path).await;
        assert_eq!(response.status(), status, "{path}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{path}: {body}");
    }

    // The order's 404 says why it is not here.
    let response = service.get("/order/dl-bad").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "order not found");
    assert_eq!(body["dead_letters"][0]["stage"], "validate");
    assert_eq!(body["dead_letters"][0]["href"], by_uid("dl-bad")["href"]);
    let body: Value = service.get("/order/never-sent").await.json().await.unwrap();
    assert_eq!(
        body,
        json!({ "error": "order not found", "order_uid": "never-sent" })
    );
}

/// A record keeps the first DEAD_LETTER_PREVIEW_BYTES of a payload; a letter
/// held only in part, or too large to have been read, is not replayed, and
/// the summary says so.
#[tokio::test]
async fn a_record_keeps_the_first_bytes_and_a_partial_letter_is_not_replayed() {
    let env = TestEnv::new().await;
    let service = env.spawn_with(&[
        ("DEAD_LETTER_PREVIEW_BYTES", "10"),
        ("MAX_MESSAGE_BYTES", "2000"),
    ]);
    service.wait_ready().await;
    let long = format!(r#"{{"order_uid":"dl-long","entry":"{}""#, "x".repeat(100));
    let huge = format!(
        r#"{{"order_uid":"dl-huge","entry":"{}"}}"#,
        "y".repeat(3000)
    );
    env.produce(&[
        (Some("dl-long"), long.as_bytes()),
        (Some("dl-huge"), huge.as_bytes()),
    ])
    .await;
    env.wait_for_count(COUNT_LETTERS, 2, Duration::from_secs(30))
        .await;
    let list = json_of(&service, "/api/dead-letters?order_uid=dl-long").await;
    let one = json_of(&service, list["dead_letters"][0]["href"].as_str().unwrap()).await;
    assert_eq!(one["payload_bytes"], long.len());
    assert_eq!(one["payload_preview"], &long[..10]);
    assert_eq!(one["payload_preview_bytes"], 10);
    assert_eq!(one["payload_complete"], false);
    let list = json_of(&service, "/api/dead-letters?key=dl-huge").await;
    let one = json_of(&service, list["dead_letters"][0]["href"].as_str().unwrap()).await;
    assert_eq!(one["stage"], "too_large");
    assert_eq!(one["order_uid"], "dl-huge", "the key stands in for the id");
    assert_eq!(one["payload_bytes"], huge.len());
    assert_eq!(one["payload_preview"], "");

    let (ok, stdout, stderr) = dead_letters_command(&env, &["replay"]);
    assert!(ok, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("2 letter(s) selected; replayed 0, delivered 0, failed 0")
            && stderr.contains("skipped 2: 1 too large to have been read, 1 held only in part")
            && stderr.contains(&format!("its record holds 10 of {} bytes", long.len())),
        "{stderr}"
    );
}

/// The upstream fault is mended (here: the item limit raised), the letters
/// are replayed and their orders stored; a message rejected again gets a new
/// letter linked to the first; replaying twice stores nothing twice and never
/// replays a replay.
#[tokio::test]
async fn replayed_letters_are_stored_once_and_rejected_ones_link_back() {
    let env = TestEnv::new().await;
    let strict = env.spawn_with(&[("MAX_ITEMS", "1")]);
    strict.wait_ready().await;
    let orders: Vec<(String, String)> = (1..=3)
        .map(|i| {
            let uid = format!("rp-{i}");
            let mut order = sample_with_uid(&uid);
            let item = order["items"][0].clone();
            order["items"].as_array_mut().unwrap().push(item);
            order["payment"]["goods_total"] = json!(634);
            order["payment"]["amount"] = json!(2134);
            (uid, order.to_string())
        })
        .collect();
    let mut messages: Vec<(Option<&str>, &[u8])> = orders
        .iter()
        .map(|(uid, o)| (Some(uid.as_str()), o.as_bytes()))
        .collect();
    messages.push((Some("rp-bad"), br#"{"order_uid":"rp-bad""#));
    env.produce(&messages).await;
    env.wait_for_count(COUNT_LETTERS, 4, Duration::from_secs(30))
        .await;

    let (ok, stdout, stderr) =
        dead_letters_command(&env, &["replay", "--dry-run", "--stage", "validate"]);
    assert!(ok, "{stderr}");
    let listed: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut listed: Vec<&str> = listed
        .iter()
        .map(|l| l["order_uid"].as_str().unwrap())
        .collect();
    listed.sort_unstable();
    assert_eq!(listed, ["rp-1", "rp-2", "rp-3"]);
    assert!(
        stderr.contains("3 letter(s) selected; would replay 3"),
        "{stderr}"
    );
    let (ok, _, stderr) = dead_letters_command(&env, &["replay", "--stage", "nonsense"]);
    assert!(
        !ok && stderr.contains("invalid value 'nonsense'"),
        "{stderr}"
    );

    // Mended: the service runs with the default item limit again.
    strict.terminate();
    let service = env.spawn();
    service.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A replay sent then would be an order now, or a letter more.
    assert_eq!(
        env.count("SELECT count(*) FROM orders").await,
        0,
        "dry run sent nothing"
    );
    assert_eq!(env.count(COUNT_LETTERS).await, 4, "dry run sent nothing");

    let (ok, _, stderr) = dead_letters_command(&env, &["replay"]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("4 letter(s) selected; replayed 4, delivered 4"),
        "{stderr}"
    );
    env.wait_for_count(COUNT_LETTERS, 5, Duration::from_secs(30))
        .await;
    env.wait_for_count("SELECT count(*) FROM orders", 3, Duration::from_secs(30))
        .await;
    let order = service
        .wait_for_order("rp-2", Duration::from_secs(10))
        .await;
    assert_eq!(order["items"].as_array().unwrap().len(), 2);
    let (first, again): (String, String) = sqlx::query_as(
        "SELECT a.source_topic || '/' || a.source_partition || '/' || a.source_offset, b.replay_of
         FROM dead_letters a JOIN dead_letters b ON b.order_uid = a.order_uid AND b.id > a.id
         WHERE a.order_uid = 'rp-bad'",
    )
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert_eq!(
        again, first,
        "the new letter names the one it was replayed from"
    );
    let letters = env.dead_letters(5, Duration::from_secs(10));
    assert_eq!(
        letters
            .iter()
            .filter(|l| l.header("dlq-replay-of") == first)
            .count(),
        1,
        "the letter on the topic links back too"
    );

    // Twice: the three orders are duplicates now; rp-bad's original is
    // replayed again, its first replay's letter is not.
    let (ok, _, stderr) = dead_letters_command(&env, &["replay"]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("4 letter(s) selected; replayed 4"),
        "{stderr}"
    );
    env.wait_for_count(COUNT_LETTERS, 6, Duration::from_secs(30))
        .await;
    let mut replays = (0.0, 0.0, 0.0);
    for _ in 0..100 {
        replays = (
            service
                .metric("orders_replays_total{outcome=\"stored\"}")
                .await,
            service
                .metric("orders_replays_total{outcome=\"duplicate\"}")
                .await,
            service
                .metric("orders_replays_total{outcome=\"dead_lettered\"}")
                .await,
        );
        if replays == (3.0, 3.0, 2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(replays, (3.0, 3.0, 2.0), "stored, duplicate, dead_lettered");
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 3);
    assert_eq!(env.count("SELECT count(*) FROM items").await, 6);

    let (ok, stdout, stderr) = dead_letters_command(&env, &["list", "--order-uid", "rp-bad"]);
    assert!(ok, "{stderr}");
    let listed: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0]["replay_of"], first.as_str(), "newest first");
    assert_eq!(listed[2]["replay_of"], Value::Null);
    let (ok, stdout, _) = dead_letters_command(&env, &["list", "--limit", "1"]);
    assert!(ok);
    assert_eq!(stdout.lines().count(), 1);
}

/// A database that falls silent while a page of letters is read (its host
/// lost, a network that drops packets) ends `list` and `replay` with the
/// reason after `INGEST_WRITE_TIMEOUT_MS`, for the script that ran them,
/// instead of leaving them waiting for good.
#[tokio::test]
async fn a_database_silent_mid_read_ends_the_command_with_its_reason() {
    let env = TestEnv::new().await;
    let proxy = TcpProxy::start(env.postgres_addr()).await;
    for command in ["list", "replay"] {
        let lock = env.lock_table("dead_letters").await;
        let child = dead_letters_cli(&env, &[command])
            .env("DATABASE_URL", env.service_url_via(&proxy))
            .env("INGEST_WRITE_TIMEOUT_MS", "2000")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().to_string();
        env.wait_for_lock_waiters(1).await;
        proxy.silence();
        lock.rollback().await.unwrap();
        let finished = tokio::task::spawn_blocking(move || child.wait_with_output());
        let Ok(out) = tokio::time::timeout(Duration::from_secs(60), finished).await else {
            Command::new("kill").args(["-KILL", &pid]).status().unwrap();
            panic!("dead-letters {command} still waited 60 s after the database fell silent");
        };
        let (ok, _, stderr) = outcome(out.unwrap().unwrap());
        assert!(!ok, "dead-letters {command} succeeded: {stderr}");
        assert!(
            stderr.contains("DATABASE_URL: cannot read dead letters")
                && stderr.contains("no answer within 2000 ms"),
            "dead-letters {command}: {stderr}"
        );
        proxy.restore();
    }
}
