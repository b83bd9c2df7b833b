//! Every field of the order model with its rule, declared once, in the order
//! of the published model. The typed pass checks a deserialized order with
//! these tables; the explaining pass reads a JSON tree field by field with
//! them, so a rule changes in one place.

use super::order::{Delivery, Item, OrderDocument, Payment};
use super::parse::Limits;
use super::rules::{self, RuleResult};

pub(super) struct Field<T> {
    pub name: &'static str,
    pub kind: Kind<T>,
}

pub(super) enum Kind<T> {
    /// A string within the length limit, free of control characters, and
    /// holding its own rule if it has one.
    Text(fn(&T) -> &str, Option<fn(&str) -> RuleResult>),
    /// A JSON integer that fits in 64 bits and holds its rule.
    Integer(fn(&T) -> i64, fn(i64) -> RuleResult),
    /// Read and checked by code of its own: an id, a time, an object, the items.
    Own,
}

const fn text<T>(
    name: &'static str,
    get: fn(&T) -> &str,
    rule: fn(&str) -> RuleResult,
) -> Field<T> {
    Field {
        name,
        kind: Kind::Text(get, Some(rule)),
    }
}

const fn plain<T>(name: &'static str, get: fn(&T) -> &str) -> Field<T> {
    Field {
        name,
        kind: Kind::Text(get, None),
    }
}

const fn integer<T>(
    name: &'static str,
    get: fn(&T) -> i64,
    rule: fn(i64) -> RuleResult,
) -> Field<T> {
    Field {
        name,
        kind: Kind::Integer(get, rule),
    }
}

const fn own<T>(name: &'static str) -> Field<T> {
    Field {
        name,
        kind: Kind::Own,
    }
}

pub(super) const ORDER: [Field<OrderDocument>; 14] = [
    own("order_uid"),
    text("track_number", |o| &o.track_number, rules::non_empty),
    text("entry", |o| &o.entry, rules::non_empty),
    own("delivery"),
    own("payment"),
    own("items"),
    text("locale", |o| &o.locale, rules::locale),
    plain("internal_signature", |o| &o.internal_signature),
    text("customer_id", |o| &o.customer_id, rules::non_empty),
    text(
        "delivery_service",
        |o| &o.delivery_service,
        rules::non_empty,
    ),
    text("shardkey", |o| &o.shardkey, rules::digits),
    integer("sm_id", |o| o.sm_id, rules::positive),
    own("date_created"),
    text("oof_shard", |o| &o.oof_shard, rules::digits),
];

pub(super) const DELIVERY: [Field<Delivery>; 7] = [
    text("name", |d| &d.name, rules::non_empty),
    text("phone", |d| &d.phone, rules::phone),
    text("zip", |d| &d.zip, rules::postal_code),
    text("city", |d| &d.city, rules::non_empty),
    text("address", |d| &d.address, rules::non_empty),
    plain("region", |d| &d.region),
    text("email", |d| &d.email, rules::email),
];

pub(super) const PAYMENT: [Field<Payment>; 10] = [
    text("transaction", |p| &p.transaction, rules::non_empty),
    plain("request_id", |p| &p.request_id),
    text("currency", |p| &p.currency, rules::currency),
    text("provider", |p| &p.provider, rules::non_empty),
    integer("amount", |p| p.amount, rules::non_negative),
    integer("payment_dt", |p| p.payment_dt, rules::unix_time),
    plain("bank", |p| &p.bank),
    integer("delivery_cost", |p| p.delivery_cost, rules::non_negative),
    integer("goods_total", |p| p.goods_total, rules::non_negative),
    integer("custom_fee", |p| p.custom_fee, rules::non_negative),
];

pub(super) const ITEM: [Field<Item>; 11] = [
    integer("chrt_id", |i| i.chrt_id, rules::positive),
    text("track_number", |i| &i.track_number, rules::non_empty),
    integer("price", |i| i.price, rules::non_negative),
    text("rid", |i| &i.rid, rules::non_empty),
    text("name", |i| &i.name, rules::non_empty),
    integer("sale", |i| i.sale, rules::percent),
    plain("size", |i| &i.size),
    integer("total_price", |i| i.total_price, rules::non_negative),
    integer("nm_id", |i| i.nm_id, rules::positive),
    plain("brand", |i| &i.brand),
    integer("status", |i| i.status, rules::item_status),
];

/// Whether every field of `value` that `fields` declares holds its rule
/// (fields with readers of their own are checked by those).
pub(super) fn all_hold<T>(fields: &[Field<T>], value: &T, limits: &Limits) -> bool {
    fields.iter().all(|field| match field.kind {
        Kind::Text(get, rule) => {
            let text = get(value);
            rules::bounded_text(text, limits.max_string_chars).is_ok()
                && rule.is_none_or(|rule| rule(text).is_ok())
        }
        Kind::Integer(get, rule) => rule(get(value)).is_ok(),
        Kind::Own => true,
    })
}
