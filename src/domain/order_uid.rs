use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;

/// The longest order id accepted. Ids appear in URLs and cache keys.
pub const MAX_ORDER_UID_LEN: usize = 64;

/// An order id: 1 to 64 characters of `[A-Za-z0-9_-]`, so it is safe in a URL path,
/// a Redis key and a log line without escaping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderUid(#[serde(deserialize_with = "valid_uid")] String);

fn valid_uid<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let text = String::deserialize(deserializer)?;
    OrderUid::parse(&text).map_err(serde::de::Error::custom)?;
    Ok(text)
}

impl OrderUid {
    /// The rule as a person reads it, for error messages and the web page.
    pub const RULE: &'static str = "1 to 64 characters, each an ASCII letter, a digit, '_' or '-'";

    pub fn parse(candidate: &str) -> Result<Self, String> {
        if candidate.is_empty() {
            return Err("must not be empty".into());
        }
        if let Some(bad) = candidate
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(format!(
                "contains {bad:?}; only ASCII letters, digits, '_' and '-' are allowed"
            ));
        }
        // Every character is ASCII now, so bytes are characters.
        if candidate.len() > MAX_ORDER_UID_LEN {
            return Err(format!(
                "is {} characters long, the limit is {MAX_ORDER_UID_LEN}",
                candidate.len()
            ));
        }
        Ok(Self(candidate.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Most characters kept of an id claimed by a rejected message.
pub const MAX_CLAIMED_UID_CHARS: usize = 128;

/// The `order_uid` a message claims, read even from an invalid or truncated
/// order (only a string counts), so its dead letter can be found by it.
pub fn claimed_uid(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Claim<'a> {
        #[serde(borrow)]
        order_uid: Option<Cow<'a, str>>,
    }
    let uid = match serde_json::from_slice::<Claim>(payload) {
        Ok(claim) => claim.order_uid.map(Cow::into_owned),
        Err(_) => scan_for_uid(payload),
    }?;
    (!uid.is_empty()).then(|| uid.chars().take(MAX_CLAIMED_UID_CHARS).collect())
}

/// The first `"order_uid": "…"` in text that is not a whole JSON document
/// (cut short, a stray comma); an id with escapes is not guessed at.
fn scan_for_uid(payload: &[u8]) -> Option<String> {
    const FIELD: &[u8] = b"\"order_uid\"";
    let at = payload.windows(FIELD.len()).position(|w| w == FIELD)?;
    let rest = payload[at + FIELD.len()..].trim_ascii_start();
    let rest = rest.strip_prefix(b":")?.trim_ascii_start();
    let rest = rest.strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    if rest[end] != b'"' {
        return None;
    }
    String::from_utf8(rest[..end].to_vec()).ok()
}

/// In the API's document: a string that follows [`OrderUid::RULE`].
impl utoipa::PartialSchema for OrderUid {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(format!("^[A-Za-z0-9_-]{{1,{MAX_ORDER_UID_LEN}}}$")))
            .description(Some(Self::RULE))
            .into()
    }
}

impl utoipa::ToSchema for OrderUid {}

impl AsRef<str> for OrderUid {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrderUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_sample_and_edge_lengths() {
        assert!(OrderUid::parse("b563feb7b2b84b6test").is_ok());
        assert!(OrderUid::parse("a").is_ok());
        assert!(OrderUid::parse(&"x".repeat(64)).is_ok());
        assert!(OrderUid::parse("A_b-9").is_ok());
    }

    #[test]
    fn an_id_is_read_from_messages_that_are_not_valid_orders() {
        for (payload, claimed) in [
            (
                &br#"{"order_uid":"bad id!","track_number":7}"#[..],
                Some("bad id!"),
            ),
            (
                br#"{"entry":"WBIL", "order_uid" : "cut-short", "items": [{"#,
                Some("cut-short"),
            ),
            (br#"{"order_uid":"a\"b"}"#, Some("a\"b")),
            (br#"{"order_uid":"a\"b", "#, None),
            (br#"{"order_uid":42}"#, None),
            (br#"{"order_uid":""}"#, None),
            (b"not json", None),
            (b"[1,2]", None),
            (b"", None),
        ] {
            assert_eq!(
                claimed_uid(payload).as_deref(),
                claimed,
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        let long = format!(r#"{{"order_uid":"{}"}}"#, "x".repeat(500));
        assert_eq!(
            claimed_uid(long.as_bytes()).map(|u| u.len()),
            Some(MAX_CLAIMED_UID_CHARS)
        );
    }

    #[test]
    fn rejects_with_a_reason() {
        for (input, reason) in [
            ("", "must not be empty"),
            (&"x".repeat(65), "is 65 characters long, the limit is 64"),
            (
                "../etc/passwd",
                "contains '.'; only ASCII letters, digits, '_' and '-' are allowed",
            ),
            (
                "a b",
                "contains ' '; only ASCII letters, digits, '_' and '-' are allowed",
            ),
            (
                "zé",
                "contains 'é'; only ASCII letters, digits, '_' and '-' are allowed",
            ),
            // 66 bytes but 33 characters: the reason is the character, not a length.
            (
                &"é".repeat(33),
                "contains 'é'; only ASCII letters, digits, '_' and '-' are allowed",
            ),
        ] {
            assert_eq!(
                OrderUid::parse(input).unwrap_err(),
                reason,
                "input {input:?}"
            );
        }
    }
}
