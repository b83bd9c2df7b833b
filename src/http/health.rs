use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

const OPENAPI: &str = include_str!("openapi.json");

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
}

/// Ready when PostgreSQL answers and the consumer holds its assignment. Redis
/// and the warm-up are reported but never make the service unready.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let postgres = matches!(
        tokio::time::timeout(Duration::from_secs(1), state.store.ping()).await,
        Ok(Ok(()))
    );
    let assigned = state.ingest.assigned.load(Ordering::Relaxed);
    let paused = state.ingest.paused.load(Ordering::Relaxed);
    let redis = match state.cache.redis_up() {
        None => "disabled",
        Some(true) => "up",
        Some(false) => "down",
    };
    let ready = postgres && assigned;
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "postgres": if postgres { "up" } else { "down" },
            "kafka_assignment": if assigned { "assigned" } else { "waiting" },
            "ingest": if paused { "paused" } else { "running" },
            "redis": redis,
        },
        "warmup": state.cache.warmup().state(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
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
