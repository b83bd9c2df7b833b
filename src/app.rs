//! `serve`: ingest and HTTP side by side, stopped together by SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::cache::{MemoryTier, OrderCache, RedisTier};
use crate::configuration::{redacted, Settings};
use crate::events::{Feed, IngestHealth};
use crate::http::{self, AppState, FeedSlots, Io, Server};
use crate::ingest::Ingest;
use crate::open_files;
use crate::signals;
use crate::store::Store;
use crate::telemetry::{self, Metrics};

pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let max_connections = http_connections(&settings);
    let store = Store::connect_lazy(
        settings.service_options()?,
        settings.database.max_connections,
        settings.connect_timeout(),
        settings.write_timeout(),
    );
    let redis = match &settings.redis.url {
        Some(url) => {
            let client =
                redis::Client::open(url.expose_secret()).context("REDIS_URL: not a Redis URL")?;
            Some(RedisTier::start(
                client,
                settings.redis.ttl_secs,
                &settings.redis.key_prefix,
                metrics.clone(),
            ))
        }
        None => None,
    };
    let cache = Arc::new(OrderCache::new(
        MemoryTier::new(settings.cache.max_bytes),
        redis,
        store.clone(),
        metrics.clone(),
    ));
    let health = Arc::new(IngestHealth::default());
    let feed = Feed::default();
    let listener = http::listen(settings.http.addr)
        .with_context(|| format!("HTTP_ADDR: cannot listen on {}", settings.http.addr))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let member = settings.kafka.member_name(addr);
    if settings.kafka.group_instance_id.is_none() && settings.http.addr.port() == 0 {
        // The default name takes the port, and port 0 is another one each start.
        tracing::warn!(
            member = member.as_deref().unwrap_or_default(),
            "HTTP_ADDR asks for any free port, so this instance's member name changes \
             with every start and a restart cannot take its partitions straight back; \
             set KAFKA_GROUP_INSTANCE_ID to keep one"
        );
    }
    let ingest = Ingest::new(
        &settings,
        member.as_deref(),
        store.clone(),
        cache.clone(),
        metrics.clone(),
        health.clone(),
        feed.clone(),
    )?;
    tracing::info!(
        %addr,
        database = %redacted(&settings.database.url),
        brokers = %settings.kafka.brokers,
        kafka_security = %settings.kafka.security_protocol,
        topic = %settings.kafka.topic,
        group = %settings.kafka.group_id,
        member = member.as_deref().unwrap_or("(dynamic)"),
        redis = settings.redis.url.as_ref().map(redacted).unwrap_or_else(|| "disabled".into()),
        http_max_connections = max_connections,
        "listening on http://{addr}"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    tokio::spawn(telemetry::report_dropped_lines());

    let warm = cache.clone();
    let warmup_orders = settings.cache.warmup_orders;
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        warm.warm_up(warmup_orders).await;
        tracing::info!(
            loaded = warm.warmup().state().loaded,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "warm-up done"
        );
    });

    let state = AppState {
        cache,
        store,
        metrics: metrics.clone(),
        ingest: health,
        feed,
        feeds: FeedSlots::for_connections(max_connections),
        io: Io::current(settings.http.request_timeout()),
    };
    let routers = http::routers(state, &settings.http);
    let server = Server::start(
        listener,
        routers,
        &settings.http,
        max_connections,
        &metrics,
        shutdown.clone(),
    )?;

    let ingest_result = ingest.run(shutdown.clone()).await;
    // Whatever stopped ingest stops the HTTP side too.
    shutdown.cancel();
    let http_result = tokio::time::timeout(Duration::from_secs(5), server.stopped())
        .await
        .map_err(|_| anyhow::anyhow!("HTTP server did not stop in time"))
        .and_then(|stopped| stopped);
    ingest_result.and(http_result)
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let signal = signals::stop_requested().await;
    tracing::info!("{signal} received; stopping");
    shutdown.cancel();
}

/// The connections HTTP clients may hold: HTTP_MAX_CONNECTIONS, or by default
/// the share of the open-files limit, raised first to the most allowed.
fn http_connections(settings: &Settings) -> usize {
    let limit = match open_files::raise_limit() {
        Ok((before, now)) => {
            if now > before {
                tracing::info!(before, now, "open-files limit raised to the most allowed");
            }
            now
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-files limit");
            u64::MAX
        }
    };
    let sessions = settings.database.max_connections;
    match settings.http.max_connections {
        0 => open_files::http_share(limit, sessions),
        given => {
            let files = open_files::clients_files(limit, sessions);
            if u64::try_from(given).is_ok_and(|given| given > files) {
                tracing::warn!(
                    given,
                    open_files_limit = limit,
                    clients_files = files,
                    "HTTP_MAX_CONNECTIONS is more than the open-files limit leaves clients; \
                     past that, accepting a connection may fail for want of a file, and so may \
                     a new PostgreSQL session"
                );
            }
            given
        }
    }
}
