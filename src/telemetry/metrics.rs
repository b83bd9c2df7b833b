//! Prometheus metrics. Each application owns its registry, so several instances
//! in one process (as in tests) keep their counts apart.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    /// Tells this registry's series apart from another's in a worker's handles.
    id: u64,
    registry: Registry,
    pub messages_consumed: IntCounter,
    pub messages_expired: IntCounter,
    pub orders_stored: IntCounter,
    pub duplicates: IntCounter,
    pub dead_letters: IntCounterVec,
    /// Replayed messages (those with a `dlq-replay-of` header) by what became of them.
    pub replays: IntCounterVec,
    pub batch_size: Histogram,
    pub batch_commit_seconds: Histogram,
    stage_seconds: HistogramVec,
    /// From a message's broker timestamp to its commit in PostgreSQL.
    pub broker_to_commit_seconds: Histogram,
    /// From a batch's commit to its orders in the memory cache.
    pub commit_to_visible_seconds: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub consumer_paused: IntGauge,
    /// How long the broker took to answer the last probe.
    pub broker_probe_seconds: Gauge,
    pub broker_refused: IntGauge,
    pub ingest_stalled_seconds: Counter,
    pub db_pool_in_use: IntGauge,
    pub cache_requests: IntCounterVec,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub warmup_loaded: IntGauge,
    pub redis_writes_dropped: IntCounter,
    pub http_connections_open: IntGauge,
    /// The most connections clients may hold at once (HTTP_MAX_CONNECTIONS).
    pub http_connections_limit: IntGauge,
    pub http_live_feeds_open: IntGauge,
    pub http_live_feeds_limit: IntGauge,
    http_requests: IntCounterVec,
    http_request_seconds: HistogramVec,
}

/// One route's series, as one HTTP worker holds them.
struct RouteSeries {
    seconds: Histogram,
    by_status: Vec<(StatusCode, IntCounter)>,
}

