//! The HTTP API and web page.

mod api_doc;
mod dead_letters;
mod error;
mod feed;
mod health;
mod io;
mod orders;
mod paging;
mod server;
mod ui;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;

pub use self::io::Io;
pub use self::server::Server;
use crate::cache::OrderCache;
use crate::configuration::HttpSettings;
use crate::events::{Feed, IngestHealth};
use crate::store::Store;
use crate::telemetry::Metrics;

/// Requests carry no body worth more than this; everything here is a GET.
const MAX_REQUEST_BODY: usize = 16 * 1024;

/// Smaller bodies, most orders among them, are sent as they are: they leave
/// in the first round trip either way (TCP's initial window is about 14 KB),
/// and compressing each one cut throughput to under a third (BENCHMARKS.md).
const COMPRESS_MIN_BYTES: u16 = 4096;

#[derive(Clone)]
pub struct AppState {
    pub cache: Arc<OrderCache>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub ingest: Arc<IngestHealth>,
    pub feed: Feed,
    /// The runtime that owns the pool and the Redis client.
    pub io: Io,
}

/// What the handlers get: the state behind an `Arc` of their router's own.
/// Every request clones it, so each worker's router has its own `Arc`: one
/// reference count per core, not one contended by all.
#[derive(Clone)]
pub struct Shared(Arc<AppState>);

impl std::ops::Deref for Shared {
    type Target = AppState;

    fn deref(&self) -> &AppState {
        &self.0
    }
}

/// Builds a router over `state` per call, one per worker; all of them share
/// one concurrency limit.
pub fn routers(state: AppState, settings: &HttpSettings) -> impl Fn() -> Router {
    let settings = settings.clone();
    let limit = Arc::new(tokio::sync::Semaphore::new(settings.max_concurrency));
    move || router(state.clone(), &settings, limit.clone())
}

fn router(state: AppState, settings: &HttpSettings, limit: Arc<tokio::sync::Semaphore>) -> Router {
    let state = Shared(Arc::new(state));
    let security = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ];
    let mut router = Router::new()
        .merge(orders::router(&state.io))
        .merge(dead_letters::router(&state.io))
        .merge(health::router(&state.io))
        .merge(api_doc::router())
        .merge(feed::router())
        .merge(ui::router())
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .layer(
            CompressionLayer::new().gzip(true).br(true).compress_when(
                SizeAbove::new(COMPRESS_MIN_BYTES)
                    .and(NotForContentType::IMAGES)
                    .and(NotForContentType::SSE),
            ),
        )
        .layer(RequestBodyLimitLayer::new(MAX_REQUEST_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(settings.request_timeout_ms),
        ))
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(limit));
    for (name, value) in security {
        router = router.layer(SetResponseHeaderLayer::if_not_present(
            name,
            HeaderValue::from_static(value),
        ));
    }
    router.with_state(state)
}

/// Anything not routed: a JSON 404, marked so it is told apart from "no such order".
async fn no_route() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        [("x-route", "none")],
        axum::Json(serde_json::json!({ "error": "no such route; see /openapi.json" })),
    )
}

/// Counts every request by route template (never the raw path, which would
/// make one series per order) and status.
async fn record(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let metrics = &state.metrics;
    // A cheap clone (shared string), not a copy of the path.
    let route = request.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let started = Instant::now();
    let response = next.run(request).await;
    metrics
        .http_request_seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .http_requests
        .with_label_values(&[route, response.status().as_str()])
        .inc();
    response
}
