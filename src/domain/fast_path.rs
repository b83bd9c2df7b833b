//! The common case, a valid order, read by serde straight into the typed model
//! and checked without building a JSON tree: about twice as fast as the tree.
//! It only ever says "valid"; whatever it doubts (a type, a missing or unknown
//! field, a broken rule) goes to the tree walk in `parse`, which finds and
//! explains every problem. Tests hold both paths to the same verdict.

use super::order::{Delivery, Item, OrderDocument, Payment};
use super::parse::{check_money_adds_up, Limits, Problems};
use super::rules::{self, RuleResult};

pub(super) fn read_valid(text: &str, limits: &Limits) -> Option<OrderDocument> {
    // Order ids and timestamps are checked while they are read.
    let document: OrderDocument = serde_json::from_str(text).ok()?;
    holds(&document, limits).then_some(document)
}

fn holds(d: &OrderDocument, l: &Limits) -> bool {
    let text = |value: &str, rule: fn(&str) -> RuleResult| {
        rules::bounded_text(value, l.max_string_chars).is_ok() && rule(value).is_ok()
    };
    let plain = |value: &str| rules::bounded_text(value, l.max_string_chars).is_ok();
    let mut money = Problems::default();
    check_money_adds_up(&d.payment, &d.items, &mut money);

    plain(d.order_uid.as_str())
        && text(&d.track_number, rules::non_empty)
        && text(&d.entry, rules::non_empty)
        && delivery_holds(&d.delivery, text, plain)
        && payment_holds(&d.payment, text, plain)
        && (1..=l.max_items).contains(&d.items.len())
        && d.items
            .iter()
            .all(|item| item.track_number == d.track_number && item_holds(item, text, plain))
        && text(&d.locale, rules::locale)
        && plain(&d.internal_signature)
        && text(&d.customer_id, rules::non_empty)
        && text(&d.delivery_service, rules::non_empty)
        && text(&d.shardkey, rules::digits)
        && rules::positive(d.sm_id).is_ok()
        && plain(d.date_created.as_str())
        && text(&d.oof_shard, rules::digits)
        && money.is_empty()
}

fn delivery_holds(
    d: &Delivery,
    text: impl Fn(&str, fn(&str) -> RuleResult) -> bool,
    plain: impl Fn(&str) -> bool,
) -> bool {
    text(&d.name, rules::non_empty)
        && text(&d.phone, rules::e164)
        && text(&d.zip, rules::digits)
        && text(&d.city, rules::non_empty)
        && text(&d.address, rules::non_empty)
        && plain(&d.region)
        && text(&d.email, rules::email)
}

fn payment_holds(
    p: &Payment,
    text: impl Fn(&str, fn(&str) -> RuleResult) -> bool,
    plain: impl Fn(&str) -> bool,
) -> bool {
    text(&p.transaction, rules::non_empty)
        && plain(&p.request_id)
        && text(&p.currency, rules::currency)
        && text(&p.provider, rules::non_empty)
        && rules::non_negative(p.amount).is_ok()
        && rules::unix_time(p.payment_dt).is_ok()
        && plain(&p.bank)
        && rules::non_negative(p.delivery_cost).is_ok()
        && rules::non_negative(p.goods_total).is_ok()
        && rules::non_negative(p.custom_fee).is_ok()
}

fn item_holds(
    i: &Item,
    text: impl Fn(&str, fn(&str) -> RuleResult) -> bool,
    plain: impl Fn(&str) -> bool,
) -> bool {
    rules::positive(i.chrt_id).is_ok()
        && text(&i.track_number, rules::non_empty)
        && rules::non_negative(i.price).is_ok()
        && text(&i.rid, rules::non_empty)
        && text(&i.name, rules::non_empty)
        && rules::percent(i.sale).is_ok()
        && plain(&i.size)
        && rules::non_negative(i.total_price).is_ok()
        && rules::positive(i.nm_id).is_ok()
        && plain(&i.brand)
        && rules::item_status(i.status).is_ok()
        && rules::item_total(i.price, i.sale, i.total_price).is_ok()
}
