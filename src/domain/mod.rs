//! The order and the decision whether a message is one.

mod fast_path;
mod fields;
mod order;
mod order_uid;
mod parse;
mod rejection;
pub mod rules;
mod unique_keys;

pub use order::{Delivery, Item, Order, OrderDocument, Payment, Timestamp};
pub use order_uid::{claimed_uid, OrderUid, MAX_ORDER_UID_LEN};
pub use parse::{parse_order, Limits};
pub use rejection::{Problem, Rejection, Stage, StageName, LETTER_STAGES};

/// The published sample order, valid under every rule.
pub const SAMPLE_ORDER: &str = include_str!("sample_order.json");

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn sample() -> Value {
        serde_json::from_str(SAMPLE_ORDER).unwrap()
    }

    fn parse_value(value: &Value) -> Result<Order, Rejection> {
        let bytes = serde_json::to_vec(value).unwrap();
        assert_paths_agree(&bytes);
        parse_order(&bytes, &Limits::default())
    }

    /// The typed fast path accepts exactly what the tree walk accepts.
    fn assert_paths_agree(bytes: &[u8]) {
        let limits = Limits::default();
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        let fast = fast_path::read_valid(text, &limits);
        let tree = parse::read_tree(text, &limits);
        assert_eq!(
            fast.is_some(),
            tree.is_ok(),
            "fast path {} but the tree walk says {:?} for {text}",
            if fast.is_some() { "accepts" } else { "rejects" },
            tree.as_ref().map_err(ToString::to_string).map(|_| "valid"),
        );
        if let (Some(fast), Ok(tree)) = (fast, tree) {
            assert_eq!(&fast, tree.document());
        }
    }

    /// Applies `edit` to the sample and returns the reasons it is rejected with.
    fn reasons_after(edit: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut order = sample();
        edit(&mut order);
        match parse_value(&order) {
            Ok(_) => vec![],
            Err(rejection) => {
                assert_eq!(rejection.stage(), Stage::Validate);
                rejection.reasons()
            }
        }
    }

    #[test]
    fn the_sample_is_valid_and_round_trips() {
        let order = parse_order(SAMPLE_ORDER.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(order.uid().as_str(), "b563feb7b2b84b6test");
        let back: Value = serde_json::from_slice(&order.to_json()).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn each_rule_rejects_with_its_reason() {
        type Edit = fn(&mut Value);
        let cases: Vec<(Edit, &str)> = vec![
            (|o| o["order_uid"] = json!(""), "order_uid: must not be empty"),
            (|o| o["order_uid"] = json!("a/b"), "order_uid: contains '/'; only ASCII letters, digits, '_' and '-' are allowed"),
            (|o| o["order_uid"] = json!("x".repeat(65)), "order_uid: is 65 characters long, the limit is 64"),
            (|o| o["track_number"] = json!(""), "track_number: must not be empty"),
            (|o| o["entry"] = json!(""), "entry: must not be empty"),
            (|o| o["items"] = json!([]), "items: must not be empty"),
            (|o| o["items"] = json!({}), "items: must be an array, found an object"),
            (|o| o["items"][0]["track_number"] = json!("OTHER"), "items[0].track_number: is \"OTHER\", but the order's track_number is \"WBILMTESTTRACK\""),
            (|o| o["delivery"]["phone"] = json!("call 900-1234"), "delivery.phone: \"call 900-1234\" is not a phone number (7 to 15 digits after an optional +, separated by spaces, hyphens, dots or parentheses only)"),
            (|o| o["delivery"]["email"] = json!("test-at-gmail"), "delivery.email: \"test-at-gmail\" is not an email address"),
            (|o| o["delivery"]["zip"] = json!("n/a"), "delivery.zip: \"n/a\" is not a postal code (2 to 10 letters, digits, spaces or hyphens, with a digit)"),
            (|o| o["delivery"]["name"] = json!(""), "delivery.name: must not be empty"),
            (|o| o["delivery"]["city"] = json!(""), "delivery.city: must not be empty"),
            (|o| o["delivery"]["address"] = json!(""), "delivery.address: must not be empty"),
            (|o| o["payment"]["currency"] = json!("XYZ"), "payment.currency: \"XYZ\" is not an ISO 4217 code"),
            (|o| o["payment"]["transaction"] = json!(""), "payment.transaction: must not be empty"),
            (|o| o["payment"]["provider"] = json!(""), "payment.provider: must not be empty"),
            (|o| o["payment"]["payment_dt"] = json!(0), "payment.payment_dt: must be a positive Unix time in seconds, found 0"),
            (|o| o["payment"]["payment_dt"] = json!(1_637_907_727_000i64), "payment.payment_dt: 1637907727000 is after the year 3000; Unix time is in seconds, not milliseconds"),
            (|o| o["locale"] = json!("en US"), "locale: \"en US\" is not a BCP 47 language tag"),
            (|o| o["shardkey"] = json!("nine"), "shardkey: must be decimal digits, found \"nine\""),
            (|o| o["oof_shard"] = json!("-1"), "oof_shard: must be decimal digits, found \"-1\""),
            (|o| o["sm_id"] = json!(0), "sm_id: must be greater than 0, found 0"),
            (|o| o["sm_id"] = json!(1.5), "sm_id: must be a whole number, found 1.5"),
            (|o| o["payment"]["amount"] = json!(1817.0), "payment.amount: must be an integer, without a fraction or exponent, found 1817.0"),
            (|o| o["payment"]["amount"] = json!(1e19), "payment.amount: 1e+19 is outside the 64-bit integer range"),
            (|o| o["sm_id"] = json!("99"), "sm_id: must be an integer, found a string"),
            (|o| o["date_created"] = json!("26.11.2021"), "date_created: \"26.11.2021\" is not an RFC 3339 date-time from 1970 to 2999, such as 2021-11-26T06:22:19Z"),
            (|o| o["date_created"] = json!("0000-01-01T00:00:00Z"), "date_created: \"0000-01-01T00:00:00Z\" is not an RFC 3339 date-time from 1970 to 2999, such as 2021-11-26T06:22:19Z"),
            (|o| o["date_created"] = json!("3000-01-01T00:00:00Z"), "date_created: \"3000-01-01T00:00:00Z\" is not an RFC 3339 date-time from 1970 to 2999, such as 2021-11-26T06:22:19Z"),
            (|o| o["customer_id"] = json!(""), "customer_id: must not be empty"),
            (|o| o["delivery_service"] = json!(""), "delivery_service: must not be empty"),
            (|o| o["items"][0]["sale"] = json!(101), "items[0].sale: must be between 0 and 100, found 101"),
            (|o| o["items"][0]["chrt_id"] = json!(0), "items[0].chrt_id: must be greater than 0, found 0"),
            (|o| o["items"][0]["nm_id"] = json!(-5), "items[0].nm_id: must be greater than 0, found -5"),
            (|o| o["items"][0]["status"] = json!(1000), "items[0].status: must be between 0 and 999, found 1000"),
            (|o| o["items"][0]["rid"] = json!(""), "items[0].rid: must not be empty"),
            (|o| o["items"][0]["name"] = json!(""), "items[0].name: must not be empty"),
            (|o| o["items"][0] = json!("item"), "items[0]: must be an object, found a string"),
            (|o| { o["payment"]["goods_total"] = json!(300); o["payment"]["amount"] = json!(1800); }, "payment.goods_total: is 300, but the items' total_price values add up to 317"),
            (|o| o["payment"]["amount"] = json!(1), "payment.amount: is 1, but goods_total + delivery_cost + custom_fee is 1817"),
            (|o| o["delivery"]["city"] = json!("Kiryat\nMozkin"), "delivery.city: contains the control character U+000A"),
            (|o| o["delivery"]["address"] = json!("x".repeat(1025)), "delivery.address: is 1025 characters long, the limit is 1024"),
            (|o| o["delivery"] = json!(null), "delivery: must be an object, found null"),
            (|o| { o.as_object_mut().unwrap().remove("locale"); }, "locale: is required"),
            (|o| o["extra"] = json!(1), "extra: unknown field"),
            (|o| o["payment"]["tip"] = json!(1), "payment.tip: unknown field"),
            (|o| o["items"][0]["color"] = json!("red"), "items[0].color: unknown field"),
            (|o| o["delivery"]["name"] = json!({"first": {"deeper": [1]}}), "delivery.name: must be a string, found an object"),
        ];
        for (edit, expected) in cases {
            let reasons = reasons_after(edit);
            assert_eq!(reasons.first().map(String::as_str), Some(expected));
            assert_eq!(reasons.len(), 1, "{reasons:?}");
        }
        // A wrong item total also breaks the goods total; both are reported.
        let reasons = reasons_after(|o| o["items"][0]["total_price"] = json!(400));
        assert_eq!(
            reasons,
            vec![
                "items[0].total_price: is 400, but price 453 less 30% sale is between 317 and 318",
                "payment.goods_total: is 317, but the items' total_price values add up to 400",
            ]
        );
    }

    #[test]
    fn money_is_never_wrapped_or_rounded() {
        let too_big: Value = serde_json::from_str("9223372036854775808").unwrap();
        let reasons = reasons_after(|o| o["payment"]["amount"] = too_big);
        assert_eq!(
            reasons[0],
            "payment.amount: 9223372036854775808 is larger than the largest allowed value 9223372036854775807"
        );
        let raw = SAMPLE_ORDER.replace("\"amount\": 1817", "\"amount\": 1e400");
        let rejection = parse_order(raw.as_bytes(), &Limits::default()).unwrap_err();
        assert_eq!(rejection.stage(), Stage::Parse, "{rejection}");
        let reasons = reasons_after(|o| o["payment"]["custom_fee"] = json!(-1));
        assert_eq!(
            reasons[0],
            "payment.custom_fee: must not be negative, found -1"
        );
    }

    #[test]
    fn empty_strings_allowed_where_the_model_allows_them() {
        let reasons = reasons_after(|o| {
            o["internal_signature"] = json!("");
            o["payment"]["request_id"] = json!("");
        });
        assert!(reasons.is_empty(), "{reasons:?}");
    }

    #[test]
    fn every_problem_is_listed_not_just_the_first() {
        let reasons = reasons_after(|o| {
            o["order_uid"] = json!("");
            o["delivery"]["email"] = json!("nope");
            o["payment"]["currency"] = json!("XYZ");
            o["items"][0]["sale"] = json!(-1);
            o["bogus"] = json!(true);
        });
        assert_eq!(
            reasons,
            vec![
                "order_uid: must not be empty",
                "delivery.email: \"nope\" is not an email address",
                "payment.currency: \"XYZ\" is not an ISO 4217 code",
                "items[0].sale: must be between 0 and 100, found -1",
                "bogus: unknown field",
            ]
        );
    }

    /// A UTF-8 byte order mark first is ignored, as RFC 8259 allows: some
    /// writers put one before every document.
    #[test]
    fn a_leading_byte_order_mark_is_not_part_of_the_order() {
        let limits = Limits::default();
        let sample = SAMPLE_ORDER.as_bytes();
        let plain = parse_order(sample, &limits).unwrap();
        let with_mark = parse_order(&[&b"\xef\xbb\xbf"[..], sample].concat(), &limits).unwrap();
        assert_eq!(with_mark.to_json(), plain.to_json());
        // Only first: anywhere else it is text that is not JSON.
        let inside = [&b" \xef\xbb\xbf"[..], sample].concat();
        assert_eq!(
            parse_order(&inside, &limits).unwrap_err().stage(),
            Stage::Parse
        );
    }

    /// A field named twice is two orders to two readers (serde_json keeps
    /// the last, others the first): refused, on both paths, at any depth.
    #[test]
    fn a_field_named_twice_is_refused() {
        let limits = Limits::default();
        for (find, twice) in [
            (
                r#""order_uid": "b563feb7b2b84b6test""#,
                r#""order_uid": "x""#,
            ),
            (r#""zip": "2639809""#, r#""zip": "2639809""#),
            (r#""amount": 1817"#, r#""amount": 5"#),
            (r#""nm_id": 2389212"#, r#""nm_id": 1"#),
        ] {
            assert!(SAMPLE_ORDER.contains(find), "{find}");
            let text = SAMPLE_ORDER.replacen(find, &format!("{find}, {twice}"), 1);
            assert_paths_agree(text.as_bytes());
            let rejection = parse_order(text.as_bytes(), &limits).unwrap_err();
            assert_eq!(rejection.stage(), Stage::Parse, "{twice}");
            let key = twice.split(':').next().unwrap();
            assert!(
                rejection.to_string().starts_with(&format!(
                    "the key {key} appears twice in one object at line "
                )),
                "{rejection}"
            );
        }
    }

    #[test]
    fn malformed_messages_are_parse_rejections() {
        let limits = Limits::default();
        let cases: Vec<(&[u8], &str)> = vec![
            (b"", "message is empty"),
            (b"  \n", "message is empty"),
            (b"\xef\xbb\xbf \n", "message is empty"),
            (
                b"\xff\xfe{\x00}\x00",
                "not valid UTF-8: the message starts with a UTF-16 byte order mark; orders are UTF-8 JSON",
            ),
            (b"\xfe\xff\x00{\x00}", "not valid UTF-8: the message starts with a UTF-16 byte order mark; orders are UTF-8 JSON"),
            (b"\xc3\x28{}", "not valid UTF-8 (first bad byte at 0)"),
            (
                b"\x00\x00\x00\x01\x2a{\"order_uid\": \"a\"}",
                "the message starts with a schema registry header (magic byte 0, schema id 298); orders are plain JSON, without it",
            ),
            (b"\x00{}", "not JSON: expected value at line 1 column 1"),
            (b"hello", "not JSON: expected value at line 1 column 1"),
            (
                b"{\"order_uid\": \"a\"",
                "truncated JSON: input ends at line 1 column 17",
            ),
            (b"[1, 2]", "expected a JSON object, found an array"),
            (b"42", "expected a JSON object, found a number"),
            (b"null", "expected a JSON object, found null"),
        ];
        for (input, expected) in cases {
            let rejection = parse_order(input, &limits).unwrap_err();
            assert_eq!(rejection.stage(), Stage::Parse);
            assert_eq!(rejection.to_string(), expected, "input {input:?}");
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let rejection = parse_order(
            deep.as_bytes(),
            &Limits {
                max_message_bytes: 1 << 20,
                ..limits
            },
        )
        .unwrap_err();
        assert_eq!(rejection.stage(), Stage::Parse);
        assert!(
            rejection.to_string().contains("recursion limit"),
            "{rejection}"
        );
    }

    #[test]
    fn size_is_checked_before_parsing() {
        let limits = Limits {
            max_message_bytes: 100,
            ..Limits::default()
        };
        let rejection = parse_order(SAMPLE_ORDER.as_bytes(), &limits).unwrap_err();
        assert_eq!(rejection.stage(), Stage::TooLarge);
        assert_eq!(
            rejection.to_string(),
            format!("message is {} bytes, the limit is 100", SAMPLE_ORDER.len())
        );
    }

    proptest::proptest! {
        /// Random edits of a valid order never panic: each result is an order
        /// or a rejection with at least one reason.
        #[test]
        fn mutated_orders_never_panic(
            edits in proptest::collection::vec((0usize..2000, proptest::num::u8::ANY), 1..8),
            cut in proptest::option::of(0usize..2000),
        ) {
            let mut bytes = SAMPLE_ORDER.as_bytes().to_vec();
            for (at, byte) in edits {
                let at = at % bytes.len();
                bytes[at] = byte;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % bytes.len());
            }
            assert_paths_agree(&bytes);
            match parse_order(&bytes, &Limits::default()) {
                Ok(order) => proptest::prop_assert!(!order.uid().as_str().is_empty()),
                Err(rejection) => proptest::prop_assert!(!rejection.problems().is_empty()),
            }
        }
    }

    proptest::proptest! {
        /// Generated orders, valid and each kind of invalid, get the same verdict
        /// from both paths.
        #[test]
        fn both_paths_agree_on_generated_orders(seed in proptest::num::u64::ANY) {
            let mut generator = crate::producer::Generator::new(seed, 5);
            for _ in 0..3 {
                assert_paths_agree(&serde_json::to_vec(&generator.valid()).unwrap());
            }
            for kind in crate::producer::InvalidKind::ALL {
                assert_paths_agree(&serde_json::to_vec(&generator.invalid(kind)).unwrap());
            }
        }
    }

    #[test]
    fn item_count_is_bounded() {
        let limits = Limits {
            max_items: 2,
            ..Limits::default()
        };
        let mut order = sample();
        let item = order["items"][0].clone();
        order["items"] = json!([item.clone(), item.clone(), item]);
        let rejection = parse_order(&serde_json::to_vec(&order).unwrap(), &limits).unwrap_err();
        assert_eq!(
            rejection.reasons(),
            vec!["items: has 3 items, the limit is 2"]
        );
    }
}
