use std::collections::HashSet;
use std::time::{Duration, Instant};

use order_service::producer::{Generator, InvalidKind};

use crate::helpers::{generated_orders, produce_orders, store_orders, TestEnv};

const DASHBOARD: &str = include_str!("../../deploy/grafana/dashboards/order-service.json");
/// PromQL words and label names that appear in the dashboard's queries.
const NOT_METRICS: &[&str] = &[
    "sum",
    "rate",
    "by",
    "max",
    "histogram_quantile",
    "le",
    "stage",
    "tier",
    "result",
    "route",
    "status",
    "partition",
    "outcome",
];

#[tokio::test]
async fn metrics_count_a_known_workload_exactly() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let orders = generated_orders(101, 5);
    let mut generator = Generator::new(102, 5);
    let invalid: Vec<String> = [InvalidKind::Email, InvalidKind::Currency]
        .iter()
        .map(|k| generator.invalid(*k).to_string())
        .collect();
    store_orders(&env, &orders).await;
    let mut rest: Vec<(Option<&str>, &[u8])> =
        invalid.iter().map(|b| (None, b.as_bytes())).collect();
    rest.push((Some(orders[0].0.as_str()), &orders[0].1));
    env.produce(&rest).await;
    assert_eq!(env.dead_letters(2, Duration::from_secs(30)).len(), 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while service.metric("orders_duplicates_total").await < 1.0 {
        assert!(Instant::now() < deadline, "duplicate never counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (uid, _) in &orders[..3] {
        assert_eq!(service.get(&format!("/order/{uid}")).await.status(), 200);
    }
    assert_eq!(service.get("/order/no-such-order").await.status(), 404);

    assert_eq!(service.metric("orders_messages_consumed_total").await, 8.0);
    assert_eq!(service.metric("orders_stored_total").await, 5.0);
    assert_eq!(service.metric("orders_duplicates_total").await, 1.0);
    assert_eq!(
        service
            .metric("orders_dead_letters_total{stage=\"validate\"}")
            .await,
        2.0
    );
    assert_eq!(
        service
            .metric("http_requests_total{route=\"/order/{order_uid}\",status=\"200\"}")
            .await,
        3.0
    );
    assert_eq!(
        service
            .metric("http_requests_total{route=\"/order/{order_uid}\",status=\"404\"}")
            .await,
        1.0
    );
    assert_eq!(
        service
            .metric("cache_requests_total{result=\"hit\",tier=\"memory\"}")
            .await,
        3.0
    );
    assert_eq!(service.metric("cache_entries").await, 5.0);
    assert_eq!(service.metric("ingest_consumer_paused").await, 0.0);
    assert_eq!(service.metric("ingest_paused_seconds_total").await, 0.0);
    // Every consumed message is timed from the broker to its commit.
    assert_eq!(
        service
            .metric("ingest_stage_duration_seconds_count{stage=\"broker_to_commit\"}")
            .await,
        8.0
    );
    assert!(
        service
            .metric("ingest_stage_duration_seconds_count{stage=\"commit_to_visible\"}")
            .await
            >= 1.0
    );
    let text = service.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("ingest_batch_commit_duration_seconds_count"),
        "{text}"
    );
    assert!(text.contains(&format!(
        "order_service_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    // Lag comes from librdkafka's statistics, every 5 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !service
        .get("/metrics")
        .await
        .text()
        .await
        .unwrap()
        .contains("ingest_consumer_lag_messages{partition=")
    {
        assert!(Instant::now() < deadline, "no consumer lag reported");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn every_dashboard_query_names_an_exported_metric() {
    let dashboard: serde_json::Value =
        serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    // One order and one request, so every family has a series; per-partition lag
    // comes with librdkafka's statistics (every 5 s).
    produce_orders(&env, &generated_orders(103, 1)).await;
    env.wait_for_count("SELECT count(*) FROM orders", 1, Duration::from_secs(30))
        .await;
    let _ = service.get("/order/no-such-order").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut text = service.get("/metrics").await.text().await.unwrap();
    while !text.contains("# TYPE ingest_consumer_lag_messages") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        text = service.get("/metrics").await.text().await.unwrap();
    }
    let families: HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has a query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let expr_without_strings: String = expr.split('"').step_by(2).collect();
            let names: Vec<&str> = expr_without_strings
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|t| t.contains('_') || t.chars().all(|c| c.is_ascii_lowercase()))
                .filter(|t| !t.is_empty() && !t.chars().next().unwrap().is_ascii_digit())
                .filter(|t| !NOT_METRICS.contains(t) && !matches!(*t, "m" | "s"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
                assert!(
                    families.contains(family),
                    "{} queries {name}, which is not exported",
                    panel["title"]
                );
            }
        }
    }
}

/// A real Prometheus scrapes the running service and answers a query with
/// the exact count.
#[tokio::test]
async fn prometheus_scrapes_the_service() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    produce_orders(&env, &generated_orders(104, 7)).await;
    env.wait_for_count("SELECT count(*) FROM orders", 7, Duration::from_secs(30))
        .await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: order-service\n    static_configs:\n      - targets: [\"{}\"]\n",
            service.addr
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut prometheus = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus is installed (scripts/stack test installs it)");
    let query = format!("http://127.0.0.1:{port}/api/v1/query?query=orders_stored_total");
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        let answer = match reqwest::get(&query).await {
            Ok(r) => r.json::<serde_json::Value>().await.ok(),
            Err(_) => None,
        };
        if let Some(v) = answer
            .as_ref()
            .and_then(|a| a["data"]["result"][0]["value"][1].as_str())
        {
            break v.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned the series: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert_eq!(value, "7");
}
