//! Realistic orders, and orders broken on purpose, from a seeded generator.

use fake::faker::address::en::{BuildingNumber, CityName, StateName, StreetName};
use fake::faker::company::en::CompanyName;
use fake::faker::name::en::{FirstName, LastName};
use fake::Fake;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const CURRENCIES: &[&str] = &[
    "USD", "EUR", "RUB", "KZT", "GBP", "BRL", "TRY", "AMD", "BYN", "UZS",
];
const LOCALES: &[&str] = &[
    "en", "ru", "de", "fr", "es", "pt-BR", "zh-Hans", "tr", "kk", "en-GB",
];
const PROVIDERS: &[&str] = &["wbpay", "stripe", "adyen", "paypal", "sbp"];
const BANKS: &[&str] = &["alpha", "sber", "tinkoff", "vtb", "raiffeisen", "kaspi"];
const SERVICES: &[&str] = &["meest", "cdek", "dhl", "boxberry", "russianpost", "dpd"];
const PRODUCTS: &[&str] = &[
    "Mascaras",
    "Sneakers",
    "T-shirt",
    "Backpack",
    "Headphones",
    "Kettle",
    "Notebook",
    "Desk lamp",
    "Yoga mat",
    "Phone case",
    "Water bottle",
    "Sunglasses",
    "Scarf",
    "Board game",
    "Coffee beans",
];
/// Postal codes with letters, spaces and hyphens (UK, US ZIP+4, Canada, the Netherlands).
const POSTCODES: &[&str] = &["SW1A 1AA", "EC1A 1BB", "94107-1234", "K1A 0B1", "1011 AB"];
const SIZES: &[&str] = &["0", "XS", "S", "M", "L", "XL", "42", "44", "one size"];
const EMAIL_DOMAINS: &[&str] = &[
    "gmail.com",
    "mail.ru",
    "yandex.ru",
    "outlook.com",
    "example.org",
];

/// The ways an order is broken on purpose; each breaks exactly one rule, and
/// `field` is the path the rejection names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidKind {
    OrderUid,
    EmptyItems,
    Email,
    Phone,
    Currency,
    NegativePrice,
    Sale,
    ItemTrackNumber,
    DateCreated,
    UnknownField,
    Locale,
    Amount,
    MissingField,
    SmId,
    Zip,
}

impl InvalidKind {
    pub const ALL: [InvalidKind; 15] = [
        InvalidKind::OrderUid,
        InvalidKind::EmptyItems,
        InvalidKind::Email,
        InvalidKind::Phone,
        InvalidKind::Currency,
        InvalidKind::NegativePrice,
        InvalidKind::Sale,
        InvalidKind::ItemTrackNumber,
        InvalidKind::DateCreated,
        InvalidKind::UnknownField,
        InvalidKind::Locale,
        InvalidKind::Amount,
        InvalidKind::MissingField,
        InvalidKind::SmId,
        InvalidKind::Zip,
    ];

    /// The JSON path the rejection reason starts with.
    pub fn field(self) -> &'static str {
        match self {
            InvalidKind::OrderUid => "order_uid",
            InvalidKind::EmptyItems => "items",
            InvalidKind::Email => "delivery.email",
            InvalidKind::Phone => "delivery.phone",
            InvalidKind::Currency => "payment.currency",
            InvalidKind::NegativePrice => "items[0].price",
            InvalidKind::Sale => "items[0].sale",
            InvalidKind::ItemTrackNumber => "items[0].track_number",
            InvalidKind::DateCreated => "date_created",
            InvalidKind::UnknownField => "coupon",
            InvalidKind::Locale => "locale",
            InvalidKind::Amount => "payment.amount",
            InvalidKind::MissingField => "customer_id",
            InvalidKind::SmId => "sm_id",
            InvalidKind::Zip => "delivery.zip",
        }
    }

    fn apply(self, o: &mut Value) {
        match self {
            InvalidKind::OrderUid => o["order_uid"] = json!("../../etc/passwd"),
            InvalidKind::EmptyItems => {
                o["items"] = json!([]);
                o["payment"]["goods_total"] = json!(0);
                let p = &o["payment"];
                let amount = p["delivery_cost"].as_i64().unwrap_or(0)
                    + p["custom_fee"].as_i64().unwrap_or(0);
                o["payment"]["amount"] = json!(amount);
            }
            InvalidKind::Email => o["delivery"]["email"] = json!("not-an-email"),
            InvalidKind::Phone => o["delivery"]["phone"] = json!("call 900-1234"),
            InvalidKind::Currency => o["payment"]["currency"] = json!("XYZ"),
            InvalidKind::NegativePrice => o["items"][0]["price"] = json!(-100),
            InvalidKind::Sale => o["items"][0]["sale"] = json!(150),
            InvalidKind::ItemTrackNumber => o["items"][0]["track_number"] = json!("WBOTHERTRACK"),
            InvalidKind::DateCreated => o["date_created"] = json!("26.11.2021 06:22"),
            InvalidKind::UnknownField => o["coupon"] = json!("SALE2021"),
            InvalidKind::Locale => o["locale"] = json!("en US"),
            InvalidKind::Amount => {
                let amount = o["payment"]["amount"].as_i64().unwrap_or(0);
                o["payment"]["amount"] = json!(amount + 1);
            }
            InvalidKind::MissingField => {
                if let Some(map) = o.as_object_mut() {
                    map.remove("customer_id");
                }
            }
            InvalidKind::SmId => o["sm_id"] = json!(0),
            InvalidKind::Zip => o["delivery"]["zip"] = json!("n/a"),
        }
    }
}

