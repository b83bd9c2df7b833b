//! Raw bytes to a valid [`Order`] in one step, collecting every problem with its
//! JSON path. A valid order takes the typed [`fast_path`]; anything else is read
//! into a tree once and each field is taken out of its object, so whatever is
//! left over is an unknown field.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::fields::{Field, Kind, DELIVERY, ITEM, ORDER, PAYMENT};
use super::order::{Item, Order, OrderDocument, Payment, Timestamp};
use super::rejection::{Problem, Rejection, Stage};
use super::rules::{self, RuleResult};
use super::unique_keys::UniqueKeys;
use super::{fast_path, OrderUid};

/// Bounds that keep one message from costing unbounded memory or time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Larger messages are rejected before they are read.
    pub max_message_bytes: usize,
    pub max_items: usize,
    /// The longest text field, in characters.
    pub max_string_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            max_items: 1000,
            max_string_chars: 1024,
        }
    }
}

/// Decides whether `bytes` is an order. Never panics, whatever the input.
pub fn parse_order(bytes: &[u8], limits: &Limits) -> Result<Order, Rejection> {
    if bytes.len() > limits.max_message_bytes {
        return Err(Rejection::too_large(
            bytes.len() as u64,
            limits.max_message_bytes,
        ));
    }
    if bytes.starts_with(b"\xff\xfe") || bytes.starts_with(b"\xfe\xff") {
        return Err(Rejection::single(
            Stage::Parse,
            "not valid UTF-8: the message starts with a UTF-16 byte order mark; orders are UTF-8 JSON",
        ));
    }
    // Schema-registry serializers (Confluent's JSON Schema one) put a magic
    // byte 0 and a 4-byte schema id before the document.
    if let [0, a, b, c, d, b'{', ..] = bytes {
        let id = u32::from_be_bytes([*a, *b, *c, *d]);
        return Err(Rejection::single(
            Stage::Parse,
            format!(
                "the message starts with a schema registry header (magic byte 0, schema id {id}); \
                 orders are plain JSON, without it"
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Rejection::single(
            Stage::Parse,
            format!("not valid UTF-8 (first bad byte at {})", e.valid_up_to()),
        )
    })?;
    // A UTF-8 byte order mark, which some writers put first, is not part of
    // the document (RFC 8259 lets a reader ignore it): the order is read as
    // if it were not there.
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    if text.bytes().all(|b| b.is_ascii_whitespace()) {
        return Err(Rejection::single(Stage::Parse, "message is empty"));
    }
    match fast_path::read_valid(text, limits) {
        Some(document) => Ok(Order::from_valid(document)),
        None => read_tree(text, limits),
    }
}

/// The thorough path: every problem, with its path and reason.
pub(super) fn read_tree(text: &str, limits: &Limits) -> Result<Order, Rejection> {
    let UniqueKeys(value) = serde_json::from_str(text).map_err(|e| {
        let reason = if e.is_eof() {
            format!(
                "truncated JSON: input ends at line {} column {}",
                e.line(),
                e.column()
            )
        } else if e.is_data() {
            // Well-formed, but ambiguous: a key twice in one object.
            e.to_string()
        } else {
            format!("not JSON: {e}")
        };
        Rejection::single(Stage::Parse, reason)
    })?;
    let Value::Object(map) = value else {
        return Err(Rejection::single(
            Stage::Parse,
            format!("expected a JSON object, found {}", kind(&value)),
        ));
    };

    let mut problems = Problems::default();
    let document = read_order(Object::root(map), &mut problems, limits);
    match document {
        Some(document) if problems.0.is_empty() => Ok(Order::from_valid(document)),
        _ => Err(Rejection::new(Stage::Validate, problems.0)),
    }
}

// Every field is read before any `?`, so one bad field never hides another.
fn read_order(mut o: Object, p: &mut Problems, l: &Limits) -> Option<OrderDocument> {
    let mut valid = Map::new();
    let mut all_ok = true;
    let (mut delivery, mut payment, mut items) = (None, None, None);
    for field in &ORDER {
        all_ok &= match (&field.kind, field.name) {
            (Kind::Own, "order_uid") => {
                o.text(p, l, "order_uid")
                    .is_some_and(|v| match OrderUid::parse(&v) {
                        Ok(_) => {
                            valid.insert("order_uid".into(), Value::String(v));
                            true
                        }
                        Err(reason) => {
                            p.add(o.path_of("order_uid"), reason);
                            false
                        }
                    })
            }
            (Kind::Own, "delivery") => {
                delivery = o
                    .object(p, "delivery")
                    .and_then(|d| d.read(p, l, &DELIVERY));
                delivery.is_some()
            }
            (Kind::Own, "payment") => {
                payment = o.object(p, "payment").and_then(|d| d.read(p, l, &PAYMENT));
                payment.is_some()
            }
            (Kind::Own, "items") => {
                let track = valid.get("track_number").and_then(Value::as_str);
                items = read_items(&mut o, p, l, track);
                items.is_some()
            }
            (Kind::Own, "date_created") => o.text(p, l, "date_created").is_some_and(|v| {
                if Timestamp::parse(&v).is_some() {
                    valid.insert("date_created".into(), Value::String(v));
                    true
                } else {
                    p.add(
                        o.path_of("date_created"),
                        format!(
                            "{} is not an RFC 3339 date-time from 1970 to 2999, such as 2021-11-26T06:22:19Z",
                            rules::shown(&v)
                        ),
                    );
                    false
                }
            }),
            _ => o.field(p, l, field, &mut valid),
        };
    }
    o.finish(p);

    if let (Some(payment), Some(items)) = (&payment, &items) {
        check_money_adds_up(payment, items, p);
    }
    if !all_ok {
        return None;
    }
    // The nested parts were read typed already; the document takes them back.
    for (name, part) in [
        ("delivery", serde_json::to_value(delivery?)),
        ("payment", serde_json::to_value(payment?)),
        ("items", serde_json::to_value(items?)),
    ] {
        valid.insert(name.into(), part.ok()?);
    }
    typed(valid)
}

fn read_items(
    o: &mut Object,
    p: &mut Problems,
    l: &Limits,
    order_track: Option<&str>,
) -> Option<Vec<Item>> {
    let (path, values) = o.array(p, "items")?;
    if values.is_empty() {
        p.add(path, "must not be empty");
        return None;
    }
    if values.len() > l.max_items {
        p.add(
            path,
            format!("has {} items, the limit is {}", values.len(), l.max_items),
        );
        return None;
    }
    let mut items = Vec::with_capacity(values.len());
    let mut all_ok = true;
    for (i, value) in values.into_iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let item = Object::nested(item_path.clone(), value, p).and_then(|o| read_item(o, p, l));
        match item {
            Some(item) => {
                if let Some(track) = order_track.filter(|t| *t != item.track_number) {
                    p.add(
                        format!("{item_path}.track_number"),
                        format!(
                            "is {}, but the order's track_number is {}",
                            rules::shown(&item.track_number),
                            rules::shown(track)
                        ),
                    );
                }
                items.push(item);
            }
            None => all_ok = false,
        }
    }
    all_ok.then_some(items)
}

fn read_item(mut o: Object, p: &mut Problems, l: &Limits) -> Option<Item> {
    let (valid, all_ok) = o.fields(p, l, &ITEM);
    let integer = |name: &str| valid.get(name).and_then(Value::as_i64);
    if let (Some(price), Some(sale), Some(total)) =
        (integer("price"), integer("sale"), integer("total_price"))
    {
        if let Err(reason) = rules::item_total(price, sale, total) {
            p.add(o.path_of("total_price"), reason);
        }
    }
    o.finish(p);
    all_ok.then(|| typed(valid)).flatten()
}

/// The typed value of fields that all passed their checks.
fn typed<T: serde::de::DeserializeOwned>(valid: Map<String, Value>) -> Option<T> {
    serde_json::from_value(Value::Object(valid)).ok()
}

/// `goods_total` is what the items cost, and `amount` is what was charged:
/// goods, delivery and customs fee.
pub(super) fn check_money_adds_up(payment: &Payment, items: &[Item], p: &mut Problems) {
    let items_total = items
        .iter()
        .try_fold(0i64, |sum, item| sum.checked_add(item.total_price));
    match items_total {
        Some(sum) if sum != payment.goods_total => p.add(
            "payment.goods_total",
            format!(
                "is {}, but the items' total_price values add up to {sum}",
                payment.goods_total
            ),
        ),
        None => p.add("items", "the sum of total_price does not fit in 64 bits"),
        Some(_) => {}
    }
    let charged = payment
        .goods_total
        .checked_add(payment.delivery_cost)
        .and_then(|s| s.checked_add(payment.custom_fee));
    match charged {
        Some(sum) if sum != payment.amount => p.add(
            "payment.amount",
            format!(
                "is {}, but goods_total + delivery_cost + custom_fee is {sum}",
                payment.amount
            ),
        ),
        None => p.add(
            "payment.amount",
            "goods_total + delivery_cost + custom_fee does not fit in 64 bits",
        ),
        Some(_) => {}
    }
}

#[derive(Default)]
pub(super) struct Problems(Vec<Problem>);

impl Problems {
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            reason: reason.into(),
        });
    }
}

