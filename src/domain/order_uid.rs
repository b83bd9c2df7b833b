use std::fmt;

use serde::{Deserialize, Serialize};

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
    pub const RULE: &'static str = "1 to 64 characters, each a letter, a digit, '_' or '-'";

    pub fn parse(candidate: &str) -> Result<Self, String> {
        if candidate.is_empty() {
            return Err("must not be empty".into());
        }
        if let Some(bad) = candidate
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(format!(
                "contains {bad:?}; only letters, digits, '_' and '-' are allowed"
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
    fn rejects_with_a_reason() {
        for (input, reason) in [
            ("", "must not be empty"),
            (&"x".repeat(65), "is 65 characters long, the limit is 64"),
            (
                "../etc/passwd",
                "contains '.'; only letters, digits, '_' and '-' are allowed",
            ),
            (
                "a b",
                "contains ' '; only letters, digits, '_' and '-' are allowed",
            ),
            (
                "zé",
                "contains 'é'; only letters, digits, '_' and '-' are allowed",
            ),
            // 66 bytes but 33 characters: the reason is the character, not a length.
            (
                &"é".repeat(33),
                "contains 'é'; only letters, digits, '_' and '-' are allowed",
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
