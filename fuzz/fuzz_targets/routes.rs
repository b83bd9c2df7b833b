//! Any path and query through the real router (with every layer), for every
//! route and none: the answer has the security headers; an error is a JSON
//! object that never carries internals (SQL, file paths, panics) beyond what
//! the client sent itself; a redirect only drops trailing slashes. PostgreSQL is unreachable, so what needs it answers 503.
#![no_main]

use axum::http::Uri;
use libfuzzer_sys::fuzz_target;
use order_service_fuzz::{assert_no_internals, get};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let uri = format!("/{path}");
    if uri
        .parse::<Uri>()
        .is_ok_and(|uri| uri.path() == "/api/orders/stream")
    {
        return; // a live feed, never read to its end
    }
    let Some(answer) = get(&uri) else {
        return; // not a URI a client could send
    };
    if answer.check_common() {
        return;
    }
    let status = answer.status;
    let body = String::from_utf8_lossy(&answer.body);
    if status.is_success() {
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
