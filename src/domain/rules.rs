//! The single-field rules of the order model. Each returns the reason a person
//! reads when the value breaks it. `docs/validation.md` lists them all.

/// The latest accepted `payment_dt` and `date_created`: 3000-01-01T00:00:00Z. Keeps obvious
/// millisecond timestamps (13 digits) out without depending on the clock, so a
/// replay decides exactly as the first delivery did.
pub const MAX_UNIX_TIME: i64 = 32_503_680_000;

pub type RuleResult = Result<(), String>;

/// Shows a received value inside a reason without letting a huge value flood logs
/// and dead-letter headers.
pub fn shown(value: &str) -> String {
    const MAX: usize = 40;
    if value.chars().count() <= MAX {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(MAX).collect();
        format!("{head:?}…")
    }
}

/// Every text field: at most `max_chars` characters and no control characters.
pub fn bounded_text(value: &str, max_chars: usize) -> RuleResult {
    // Characters never outnumber bytes, so short strings skip the count.
    let chars = if value.len() <= max_chars {
        value.len()
    } else {
        value.chars().count()
    };
    if chars > max_chars {
        return Err(format!(
            "is {chars} characters long, the limit is {max_chars}"
        ));
    }
    // Printable ASCII, the common case, is checked a byte at a time.
    if value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!(
            "contains the control character U+{:04X}",
            u32::from(c)
        )),
        None => Ok(()),
    }
}

pub fn non_empty(value: &str) -> RuleResult {
    if value.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(())
    }
}

pub fn digits(value: &str) -> RuleResult {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(format!("must be decimal digits, found {}", shown(value)))
    }
}

/// A phone number as people and shops write it: 7 to 15 digits (E.164's
/// most), after an optional `+`, which spaces, hyphens, dots and parentheses
/// may separate (`+9720000000`, `8 (900) 123-45-67`, `+1 415.555.2671`). The
/// syntax is what can be checked: whether a number is assigned is not
/// knowable offline, and libphonenumber's per-country tables would reject test
/// numbers such as the sample's.
pub fn phone(value: &str) -> RuleResult {
    let digits = value.bytes().filter(u8::is_ascii_digit).count();
    let body = value.strip_prefix('+').unwrap_or(value);
    let ok = (7..=15).contains(&digits)
        && body.starts_with(|c: char| c.is_ascii_digit() || c == '(')
        && body.ends_with(|c: char| c.is_ascii_digit())
        && body
            .bytes()
            .all(|b| b.is_ascii_digit() || b" -.()".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a phone number (7 to 15 digits after an optional +, separated by \
             spaces, hyphens, dots or parentheses only)",
            shown(value)
        ))
    }
}

/// A postal code of any country: 2 to 10 letters, digits, spaces or hyphens,
/// with a digit, starting and ending with a letter or digit (`2639809`,
/// `SW1A 1AA`, `94107-1234`, `1011 AB`).
pub fn postal_code(value: &str) -> RuleResult {
    let bytes = value.as_bytes();
    let ok = (2..=10).contains(&bytes.len())
        && bytes.iter().any(u8::is_ascii_digit)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b' ' || *b == b'-')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a postal code (2 to 10 letters, digits, spaces or hyphens, with a digit)",
            shown(value)
        ))
    }
}

pub fn email(value: &str) -> RuleResult {
    // RFC 5322 / 5321 syntax, with a dot in the domain (deliverable on the
    // internet), no display name ("A <a@b>") and no [ip] literal.
    let options = email_address::Options {
        minimum_sub_domains: 2,
        allow_domain_literal: false,
        allow_display_text: false,
    };
    match email_address::EmailAddress::parse_with_options(value, options) {
        Ok(_) => Ok(()),
        Err(_) => Err(format!("{} is not an email address", shown(value))),
    }
}

/// An ISO 4217 code in either case: payment providers such as Stripe write
/// them in lower case (`usd`).
pub fn currency(value: &str) -> RuleResult {
    // Upper case, the common case, is looked up without a copy.
    let known = iso_currency::Currency::from_code(value).is_some()
        || (value.len() == 3
            && iso_currency::Currency::from_code(&value.to_ascii_uppercase()).is_some());
    if known {
        Ok(())
    } else {
        Err(format!("{} is not an ISO 4217 code", shown(value)))
    }
}

/// A BCP 47 language tag, also written with underscores as POSIX and Java
/// locales are (`en_US`, read as `en-US`).
pub fn locale(value: &str) -> RuleResult {
    // Orders use a handful of locales; remembering the valid ones saves a full
    // BCP 47 parse per message. Bounded, so hostile input cannot grow it.
    const REMEMBERED: usize = 256;
    thread_local! {
        static VALID: std::cell::RefCell<std::collections::HashSet<Box<str>>> = Default::default();
    }
    if VALID.with_borrow(|valid| valid.contains(value)) {
        return Ok(());
    }
    match language_tags::LanguageTag::parse(&value.replace('_', "-")) {
        Ok(tag) if tag.validate().is_ok() => {
            VALID.with_borrow_mut(|valid| {
                if valid.len() < REMEMBERED {
                    valid.insert(value.into());
                }
            });
            Ok(())
        }
        _ => Err(format!("{} is not a BCP 47 language tag", shown(value))),
    }
}

