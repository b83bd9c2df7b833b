//! The common case, a valid order, read by serde straight into the typed model
//! and checked without building a JSON tree: about twice as fast as the tree.
//! It only ever says "valid"; whatever it doubts (a type, a missing or unknown
//! field, a broken rule) goes to the tree walk in `parse`, which finds and
//! explains every problem. Both apply the rules declared in `fields`.

use super::fields::{all_hold, DELIVERY, ITEM, ORDER, PAYMENT};
use super::order::OrderDocument;
use super::parse::{check_money_adds_up, Limits, Problems};
use super::rules;

pub(super) fn read_valid(text: &str, limits: &Limits) -> Option<OrderDocument> {
    // Order ids and timestamps are checked while they are read.
    let document: OrderDocument = serde_json::from_str(text).ok()?;
    holds(&document, limits).then_some(document)
}

fn holds(d: &OrderDocument, l: &Limits) -> bool {
    let plain = |value: &str| rules::bounded_text(value, l.max_string_chars).is_ok();
    let mut money = Problems::default();
    check_money_adds_up(&d.payment, &d.items, &mut money);

    all_hold(&ORDER, d, l)
        && plain(d.order_uid.as_str())
        && plain(d.date_created.as_str())
        && all_hold(&DELIVERY, &d.delivery, l)
        && all_hold(&PAYMENT, &d.payment, l)
        && (1..=l.max_items).contains(&d.items.len())
        && d.items.iter().all(|item| {
            item.track_number == d.track_number
                && all_hold(&ITEM, item, l)
                && rules::item_total(item.price, item.sale, item.total_price).is_ok()
        })
        && money.is_empty()
}
