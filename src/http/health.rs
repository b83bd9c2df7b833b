use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::io::{on_io, Io};
use super::Shared;

const OPENAPI: &str = include_str!("openapi.json");

pub fn router(io: &Io) -> Router<Shared> {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route(
            "/readyz",
            get(readyz).route_layer(middleware::from_fn_with_state(io.clone(), on_io)),
        )
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
}

/// Ready when PostgreSQL answers, the orders topic exists, the consumer
/// holds its assignment with the stored positions read, ingest is not paused
/// and the broker answers in time. Redis and the warm-up are reported but
/// never make the service unready. `problems` says in words what keeps it
/// unready.
async fn readyz(State(state): State<Shared>) -> impl IntoResponse {
    let postgres = matches!(
        tokio::time::timeout(Duration::from_secs(1), state.store.ping()).await,
        Ok(Ok(()))
    );
    let assigned = state.ingest.assigned.load(Ordering::Acquire);
    let loading = state.ingest.loading.load(Ordering::Relaxed);
    let stalled = state.ingest.stalled();
    let redis = match state.cache.redis_up() {
        None => "disabled",
        Some(true) => "up",
        Some(false) => "down",
    };
    let mut problems = Vec::new();
    if !postgres {
        problems.push("postgres: does not answer".to_owned());
    }
    if !assigned {
        problems.push("kafka: waiting for a partition assignment".to_owned());
    }
    if loading {
        problems.push("ingest: reading the assigned partitions' stored positions".to_owned());
    }
    if let Some(cause) = &stalled {
        problems.push(format!("ingest paused: {cause}"));
    }
    let missing_topic = state.ingest.missing_topic();
    if let Some(topic) = &missing_topic {
        problems.push(format!(
            "kafka: topic {topic} does not exist; ingest starts once it is created"
        ));
    }
    let broker_slow = state.ingest.broker_slow();
    if let Some(problem) = &broker_slow {
        problems.push(format!("kafka: {problem}"));
    }
    let orphaned = state.ingest.orphaned();
    if !orphaned.is_empty() {
        problems.push(format!(
            "kafka: partitions {orphaned:?} have messages that no live member consumes, and this \
             instance holds none: a member that is gone still holds them"
        ));
    }
    let ready = problems.is_empty();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "postgres": if postgres { "up" } else { "down" },
            "kafka_assignment": match (assigned, loading) {
                (false, _) => "waiting",
                (true, true) => "loading",
                (true, false) => "assigned",
            },
            "kafka_topic": if missing_topic.is_some() { "missing" } else { "present" },
            "kafka_broker": if broker_slow.is_some() { "slow" } else { "answering" },
            "ingest": if stalled.is_some() { "paused" } else { "running" },
            "redis": redis,
        },
        "problems": problems,
        "warmup": state.cache.warmup().state(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    let m = &state.metrics;
    let memory = state.cache.memory();
    m.cache_entries.set(memory.entries() as i64);
    m.cache_bytes.set(memory.bytes() as i64);
    let pool = state.store.pool();
    m.db_pool_in_use
        .set(i64::from(pool.size()) - pool.num_idle() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
}