pub fn non_negative(value: i64) -> RuleResult {
    if value >= 0 {
        Ok(())
    } else {
        Err(format!("must not be negative, found {value}"))
    }
}

pub fn positive(value: i64) -> RuleResult {
    if value > 0 {
        Ok(())
    } else {
        Err(format!("must be greater than 0, found {value}"))
    }
}

pub fn percent(value: i64) -> RuleResult {
    if (0..=100).contains(&value) {
        Ok(())
    } else {
        Err(format!("must be between 0 and 100, found {value}"))
    }
}

pub fn unix_time(value: i64) -> RuleResult {
    if value <= 0 {
        Err(format!(
            "must be a positive Unix time in seconds, found {value}"
        ))
    } else if value >= MAX_UNIX_TIME {
        Err(format!(
            "{value} is after the year 3000; Unix time is in seconds, not milliseconds"
        ))
    } else {
        Ok(())
    }
}

pub fn item_status(value: i64) -> RuleResult {
    if (0..=999).contains(&value) {
        Ok(())
    } else {
        Err(format!("must be between 0 and 999, found {value}"))
    }
}

/// An item's total is its price less the sale percentage. Upstream systems
/// round either way, so both the floor and the ceiling of the exact value pass.
pub fn item_total(price: i64, sale: i64, total_price: i64) -> RuleResult {
    let exact = i128::from(price) * i128::from(100 - sale);
    let floor = exact.div_euclid(100);
    let ceil = floor + i128::from(exact.rem_euclid(100) != 0);
    if (floor..=ceil).contains(&i128::from(total_price)) {
        Ok(())
    } else {
        Err(format!(
            "is {total_price}, but price {price} less {sale}% sale is {}",
            if floor == ceil {
                floor.to_string()
            } else {
                format!("between {floor} and {ceil}")
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers() {
        for good in [
            "+9720000000",
            "+14155552671",
            "89001234567",
            "8 (900) 123-45-67",
            "+7 (900) 123-45-67",
            "+1 415.555.2671",
            "(415) 555-2671",
            "1234567",
            "+123456789012345",
        ] {
            assert!(phone(good).is_ok(), "{good}");
        }
        for bad in [
            "123456",
            "1234567890123456",
            "+1 415 CALL NOW",
            "ext. 1234567",
            "++79001234567",
            "-79001234567",
            "79001234567 ",
            "7900\t1234567",
            "",
        ] {
            assert!(phone(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn postal_codes() {
        for good in [
            "2639809",
            "SW1A 1AA",
            "94107-1234",
            "1011 AB",
            "K1A 0B1",
            "D02 X285",
            "101",
        ] {
            assert!(postal_code(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1",
            "n/a",
            "none",
            " 12345",
            "12345-",
            "12345678901",
            "123_45",
            "12 345é",
        ] {
            assert!(postal_code(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn email_addresses() {
        assert!(email("test@gmail.com").is_ok());
        assert!(email("first.last+tag@example.co.uk").is_ok());
        for bad in [
            "test",
            "test@",
            "@gmail.com",
            "a b@c.d",
            "Test <t@gmail.com>",
            "t@localhost",
        ] {
            assert!(email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn currencies_and_locales() {
        assert!(currency("USD").is_ok());
        assert!(currency("RUB").is_ok());
        assert_eq!(
            currency("XYZ").unwrap_err(),
            r#""XYZ" is not an ISO 4217 code"#
        );
        assert!(currency("usd").is_ok() && currency("Eur").is_ok());
        assert!(currency("usdd").is_err() && currency("").is_err());
        assert!(locale("en").is_ok());
        assert!(locale("pt-BR").is_ok());
        assert!(locale("zh-Hant-TW").is_ok());
        assert!(locale("en_US").is_ok() && locale("zh_Hant_TW").is_ok());
        assert!(locale("en US").is_err() && locale("en_US.UTF-8").is_err());
        assert!(locale("english").is_err() && locale("en-").is_err());
        assert!(locale("").is_err());
    }

    #[test]
    fn item_totals_allow_either_rounding() {
        assert!(item_total(453, 30, 317).is_ok());
        assert!(item_total(453, 30, 318).is_ok());
        assert!(item_total(1000, 0, 1000).is_ok());
        assert!(item_total(1000, 100, 0).is_ok());
        assert_eq!(
            item_total(453, 30, 400).unwrap_err(),
            "is 400, but price 453 less 30% sale is between 317 and 318"
        );
        assert_eq!(
            item_total(1000, 10, 1).unwrap_err(),
            "is 1, but price 1000 less 10% sale is 900"
        );
        assert!(item_total(i64::MAX, 0, i64::MAX).is_ok());
    }

    #[test]
    fn times_and_ranges() {
        assert!(unix_time(1_637_907_727).is_ok());
        assert!(unix_time(0).is_err());
        assert!(unix_time(1_637_907_727_000).is_err());
        assert!(percent(0).is_ok() && percent(100).is_ok());
        assert!(percent(101).is_err() && percent(-1).is_err());
        assert!(digits("2639809").is_ok());
        assert!(digits("26 398").is_err() && digits("").is_err());
    }

    #[test]
    fn long_values_are_shortened_in_reasons() {
        let reason = digits(&"x".repeat(5000)).unwrap_err();
        assert!(reason.len() < 80, "{reason}");
    }
}
