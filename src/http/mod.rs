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
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Router;
use percent_encoding::{utf8_percent_encode, CONTROLS};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;

pub use self::feed::FeedSlots;
pub use self::io::Io;
pub use self::server::{listen, Server};
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
    pub feeds: FeedSlots,
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
    let limit = Arc::new(tokio::sync::Semaphore::new(settings.max_concurrency));
    move || router(state.clone(), limit.clone())
}

fn router(state: AppState, limit: Arc<tokio::sync::Semaphore>) -> Router {
    let state = Shared(Arc::new(state));
    Router::new()
        .merge(orders::router(&state.io))
        .merge(dead_letters::router(&state.io))
        .merge(health::router(&state.io))
        .merge(api_doc::router())
        .merge(feed::router())
        .merge(ui::router())
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(
            CompressionLayer::new().gzip(true).br(true).compress_when(
                SizeAbove::new(COMPRESS_MIN_BYTES)
                    .and(NotForContentType::IMAGES)
                    .and(NotForContentType::SSE),
            ),
        )
        .layer(RequestBodyLimitLayer::new(MAX_REQUEST_BODY))
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(limit))
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// Sent with every answer unless a route set its own: the page loads only its
/// own script and style, and no other site may frame it.
const SECURITY_HEADERS: [(header::HeaderName, HeaderValue); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
        ),
    ),
    (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
    (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
    (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
];

/// Anything not routed: a JSON 404, marked so it is told apart from "no such
/// order". A path typed or pasted with trailing slashes is sent on to the same
/// path without them (308, so the method is kept).
async fn no_route(uri: Uri) -> Response {
    if let Some(location) = without_trailing_slashes(&uri) {
        return Redirect::permanent(&location).into_response();
    }
    (
        StatusCode::NOT_FOUND,
        [("x-route", "none")],
        axum::Json(serde_json::json!({ "error": "no such route; see /openapi.json" })),
    )
        .into_response()
}

/// A method the route does not take: a JSON 405 too (axum adds `Allow`).
async fn wrong_method() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(
            serde_json::json!({ "error": "method not allowed; see Allow and /openapi.json" }),
        ),
    )
        .into_response()
}

/// The path and query of `uri` without the path's trailing slashes, if it has
/// any. Only a path that then starts with a letter or digit qualifies, as
/// every route does: `//host/` must not become `//host`, which a browser
/// would read as another site. Bytes a `Location` may not carry raw (the
/// request line may: `/order/п/`) are percent-encoded.
fn without_trailing_slashes(uri: &Uri) -> Option<String> {
    let path = uri.path();
    let trimmed = path.trim_end_matches('/');
    let routable = trimmed
        .as_bytes()
        .get(1)
        .is_some_and(u8::is_ascii_alphanumeric);
    if trimmed.len() == path.len() || !routable {
        return None;
    }
    let encoded = |part| utf8_percent_encode(part, CONTROLS);
    Some(match uri.query() {
        Some(query) => format!("{}?{}", encoded(trimmed), encoded(query)),
        None => encoded(trimmed).to_string(),
    })
}

/// The outermost layer: counts every request by route template (never the
/// raw path, which would make one series per order) and status, its time
/// included, and adds the security headers, so answers made by the layers
/// inside (a timeout, a body too large) are counted and covered too.
async fn record(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let metrics = &state.metrics;
    // A cheap clone (shared string), not a copy of the path.
    let route = request.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let started = Instant::now();
    let mut response = next.run(request).await;
    metrics.http_request(route, response.status(), started.elapsed().as_secs_f64());
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        if !headers.contains_key(&name) {
            headers.insert(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(uri: &str) -> Option<String> {
        without_trailing_slashes(&uri.parse().unwrap())
    }

    #[test]
    fn trailing_slashes_are_dropped_and_the_query_kept() {
        assert_eq!(redirect("/order/abc/").as_deref(), Some("/order/abc"));
        assert_eq!(redirect("/order/abc///").as_deref(), Some("/order/abc"));
        assert_eq!(
            redirect("/api/orders/?limit=5&before=x").as_deref(),
            Some("/api/orders?limit=5&before=x")
        );
        assert_eq!(redirect("/order/a%2Fb/").as_deref(), Some("/order/a%2Fb"));
        assert_eq!(
            redirect("/order/п//?q=é").as_deref(),
            Some("/order/%D0%BF?q=%C3%A9")
        );
    }

    #[test]
    fn only_paths_that_end_in_a_slash_and_stay_on_this_site_are_redirected() {
        for uri in [
            "/",
            "//",
            "/order/abc",
            "//evil.example/",
            "/%2F%2Fevil/",
            "/\u{2F}/x/",
        ] {
            assert_eq!(redirect(uri), None, "{uri}");
        }
    }
}
