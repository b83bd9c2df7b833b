//! The order model. An [`Order`] only comes out of [`super::parse_order`], so
//! anything holding one holds a valid order; the document types alone promise
//! only the shape.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{rules, OrderUid};

/// A valid order. Fields are read through [`Order::document`]; the only way to
/// build one is [`super::parse_order`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    document: OrderDocument,
}

impl Order {
    pub(super) fn from_valid(document: OrderDocument) -> Self {
        Self { document }
    }

    pub fn uid(&self) -> &OrderUid {
        &self.document.order_uid
    }

    pub fn document(&self) -> &OrderDocument {
        &self.document
    }

    /// The canonical JSON of the order: same field names and values as received.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.document).expect("an order always serializes")
    }
}

/// The fields of an order, in the order of the published model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Order)]
pub struct OrderDocument {
    pub order_uid: OrderUid,
    pub track_number: String,
    pub entry: String,
    pub delivery: Delivery,
    pub payment: Payment,
    #[schema(min_items = 1)]
    pub items: Vec<Item>,
    pub locale: String,
    pub internal_signature: String,
    pub customer_id: String,
    pub delivery_service: String,
    pub shardkey: String,
    pub sm_id: i64,
    #[schema(value_type = String, format = DateTime)]
    pub date_created: Timestamp,
    pub oof_shard: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    pub name: String,
    pub phone: String,
    pub zip: String,
    pub city: String,
    pub address: String,
    pub region: String,
    pub email: String,
}

/// Money amounts are integers in the currency's minor unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    pub transaction: String,
    pub request_id: String,
    pub currency: String,
    pub provider: String,
    pub amount: i64,
    pub payment_dt: i64,
    pub bank: String,
    pub delivery_cost: i64,
    pub goods_total: i64,
    pub custom_fee: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub chrt_id: i64,
    pub track_number: String,
    pub price: i64,
    pub rid: String,
    pub name: String,
    pub sale: i64,
    pub size: String,
    pub total_price: i64,
    pub nm_id: i64,
    pub brand: String,
    pub status: i64,
}

/// An RFC 3339 time that keeps its original text, so the order serializes back
/// exactly as received (`Z` stays `Z`, fractional digits stay as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timestamp {
    text: String,
    at: DateTime<FixedOffset>,
}

impl Timestamp {
    /// An RFC 3339 time in the range `payment_dt` takes (after 1970, before
    /// the year 3000). Wider would let in times PostgreSQL cannot hold (year 0).
    pub fn parse(text: &str) -> Option<Self> {
        let at = DateTime::parse_from_rfc3339(text).ok()?;
        rules::unix_time(at.timestamp()).is_ok().then(|| Self {
            text: text.to_owned(),
            at,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn at(&self) -> DateTime<FixedOffset> {
        self.at
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Timestamp::parse(&text).ok_or_else(|| serde::de::Error::custom("not an RFC 3339 date-time"))
    }
}