pub struct Generator {
    rng: StdRng,
    max_items: usize,
}

impl Generator {
    pub fn new(seed: u64, max_items: usize) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            max_items: max_items.max(1),
        }
    }

    /// An order that passes every rule.
    pub fn valid(&mut self) -> Value {
        let rng = &mut self.rng;
        let uid: String = (0..20)
            .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)]))
            .collect();
        let track: String = format!(
            "WB{}",
            (0..10)
                .map(|_| char::from(rng.random_range(b'A'..=b'Z')))
                .collect::<String>()
        );
        let first: String = FirstName().fake_with_rng(rng);
        let last: String = LastName().fake_with_rng(rng);
        let email_user: String = format!("{}.{}{}", first, last, rng.random_range(1..1000))
            .to_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
            .collect();
        let domain = EMAIL_DOMAINS[rng.random_range(0..EMAIL_DOMAINS.len())];
        let city: String = CityName().fake_with_rng(rng);
        let street: String = StreetName().fake_with_rng(rng);
        let building: String = BuildingNumber().fake_with_rng(rng);
        let region: String = StateName().fake_with_rng(rng);
        let currency = CURRENCIES[rng.random_range(0..CURRENCIES.len())];

        let count = rng.random_range(1..=self.max_items);
        let mut goods_total = 0i64;
        let items: Vec<Value> = (0..count)
            .map(|_| {
                let price: i64 = rng.random_range(100..50_000);
                let sale: i64 = [0, 0, 5, 10, 15, 20, 25, 30, 50, 70][rng.random_range(0..10)];
                let total_price = price * (100 - sale) / 100;
                goods_total += total_price;
                let brand: String = CompanyName().fake_with_rng(rng);
                let status = [200, 202, 201, 300][rng.random_range(0..4)];
                json!({
                    "chrt_id": rng.random_range(1_000_000..10_000_000),
                    "track_number": track,
                    "price": price,
                    "rid": format!("{:016x}{}", rng.random::<u64>(), "test"),
                    "name": PRODUCTS[rng.random_range(0..PRODUCTS.len())],
                    "sale": sale,
                    "size": SIZES[rng.random_range(0..SIZES.len())],
                    "total_price": total_price,
                    "nm_id": rng.random_range(1_000_000..9_999_999),
                    "brand": brand,
                    "status": status,
                })
            })
            .collect();
        let delivery_cost: i64 = [0, 300, 500, 1000, 1500][rng.random_range(0..5)];
        let custom_fee: i64 = if rng.random_bool(0.2) {
            rng.random_range(1..500)
        } else {
            0
        };
        let created = 1_600_000_000 + rng.random_range(0..200_000_000i64);
        let date_created = chrono::DateTime::from_timestamp(created, 0)
            .expect("a time within range")
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        // Mostly international numbers and plain digits, as in the sample; some
        // written as shops receive them.
        let phone = match rng.random_range(0..5) {
            0 => format!(
                "8 ({}) {:03}-{:02}-{:02}",
                rng.random_range(900..1000),
                rng.random_range(0..1000),
                rng.random_range(0..100),
                rng.random_range(0..100)
            ),
            _ => format!(
                "+{}{:09}",
                rng.random_range(1..=99),
                rng.random_range(0..1_000_000_000u64)
            ),
        };
        let zip = match rng.random_range(0..5) {
            0 => POSTCODES[rng.random_range(0..POSTCODES.len())].to_owned(),
            _ => format!("{:06}", rng.random_range(100_000..999_999)),
        };
        json!({
            "order_uid": uid,
            "track_number": track,
            "entry": "WBIL",
            "delivery": {
                "name": format!("{first} {last}"),
                "phone": phone,
                "zip": zip,
                "city": city,
                "address": format!("{street} {building}"),
                "region": region,
                "email": format!("{email_user}@{domain}"),
            },
            "payment": {
                "transaction": uid,
                "request_id": "",
                "currency": currency,
                "provider": PROVIDERS[rng.random_range(0..PROVIDERS.len())],
                "amount": goods_total + delivery_cost + custom_fee,
                "payment_dt": created + rng.random_range(0..3600),
                "bank": BANKS[rng.random_range(0..BANKS.len())],
                "delivery_cost": delivery_cost,
                "goods_total": goods_total,
                "custom_fee": custom_fee,
            },
            "items": items,
            "locale": LOCALES[rng.random_range(0..LOCALES.len())],
            "internal_signature": "",
            "customer_id": format!("customer{}", rng.random_range(1..100_000)),
            "delivery_service": SERVICES[rng.random_range(0..SERVICES.len())],
            "shardkey": rng.random_range(0..10).to_string(),
            "sm_id": rng.random_range(1..1000),
            "date_created": date_created,
            "oof_shard": rng.random_range(0..3).to_string(),
        })
    }

    /// A fresh order with exactly one rule broken.
    pub fn invalid(&mut self, kind: InvalidKind) -> Value {
        let mut order = self.valid();
        kind.apply(&mut order);
        order
    }

    /// Bytes that are not an order at all: not JSON, or JSON cut short.
    pub fn malformed(&mut self) -> Vec<u8> {
        if self.rng.random_bool(0.5) {
            let text = self.valid().to_string();
            let cut = self.rng.random_range(1..text.len() - 1);
            text.as_bytes()[..cut].to_vec()
        } else {
            b"order #42: two mascaras, ship to Kiryat Mozkin".to_vec()
        }
    }

    /// True with probability `p`, from the seeded stream.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random_bool(p.min(1.0))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::{parse_order, Limits};

    proptest! {
        #[test]
        fn generated_orders_are_valid_and_round_trip(seed in any::<u64>()) {
            let mut generator = Generator::new(seed, 5);
            for _ in 0..5 {
                let order = generator.valid();
                let bytes = serde_json::to_vec(&order).unwrap();
                let parsed = parse_order(&bytes, &Limits::default());
                prop_assert!(parsed.is_ok(), "{order} -> {}", parsed.unwrap_err());
                let back: Value = serde_json::from_slice(&parsed.unwrap().to_json()).unwrap();
                prop_assert_eq!(back, order);
            }
        }
    }

    #[test]
    fn item_counts_span_one_to_max_items() {
        let mut generator = Generator::new(3, 40);
        let counts: Vec<usize> = (0..200)
            .map(|_| generator.valid()["items"].as_array().unwrap().len())
            .collect();
        assert_eq!(counts.iter().min(), Some(&1));
        assert!(counts.iter().all(|&n| n <= 40), "{counts:?}");
        assert!(counts.iter().any(|&n| n > 30), "{counts:?}");
    }

    #[test]
    fn each_invalid_kind_fails_for_its_reason() {
        let mut generator = Generator::new(7, 5);
        for kind in InvalidKind::ALL {
            let order = generator.invalid(kind);
            let rejection =
                parse_order(&serde_json::to_vec(&order).unwrap(), &Limits::default()).unwrap_err();
            let reasons = rejection.reasons();
            assert_eq!(reasons.len(), 1, "{kind:?}: {reasons:?}");
            assert!(
                reasons[0].starts_with(&format!("{}: ", kind.field())),
                "{kind:?}: {reasons:?}"
            );
        }
    }

    #[test]
    fn malformed_payloads_are_parse_rejections() {
        let mut generator = Generator::new(1, 5);
        for _ in 0..50 {
            let rejection = parse_order(&generator.malformed(), &Limits::default()).unwrap_err();
            assert_eq!(rejection.stage(), crate::domain::Stage::Parse);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_orders() {
        let a: Vec<Value> = (0..3)
            .map({
                let mut g = Generator::new(9, 5);
                move |_| g.valid()
            })
            .collect();
        let b: Vec<Value> = (0..3)
            .map({
                let mut g = Generator::new(9, 5);
                move |_| g.valid()
            })
            .collect();
        assert_eq!(a, b);
    }
}