/// A JSON object whose fields are taken out one by one.
struct Object {
    path: String,
    map: Map<String, Value>,
}

impl Object {
    fn root(map: Map<String, Value>) -> Self {
        Self {
            path: String::new(),
            map,
        }
    }

    fn nested(path: String, value: Value, p: &mut Problems) -> Option<Self> {
        match value {
            Value::Object(map) => Some(Self { path, map }),
            other => {
                p.add(path, format!("must be an object, found {}", kind(&other)));
                None
            }
        }
    }

    fn path_of(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn take(&mut self, p: &mut Problems, name: &str) -> Option<Value> {
        let value = self.map.remove(name);
        if value.is_none() {
            p.add(self.path_of(name), "is required");
        }
        value
    }

    fn object(&mut self, p: &mut Problems, name: &str) -> Option<Object> {
        let value = self.take(p, name)?;
        Object::nested(self.path_of(name), value, p)
    }

    fn array(&mut self, p: &mut Problems, name: &str) -> Option<(String, Vec<Value>)> {
        match self.take(p, name)? {
            Value::Array(values) => Some((self.path_of(name), values)),
            other => {
                p.add(
                    self.path_of(name),
                    format!("must be an array, found {}", kind(&other)),
                );
                None
            }
        }
    }

    /// Reads an object with no fields of its own kind: every field checked,
    /// then the typed value if all hold.
    fn read<T: serde::de::DeserializeOwned>(
        mut self,
        p: &mut Problems,
        l: &Limits,
        fields: &[Field<T>],
    ) -> Option<T> {
        let (valid, all_ok) = self.fields(p, l, fields);
        self.finish(p);
        all_ok.then(|| typed(valid)).flatten()
    }

    /// Takes and checks each of `fields`; the values that hold, and whether all did.
    fn fields<T>(
        &mut self,
        p: &mut Problems,
        l: &Limits,
        fields: &[Field<T>],
    ) -> (Map<String, Value>, bool) {
        let mut valid = Map::new();
        let mut all_ok = true;
        for field in fields {
            all_ok &= self.field(p, l, field, &mut valid);
        }
        (valid, all_ok)
    }

    /// Takes `field` out of the object and checks its type and rule; a value
    /// that holds goes into `valid`.
    fn field<T>(
        &mut self,
        p: &mut Problems,
        l: &Limits,
        field: &Field<T>,
        valid: &mut Map<String, Value>,
    ) -> bool {
        let value = match field.kind {
            Kind::Text(_, rule) => self
                .text(p, l, field.name)
                .filter(|text| rule.is_none_or(|rule| self.check(p, field.name, rule(text))))
                .map(Value::String),
            Kind::Integer(_, rule) => self.integer_with(p, field.name, rule).map(Value::from),
            Kind::Own => unreachable!("{} has a reader of its own", field.name),
        };
        let Some(value) = value else { return false };
        valid.insert(field.name.to_owned(), value);
        true
    }

    /// A string within the length limit and free of control characters.
    fn text(&mut self, p: &mut Problems, l: &Limits, name: &str) -> Option<String> {
        let text = match self.take(p, name)? {
            Value::String(text) => text,
            other => {
                p.add(
                    self.path_of(name),
                    format!("must be a string, found {}", kind(&other)),
                );
                return None;
            }
        };
        if let Err(reason) = rules::bounded_text(&text, l.max_string_chars) {
            p.add(self.path_of(name), reason);
            return None;
        }
        Some(text)
    }

    /// A JSON integer that fits in i64. Larger or fractional numbers are
    /// rejected, never wrapped or rounded.
    fn integer_with(
        &mut self,
        p: &mut Problems,
        name: &str,
        rule: fn(i64) -> RuleResult,
    ) -> Option<i64> {
        let value = match self.take(p, name)? {
            Value::Number(n) => match n.as_i64() {
                Some(v) => v,
                None => {
                    let whole = n.as_f64().filter(|f| f.fract() == 0.0);
                    let reason = if n.is_u64() {
                        format!("{n} is larger than the largest allowed value {}", i64::MAX)
                    } else if whole.is_some_and(|f| f.abs() < i64::MAX as f64) {
                        // 1817.0: the value fits, its spelling is a float's.
                        format!("must be an integer, without a fraction or exponent, found {n}")
                    } else if whole.is_some() {
                        format!("{n} is outside the 64-bit integer range")
                    } else {
                        format!("must be a whole number, found {n}")
                    };
                    p.add(self.path_of(name), reason);
                    return None;
                }
            },
            other => {
                p.add(
                    self.path_of(name),
                    format!("must be an integer, found {}", kind(&other)),
                );
                return None;
            }
        };
        self.check(p, name, rule(value)).then_some(value)
    }

    fn check(&self, p: &mut Problems, name: &str, result: RuleResult) -> bool {
        match result {
            Ok(()) => true,
            Err(reason) => {
                p.add(self.path_of(name), reason);
                false
            }
        }
    }

    /// Whatever was not taken is not part of the model.
    fn finish(self, p: &mut Problems) {
        for name in self.map.keys() {
            p.add(self.path_of(name), "unknown field");
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
