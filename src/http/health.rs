use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ErrorBody;
use super::io::{on_io, Io};
use super::Shared;
use crate::cache::WarmupState;
use crate::events::BrokerTrouble;
use crate::store;

pub fn router(io: &Io) -> Router<Shared> {
    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(readyz).route_layer(middleware::from_fn_with_state(io.clone(), on_io)),
        )
        .route("/metrics", get(metrics))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    status: Alive,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Alive {
    Ok,
}

/// Liveness: the process answers
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "Alive", body = Liveness)))]
pub(super) async fn healthz() -> Json<Liveness> {
    Json(Liveness { status: Alive::Ok })
}

/// Whether the service is ready, each check's state, and what keeps it unready.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    status: Status,
    checks: Checks,
    /// What keeps the service unready, in words, e.g. "ingest paused:
    /// database: permission denied for table orders (42501)".
    problems: Vec<String>,
    warmup: WarmupState,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Status {
    Ready,
    NotReady,
}

#[derive(Debug, Serialize, ToSchema)]
struct Checks {
    postgres: Link,
    kafka_assignment: Assignment,
    kafka_topic: Topic,
    kafka_broker: Broker,
    ingest: Ingest,
    redis: Tier,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Link {
    Up,
    Down,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Assignment {
    /// No partition assignment yet.
    Waiting,
    /// Reading the assigned partitions' stored positions.
    Loading,
    Assigned,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Topic {
    Present,
    Missing,
    /// No broker can be reached to tell.
    Unknown,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Broker {
    Answering,
    Slow,
    /// The broker turns this client away: its credentials, or TLS.
    Refused,
    /// No connection to the broker can be made (refused, timed out, a name
    /// that does not resolve).
    Unreachable,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Ingest {
    Running,
    Paused,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Tier {
    Up,
    /// Answers and serves reads, but refuses to store orders (full, an ACL,
    /// a read-only replica): they are not shared through it meanwhile.
    RefusesWrites,
    Down,
    Disabled,
}

/// Readiness: PostgreSQL reachable, the consumer holds its assignment and ingest is not paused
///
/// Ready when PostgreSQL answers and the orders table can be read, the
/// orders topic exists, the consumer holds its assignment with the stored
/// positions read, ingest is not paused and the broker answers in time. Redis and the warm-up are reported but
/// never make the service unready. `problems` says in words what keeps it
/// unready.
#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready", body = Readiness),
        (status = 504, description = "Storage did not answer within HTTP_REQUEST_TIMEOUT_MS", body = ErrorBody),
    )
)]
pub(super) async fn readyz(State(state): State<Shared>) -> (StatusCode, Json<Readiness>) {
    let postgres_problem =
        match tokio::time::timeout(Duration::from_secs(1), state.store.ping()).await {
            Ok(Ok(())) => None,
            // It answers, but refuses to hand over orders (a grant, a table gone).
            Ok(Err(sqlx::Error::Database(db))) => Some(format!(
                "postgres: cannot read the orders: {}",
                store::described(db.as_ref())
            )),
            _ => Some("postgres: does not answer".to_owned()),
        };
    let postgres = postgres_problem.is_none();
    let assigned = state.ingest.assigned.load(Ordering::Acquire);
    let loading = state.ingest.loading.load(Ordering::Relaxed);
    let stalled = state.ingest.stalled();
    let redis = match state.cache.redis() {
        None => Tier::Disabled,
        Some(redis) if !redis.is_up() => Tier::Down,
        Some(redis) if redis.refuses_writes() => Tier::RefusesWrites,
        Some(_) => Tier::Up,
    };
    let mut problems = Vec::new();
    problems.extend(postgres_problem);
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
    let broker_trouble = state.ingest.broker_trouble();
    if let Some(trouble) = &broker_trouble {
        problems.push(format!("kafka: {}", trouble.problem()));
    }
    let broker_refused = state.ingest.broker_refused();
    if let Some(reason) = &broker_refused {
        problems.push(format!("kafka: the broker refuses this client: {reason}"));
    }
    let orphaned = state.ingest.orphaned();
    if !orphaned.is_empty() {
        problems.push(format!(
            "kafka: partitions {orphaned:?} have messages that no live member consumes, and this \
             instance holds none: a member that is gone still holds them"
        ));
    }
    let ready = problems.is_empty();
    let body = Readiness {
        status: if ready {
            Status::Ready
        } else {
            Status::NotReady
        },
        checks: Checks {
            postgres: if postgres { Link::Up } else { Link::Down },
            kafka_assignment: match (assigned, loading) {
                (false, _) => Assignment::Waiting,
                (true, true) => Assignment::Loading,
                (true, false) => Assignment::Assigned,
            },
            kafka_topic: match (&missing_topic, &broker_trouble) {
                (Some(_), _) => Topic::Missing,
                (None, Some(BrokerTrouble::Unreachable(_))) => Topic::Unknown,
                (None, _) => Topic::Present,
            },
            kafka_broker: match (&broker_refused, &broker_trouble) {
                (Some(_), _) => Broker::Refused,
                (None, Some(BrokerTrouble::Slow(_))) => Broker::Slow,
                (None, Some(BrokerTrouble::Unreachable(_))) => Broker::Unreachable,
                (None, None) => Broker::Answering,
            },
            ingest: if stalled.is_some() {
                Ingest::Paused
            } else {
                Ingest::Running
            },
            redis,
        },
        problems,
        warmup: state.cache.warmup().state(),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// Prometheus metrics in the text exposition format
#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, description = "Metrics", content_type = "text/plain", body = String))
)]
pub(super) async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    let m = &state.metrics;
    let memory = state.cache.memory();
    m.cache_entries.set(memory.entries() as i64);
    m.cache_bytes.set(memory.bytes() as i64);
    let pool = state.store.pool();
    m.db_pool_in_use
        .set(i64::from(pool.size()) - pool.num_idle() as i64);
    m.http_live_feeds_open.set(state.feeds.open() as i64);
    m.http_live_feeds_limit.set(state.feeds.limit() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
}
