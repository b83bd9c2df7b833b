//! Any method, path and query through the real router (with every layer),
//! for every route and none: the answer has the security headers; an error is
//! a JSON object that never carries internals (SQL, file paths, panics) beyond
//! what the client sent itself; a redirect only drops trailing slashes.
//! PostgreSQL is unreachable, so what needs it answers 503.
//!
//! An input is the path after `/`, asked with GET, or a byte below 8 that
//! picks another method, then the path.
#![no_main]

use axum::http::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use order_service_fuzz::{assert_no_internals, request};

const METHODS: [Method; 8] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::OPTIONS,
    Method::PATCH,
    Method::TRACE,
];

fuzz_target!(|data: &[u8]| {
    let (method, path) = match data.split_first() {
        Some((&pick, rest)) if usize::from(pick) < METHODS.len() => {
            (METHODS[usize::from(pick)].clone(), rest)
        }
        _ => (Method::GET, data),
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let uri = format!("/{path}");
    if uri
        .parse::<Uri>()
        .is_ok_and(|uri| uri.path() == "/api/orders/stream")
    {
        return; // a live feed, never read to its end
    }
    let Some(answer) = request(method, &uri) else {
        return; // not a URI a client could send
    };
    if answer.check_common() {
        return;
    }
    let status = answer.status;
    let body = String::from_utf8_lossy(&answer.body);
    if status.is_success() || answer.method == Method::HEAD {
        assert!(!body.contains("panicked"), "{path:?}: {body}");
        return;
    }
    let error = answer.json();
    assert!(error.is_object(), "{status} for {path:?}: {error}");
    // Readiness names the services it waits for, PostgreSQL among them.
    if answer.uri.path() != "/readyz" {
        assert_no_internals(&body, path);
    }
});
