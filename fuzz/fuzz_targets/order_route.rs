//! Any path after `/order/` through the real router (with every layer): the
//! answer is a known status with a JSON body and the security headers, and
//! never carries internals (SQL, file paths, panics); or, for a path with
//! trailing slashes, a redirect to it without them. One order is cached;
//! PostgreSQL is unreachable, so a valid id that is not cached gets a 503.
#![no_main]

use axum::http::StatusCode;
use libfuzzer_sys::fuzz_target;
use order_service_fuzz::{assert_no_internals, get};

fuzz_target!(|data: &[u8]| {
    let Ok(segment) = std::str::from_utf8(data) else {
        return;
    };
    let Some(answer) = get(&format!("/order/{segment}")) else {
        return; // not a URI a client could send
    };
    if answer.check_common() {
        return;
    }
    let status = answer.status;
    let mut json = answer.json();
    // The id asked for is echoed back as given: the client's own text, not a leak.
    if status != StatusCode::OK {
        if let Some(fields) = json.as_object_mut() {
            fields.remove("order_uid");
        }
    }
    assert_no_internals(&json.to_string(), "");
});
