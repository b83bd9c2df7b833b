//! Any bytes: parse_order returns an order or a rejection, never panics, and a
//! parsed order serializes to JSON that parses back to the same order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use order_service::domain::{parse_order, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(order) = parse_order(data, &limits) {
        let again = parse_order(&order.to_json(), &limits).expect("a parsed order parses again");
        assert_eq!(again, order);
    }
});
