use std::collections::HashSet;
use std::time::{Duration, Instant};

use order_service::producer::{Generator, InvalidKind};

use crate::helpers::{generated_orders, produce_orders, store_orders, Service, TestEnv};

const DASHBOARD: &str = include_str!("../../deploy/grafana/dashboards/order-service.json");
const ALERTS: &str = include_str!("../../deploy/prometheus/alerts.yml");
/// PromQL words and label names that appear in the dashboard's and the
/// alerts' queries.
const NOT_METRICS: &[&str] = &[
    "sum",
    "rate",
    "deriv",
    "and",
    "by",
    "max",
    "histogram_quantile",
    "le",
    "instance",
    "job",
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
async fn every_dashboard_and_alert_query_names_an_exported_metric() {
    let dashboard: serde_json::Value =
        serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let families = exported_families().await;
    let alerts = alert_rules();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for (alert, expr) in &alerts {
        // `up` is Prometheus's own series of each scrape.
        for name in metric_names(expr).into_iter().filter(|n| n != "up") {
            assert!(
                families.contains(name.as_str()),
                "alert {alert} queries {name}, which is not exported"
            );
        }
    }
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has a query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                assert!(
                    families.contains(name.as_str()),
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

    let prometheus = Prometheus::start(&service.addr, false);
    let port = prometheus.port;
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
    drop(prometheus);
    assert_eq!(value, "7");
}

/// With the shipped alert rules (their `for:` waits cut to nothing), a real
/// Prometheus fires `OrderIngestPaused` while ingest is paused, and lets it
/// go once ingest runs again.
#[tokio::test]
async fn prometheus_fires_the_ingest_alert_while_ingest_is_paused() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let prometheus = Prometheus::start(&service.addr, true);
    let revoke = format!("ON orders FROM {}", env.service_role);
    env.execute(&format!("REVOKE INSERT {revoke}")).await;
    produce_orders(&env, &generated_orders(105, 3)).await;
    prometheus.wait_for_alert("OrderIngestPaused", true).await;
    env.execute(&format!(
        "GRANT INSERT {}",
        revoke.replacen("FROM", "TO", 1)
    ))
    .await;
    env.wait_for_count("SELECT count(*) FROM orders", 3, Duration::from_secs(30))
        .await;
    prometheus.wait_for_alert("OrderIngestPaused", false).await;
}

/// A Prometheus of the test's own, scraping `target` every second.
struct Prometheus {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// With `alerts`, it evaluates the shipped rules every second, each
    /// firing as soon as its condition holds.
    fn start(target: &str, alerts: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: order-service\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        if alerts {
            let immediate: String = ALERTS
                .lines()
                .map(|l| match l.split_once("for: ") {
                    Some((indent, _)) => format!("{indent}for: 0s\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            std::fs::write(dir.path().join("alerts.yml"), immediate).unwrap();
            config += "rule_files:\n  - alerts.yml\n";
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let port = crate::helpers::free_port();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus is installed (scripts/stack test installs it)");
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// Waits until the alert `name` fires (or, `firing` false, until it does not).
    async fn wait_for_alert(&self, name: &str, firing: bool) {
        let url = format!("http://127.0.0.1:{}/api/v1/alerts", self.port);
        crate::helpers::eventually(
            Duration::from_secs(60),
            || async {
                let alerts: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
                let fires = alerts["data"]["alerts"]
                    .as_array()?
                    .iter()
                    .any(|a| a["labels"]["alertname"] == name && a["state"] == "firing");
                (fires == firing).then_some(())
            },
            || format!("{name} never {}", if firing { "fired" } else { "ended" }),
        )
        .await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Each alert of the shipped rules, and its expression.
fn alert_rules() -> Vec<(String, String)> {
    let docs = yaml_rust2::YamlLoader::load_from_str(ALERTS).expect("the alert rules are YAML");
    docs[0]["groups"]
        .as_vec()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_vec().cloned().unwrap_or_default())
        .map(|rule| {
            let field = |key: &str| rule[key].as_str().unwrap_or_default().to_owned();
            (field("alert"), field("expr"))
        })
        .collect()
}

/// A reader of the service's stderr that stops reading (a stalled journal, a
/// paused pager) stops nothing: lookups, ingest and a stop go on, the lines
/// that do not fit are dropped and counted, and once stderr is read again the
/// service says how many were lost.
#[tokio::test]
async fn a_log_reader_that_stops_reading_stops_nothing() {
    let env = TestEnv::new().await;
    // Every lookup of an unknown order logs its two queries.
    let service = env.spawn_with(&[("RUST_LOG", "info,sqlx::query=debug")]);
    service.wait_ready().await;
    let held = service.stop_reading_logs().await;
    let mut lookups = 0;
    while service.metric("log_lines_dropped_total").await == 0.0 {
        assert!(lookups < 60_000, "no line dropped after {lookups} lookups");
        lookups += look_up_unknown_orders(&service).await;
    }
    let orders = generated_orders(104, 20);
    store_orders(&env, &orders).await;
    assert_eq!(
        service
            .get(&format!("/order/{}", orders[0].0))
            .await
            .status(),
        200
    );

    drop(held);
    service
        .wait_for_log("log lines dropped", Duration::from_secs(30))
        .await;
    // Unread again, past what the pipe holds, and then stopped.
    let _held = service.stop_reading_logs().await;
    look_up_unknown_orders(&service).await;
    service.terminate_within(Duration::from_secs(15));
}

/// 1 600 lookups of orders that do not exist, 16 at a time; each must be
/// answered 404 within 10 s. Returns how many were made.
async fn look_up_unknown_orders(service: &Service) -> usize {
    let mut lookups = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (client, url) = (service.client.clone(), service.url("/order/none"));
        lookups.spawn(async move {
            for i in 0..100 {
                let lookup = client.get(format!("{url}-{worker}-{i}"));
                let answer = lookup.timeout(Duration::from_secs(10)).send().await;
                assert_eq!(answer.expect("lookup answered").status(), 404);
            }
        });
    }
    while let Some(done) = lookups.join_next().await {
        done.unwrap();
    }
    1600
}

/// The metric families the service exports once it has done some work.
async fn exported_families() -> HashSet<String> {
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
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The metric families a PromQL expression reads (a histogram's series
/// named by their family).
fn metric_names(expr: &str) -> Vec<String> {
    let without_strings: String = expr.split('"').step_by(2).collect();
    let names: Vec<String> = without_strings
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.contains('_') || t.chars().all(|c| c.is_ascii_lowercase()))
        .filter(|t| !t.is_empty() && !t.chars().next().unwrap().is_ascii_digit())
        .filter(|t| !NOT_METRICS.contains(t) && !matches!(*t, "m" | "s"))
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n))
                .to_owned()
        })
        .collect();
    assert!(!names.is_empty(), "{expr}");
    names
}