thread_local! {
    /// Each HTTP worker's handles to the series it has written, by route
    /// template, and the registry they belong to. `with_label_values` hashes
    /// the labels and takes the family's lock, shared by every worker, on each
    /// call; a handle resolved once touches only its series' own atomics.
    static HTTP_SERIES: RefCell<(u64, HashMap<String, RouteSeries>)> = RefCell::default();
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "ingest_stage_duration_seconds",
                "Where ingest time goes: broker_to_commit, from the message's broker timestamp to \
                 its commit in PostgreSQL; commit_to_visible, from the commit to the order in the cache.",
            )
            // Fine from 10 to 100 ms, where a produce-to-visible goal of 50 ms is split.
            .buckets(vec![
                0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["stage"],
        )
        .unwrap();
        static IDS: AtomicU64 = AtomicU64::new(0);
        let m = Self {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            messages_consumed: IntCounter::new(
                "orders_messages_consumed_total",
                "Messages read from the orders topic.",
            )
            .unwrap(),
            messages_expired: IntCounter::new(
                "orders_messages_expired_total",
                "Messages the broker deleted (retention) before this group consumed them.",
            )
            .unwrap(),
            orders_stored: IntCounter::new("orders_stored_total", "Orders written to PostgreSQL.").unwrap(),
            duplicates: IntCounter::new(
                "orders_duplicates_total",
                "Messages whose order was already stored with identical content.",
            )
            .unwrap(),
            dead_letters: IntCounterVec::new(
                Opts::new("orders_dead_letters_total", "Messages sent to the dead-letter topic."),
                &["stage"],
            )
            .unwrap(),
            replays: IntCounterVec::new(
                Opts::new(
                    "orders_replays_total",
                    "Replayed dead letters consumed again, by outcome: stored, duplicate (already \
                     stored) or dead_lettered (rejected again).",
                ),
                &["outcome"],
            )
            .unwrap(),
            batch_size: Histogram::with_opts(
                HistogramOpts::new("ingest_batch_messages", "Messages per database batch.")
                    .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0]),
            )
            .unwrap(),
            batch_commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "ingest_batch_commit_duration_seconds",
                    "Time to write and commit one batch, dead letters included.",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            )
            .unwrap(),
            broker_to_commit_seconds: stage_seconds.with_label_values(&["broker_to_commit"]),
            commit_to_visible_seconds: stage_seconds.with_label_values(&["commit_to_visible"]),
            stage_seconds,
            consumer_lag: IntGaugeVec::new(
                Opts::new("ingest_consumer_lag_messages", "Messages behind the high watermark, per partition."),
                &["partition"],
            )
            .unwrap(),
            consumer_paused: IntGauge::new(
                "ingest_consumer_paused",
                "1 while fetching is paused because PostgreSQL or the dead-letter topic is unavailable.",
            )
            .unwrap(),
            broker_probe_seconds: Gauge::new(
                "kafka_broker_probe_seconds",
                "How long the broker took to answer the last request for a partition's end (probed every 2 s).",
            )
            .unwrap(),
            broker_refused: IntGauge::new(
                "kafka_broker_refused",
                "1 while the brokers turn the service away (a failed sign-in, an untrusted certificate).",
            )
            .unwrap(),
            ingest_stalled_seconds: Counter::new(
                "ingest_paused_seconds_total",
                "Time ingest spent paused because its environment (database, dead-letter topic) failed.",
            )
            .unwrap(),
            db_pool_in_use: IntGauge::new("db_pool_connections_in_use", "PostgreSQL connections checked out.")
                .unwrap(),
            cache_requests: IntCounterVec::new(
                Opts::new("cache_requests_total", "Order lookups per cache tier and result."),
                &["tier", "result"],
            )
            .unwrap(),
            cache_entries: IntGauge::new("cache_entries", "Orders in the in-process cache.").unwrap(),
            cache_bytes: IntGauge::new("cache_bytes", "Bytes held by the in-process cache.").unwrap(),
            warmup_loaded: IntGauge::new(
                "cache_warmup_loaded_orders",
                "Orders loaded into the in-process cache by the start-up warm-up.",
            )
            .unwrap(),
            redis_writes_dropped: IntCounter::new(
                "cache_redis_writes_dropped_total",
                "Orders not written to Redis because it was unavailable or behind.",
            )
            .unwrap(),
            http_connections_open: IntGauge::new(
                "http_connections_open",
                "HTTP connections clients hold open (live feeds included).",
            )
            .unwrap(),
            http_connections_limit: IntGauge::new(
                "http_connections_limit",
                "The most HTTP connections clients may hold at once; more wait in the listen queue.",
            )
            .unwrap(),
            http_live_feeds_open: IntGauge::new(
                "http_live_feeds_open",
                "Live feeds of stored orders open (each holds a connection).",
            )
            .unwrap(),
            http_live_feeds_limit: IntGauge::new(
                "http_live_feeds_limit",
                "The most live feeds open at once; more are answered 503.",
            )
            .unwrap(),
            http_requests: IntCounterVec::new(
                Opts::new("http_requests_total", "HTTP requests by route and status."),
                &["route", "status"],
            )
            .unwrap(),
            http_request_seconds: HistogramVec::new(
                HistogramOpts::new("http_request_duration_seconds", "HTTP request latency by route.").buckets(
                    vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0],
                ),
                &["route"],
            )
            .unwrap(),
            registry,
        };
        let build_info = IntGaugeVec::new(
            Opts::new(
                "order_service_build_info",
                "Always 1; the labels say which build runs.",
            ),
            &["version"],
        )
        .unwrap();
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.messages_consumed.clone()),
            Box::new(m.messages_expired.clone()),
            Box::new(m.orders_stored.clone()),
            Box::new(m.duplicates.clone()),
            Box::new(m.dead_letters.clone()),
            Box::new(m.replays.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.batch_commit_seconds.clone()),
            Box::new(m.stage_seconds.clone()),
            Box::new(m.consumer_lag.clone()),
            Box::new(m.consumer_paused.clone()),
            Box::new(m.broker_probe_seconds.clone()),
            Box::new(m.broker_refused.clone()),
            Box::new(m.ingest_stalled_seconds.clone()),
            Box::new(m.db_pool_in_use.clone()),
            Box::new(m.cache_requests.clone()),
            Box::new(m.cache_entries.clone()),
            Box::new(m.cache_bytes.clone()),
            Box::new(m.warmup_loaded.clone()),
            Box::new(m.redis_writes_dropped.clone()),
            Box::new(m.http_connections_open.clone()),
            Box::new(m.http_connections_limit.clone()),
            Box::new(m.http_live_feeds_open.clone()),
            Box::new(m.http_live_feeds_limit.clone()),
            Box::new(m.http_requests.clone()),
            Box::new(m.http_request_seconds.clone()),
            Box::new(DroppedLogLines::new()),
            Box::new(build_info),
        ];
        for collector in collectors {
            m.registry
                .register(collector)
                .expect("metric names are unique");
        }
        // Every known series starts at 0, so rates and ratios work from the first scrape.
        for stage in crate::domain::LETTER_STAGES {
            m.dead_letters.with_label_values(&[stage]);
        }
        for outcome in ["stored", "duplicate", "dead_lettered"] {
            m.replays.with_label_values(&[outcome]);
        }
        for tier in ["memory", "redis", "postgres"] {
            for result in ["hit", "miss"] {
                m.cache_requests.with_label_values(&[tier, result]);
            }
        }
        m.cache_requests.with_label_values(&["redis", "unusable"]);
        m
    }

    /// Counts an answered request of `route` (a template, never a raw path)
    /// with its status, and its time.
    pub fn http_request(&self, route: &str, status: StatusCode, seconds: f64) {
        HTTP_SERIES.with_borrow_mut(|(owner, routes)| {
            if *owner != self.id {
                routes.clear();
                *owner = self.id;
            }
            if let Some(series) = routes.get_mut(route) {
                series.record(self, route, status, seconds);
                return;
            }
            let mut series = RouteSeries {
                seconds: self.http_request_seconds.with_label_values(&[route]),
                by_status: Vec::new(),
            };
            series.record(self, route, status, seconds);
            routes.insert(route.to_owned(), series);
        });
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl RouteSeries {
    fn record(&mut self, metrics: &Metrics, route: &str, status: StatusCode, seconds: f64) {
        self.seconds.observe(seconds);
        let at = match self.by_status.iter().position(|(s, _)| *s == status) {
            Some(at) => at,
            None => {
                let counter = metrics
                    .http_requests
                    .with_label_values(&[route, status.as_str()]);
                self.by_status.push((status, counter));
                self.by_status.len() - 1
            }
        };
        self.by_status[at].1.inc();
    }
}

/// `log_lines_dropped_total`, read from the process's one log writer at each
/// scrape.
struct DroppedLogLines(Desc);

impl DroppedLogLines {
    const NAME: &str = "log_lines_dropped_total";
    const HELP: &str =
        "Log lines dropped because stderr was not read fast enough (ingest and HTTP never wait for it).";

    fn new() -> Self {
        Self(
            Desc::new(
                Self::NAME.into(),
                Self::HELP.into(),
                Vec::new(),
                HashMap::new(),
            )
            .unwrap(),
        )
    }
}

impl Collector for DroppedLogLines {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let counter = IntCounter::new(Self::NAME, Self::HELP).unwrap();
        counter.inc_by(super::log_lines_dropped());
        counter.collect()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(series))
    }

    /// The log writer's count is read at each scrape, so it is there from
    /// the first one (0 in a process whose logs go nowhere else).
    #[test]
    fn dropped_log_lines_are_exported_from_the_first_scrape() {
        let text = Metrics::new().render();
        assert!(
            text.contains("# TYPE log_lines_dropped_total counter"),
            "{text}"
        );
        assert_eq!(
            line(&text, "log_lines_dropped_total "),
            Some("log_lines_dropped_total 0")
        );
    }

    /// A worker's handles follow the registry they were resolved from: two
    /// instances served from one thread keep their counts apart.
    #[test]
    fn requests_are_counted_in_their_own_registry() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.http_request("/order/{order_uid}", StatusCode::OK, 0.001);
        b.http_request("/order/{order_uid}", StatusCode::OK, 0.001);
        a.http_request("/order/{order_uid}", StatusCode::OK, 0.001);
        a.http_request("/order/{order_uid}", StatusCode::NOT_FOUND, 0.001);
        a.http_request("/healthz", StatusCode::OK, 0.001);
        let (a, b) = (a.render(), b.render());
        let ok = r#"http_requests_total{route="/order/{order_uid}",status="200"}"#;
        let missing = r#"http_requests_total{route="/order/{order_uid}",status="404"}"#;
        let timed = r#"http_request_duration_seconds_count{route="/order/{order_uid}"}"#;
        assert_eq!(line(&a, ok), Some(&*format!("{ok} 2")));
        assert_eq!(line(&a, missing), Some(&*format!("{missing} 1")));
        assert_eq!(line(&a, timed), Some(&*format!("{timed} 3")));
        assert_eq!(line(&b, ok), Some(&*format!("{ok} 1")));
        assert_eq!(line(&b, missing), None);
        assert_eq!(line(&b, timed), Some(&*format!("{timed} 1")));
        let health = r#"http_requests_total{route="/healthz",status="200"}"#;
        assert_eq!(line(&a, health), Some(&*format!("{health} 1")));
    }
}
