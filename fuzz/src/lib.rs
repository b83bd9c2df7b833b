//! What the HTTP fuzz targets share: the real router (with every layer) over
//! a cache holding the sample order and a PostgreSQL that cannot be reached,
//! and the checks every answer must pass.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, StatusCode, Uri};
use order_service::cache::{MemoryTier, OrderCache};
use order_service::configuration::HttpSettings;
use order_service::domain::{parse_order, Limits, SAMPLE_ORDER};
use order_service::events::{Feed, IngestHealth};
use order_service::http::{routers, AppState, FeedSlots, Io};
use order_service::store::Store;
use order_service::telemetry::Metrics;
use percent_encoding::percent_decode_str;
use tower::ServiceExt;

/// What an answer may be besides a redirect (PostgreSQL is unreachable: 503).
const STATUSES: [StatusCode; 5] = [
    StatusCode::OK,
    StatusCode::BAD_REQUEST,
    StatusCode::NOT_FOUND,
    StatusCode::METHOD_NOT_ALLOWED,
    StatusCode::SERVICE_UNAVAILABLE,
];

/// Words that would mean an answer leaks the service's internals.
const LEAKS: [&str; 5] = ["sqlx", "postgres", "panicked", "src/", ".rs:"];

struct Target {
    runtime: tokio::runtime::Runtime,
    app: axum::Router,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let app = runtime.block_on(async {
            let unreachable = "postgres://nobody@127.0.0.1:1/none".parse().unwrap();
            let patience = Duration::from_millis(1);
            let store = Store::connect_lazy(unreachable, 1, patience, patience);
            let metrics = Arc::new(Metrics::new());
            let cache = Arc::new(OrderCache::new(
                MemoryTier::new(1 << 20),
                None,
                store.clone(),
                metrics.clone(),
            ));
            let sample = parse_order(SAMPLE_ORDER.as_bytes(), &Limits::default()).unwrap();
            cache.stored(vec![(
                sample.uid().as_str().into(),
                sample.to_json().into(),
            )]);
            let state = AppState {
                cache,
                store,
                metrics,
                ingest: Arc::new(IngestHealth::default()),
                feed: Feed::default(),
                feeds: FeedSlots::for_connections(64),
                // This runtime owns the (unreachable) pool; block_on drives it.
                io: Io::current(HttpSettings::default().request_timeout()),
            };
            routers(state, &HttpSettings::default())()
        });
        Target { runtime, app }
    })
}

/// An answer to a request, read whole.
pub struct Answer {
    pub method: Method,
    pub uri: Uri,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// `GET uri`; `None` when `uri` is not one a client could send.
pub fn get(uri: &str) -> Option<Answer> {
    request(Method::GET, uri)
}

/// `method uri` without a body; `None` when `uri` is not one a client could send.
pub fn request(method: Method, uri: &str) -> Option<Answer> {
    let request = Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(Body::empty())
        .ok()?;
    let uri = request.uri().clone();
    let target = target();
    let (status, headers, body) = target.runtime.block_on(async {
        let response = target.app.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, body)
    });
    Some(Answer {
        method,
        uri,
        status,
        headers,
        body,
    })
}

impl Answer {
    /// The checks every answer passes: the security headers, a known status,
    /// `Allow` on a 405, no body to a HEAD, and a redirect (a path with
    /// trailing slashes) only to the same path without them, on this site.
    /// True when the answer was such a redirect.
    pub fn check_common(&self) -> bool {
        let (method, status, uri) = (&self.method, self.status, &self.uri);
        assert_eq!(self.headers["x-content-type-options"], "nosniff");
        assert!(self.headers.contains_key("content-security-policy"));
        if status == StatusCode::METHOD_NOT_ALLOWED {
            let allow = self.headers[header::ALLOW].to_str().unwrap();
            assert!(
                !allow.contains(method.as_str()),
                "{allow} for {method} {uri}"
            );
        }
        if method == Method::HEAD {
            assert!(self.body.is_empty(), "a body for HEAD {uri}");
        }
        if status != StatusCode::PERMANENT_REDIRECT {
            assert!(STATUSES.contains(&status), "{status} for {method} {uri}");
            return false;
        }
        let location = self.headers[header::LOCATION].to_str().unwrap();
        assert!(!location.starts_with("//"), "{location} for {}", self.uri);
        let location: Uri = location.parse().unwrap();
        let path = self.uri.path().trim_end_matches('/');
        assert_eq!(decoded(location.path()), decoded(path), "for {}", self.uri);
        assert_eq!(location.query().map(decoded), self.uri.query().map(decoded));
        true
    }

    /// The body as JSON, or a failure naming the request.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            let (method, status, uri, body) = (&self.method, self.status, &self.uri, &self.body);
            panic!("{status} for {method} {uri}: not JSON ({e}): {body:?}")
        })
    }
}

/// Fails if `text` names the service's internals, leaving out any word that
/// `echoed` (the client's own text, which an answer may quote) holds.
pub fn assert_no_internals(text: &str, echoed: &str) {
    let text = text.to_lowercase();
    let echoed = String::from_utf8_lossy(&decoded(echoed)).to_lowercase();
    for leak in LEAKS.into_iter().filter(|leak| !echoed.contains(leak)) {
        assert!(!text.contains(leak), "{leak:?} in {text}");
    }
}

fn decoded(part: &str) -> Vec<u8> {
    percent_decode_str(part).collect()
}
