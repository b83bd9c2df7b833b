//! Any path after `/order/` through the real router (with every layer): the
//! answer is a known status with a JSON body and the security headers, and
//! never carries internals (SQL, file paths, panics); or, for a path with
//! trailing slashes, a redirect to it without them. One order is cached;
//! PostgreSQL is unreachable, so a valid id that is not cached gets a 503.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode, Uri};
use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode_str;
use order_service::cache::{MemoryTier, OrderCache};
use order_service::configuration::HttpSettings;
use order_service::domain::{parse_order, Limits, SAMPLE_ORDER};
use order_service::events::{Feed, IngestHealth};
use order_service::http::{routers, AppState, FeedSlots, Io};
use order_service::store::Store;
use order_service::telemetry::Metrics;
use tower::ServiceExt;

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

fuzz_target!(|data: &[u8]| {
    let Ok(segment) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(request) = Request::get(format!("/order/{segment}")).body(Body::empty()) else {
        return; // not a URI a client could send
    };
    let uri = request.uri().clone();
    let target = target();
    let (status, headers, body) = target.runtime.block_on(async {
        let response = target.app.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, body)
    });
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers.contains_key("content-security-policy"));
    // A path with trailing slashes is sent to itself without them, on this site.
    if status == StatusCode::PERMANENT_REDIRECT {
        let location = headers[header::LOCATION].to_str().unwrap();
        assert!(!location.starts_with("//"), "{location} for {segment:?}");
        let location: Uri = location.parse().unwrap();
        let decoded = |part: &str| percent_decode_str(part).collect::<Vec<u8>>();
        let path = uri.path().trim_end_matches('/');
        assert_eq!(decoded(location.path()), decoded(path), "for {segment:?}");
        assert_eq!(location.query().map(decoded), uri.query().map(decoded));
        return;
    }
    assert!(
        [
            StatusCode::OK,
            StatusCode::BAD_REQUEST,
            StatusCode::NOT_FOUND,
            StatusCode::SERVICE_UNAVAILABLE,
        ]
        .contains(&status),
        "{status} for {segment:?}"
    );
    let mut json: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{status} for {segment:?}: not JSON ({e}): {body:?}"));
    // The id asked for is echoed back as given: the client's own text, not a leak.
    if status != StatusCode::OK {
        if let Some(fields) = json.as_object_mut() {
            fields.remove("order_uid");
        }
    }
    let text = json.to_string().to_lowercase();
    for leak in ["sqlx", "postgres", "panicked", "src/", ".rs:"] {
        assert!(!text.contains(leak), "{leak:?} in {text}");
    }
});
