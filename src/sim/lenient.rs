//! Reading values the way finX does: leniently where finX's own examples are loose.
//!
//! finX's published client examples send booleans and numbers as JSON strings too
//! (`"save_secrets": "false"`, `"reporting_period": "12"`, `"value": "57.99"`). Every place in
//! the simulator that expects a boolean or a number reads it through this module, so the
//! accepted spellings are the same everywhere: a JSON boolean or `"true"`/`"false"` (any case);
//! a JSON number or a plain decimal string. Anything else (`"yes"`, `"1e3"`, `" 12"`, `[]`) is
//! still refused by the caller.

use serde_json::Value;

/// `true`/`false` as a JSON boolean or string (ASCII case-insensitive).
pub(crate) fn boolean(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(flag) => Some(*flag),
        Value::String(text) if text.eq_ignore_ascii_case("true") => Some(true),
        Value::String(text) if text.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// A non-negative whole number, as a JSON integer or a string of decimal digits.
pub(crate) fn whole_number(value: &Value) -> Option<u64> {
    match value {
        Value::Number(number) => number.as_u64(),
        Value::String(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            text.parse().ok()
        }
        _ => None,
    }
}

/// A finite number, as a JSON number or a plain decimal string (`"57.99"`, `"-3"`; no
/// exponent, no spaces, no `NaN`).
pub(crate) fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) if is_plain_decimal(text) => text.parse().ok(),
        _ => None,
    }
}

/// `-?digits(.digits)?`.
fn is_plain_decimal(text: &str) -> bool {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = match unsigned.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (unsigned, None),
    };
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    digits(whole) && fraction.is_none_or(digits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn booleans_in_both_spellings() {
        for (value, expected) in [
            (json!(true), Some(true)),
            (json!(false), Some(false)),
            (json!("true"), Some(true)),
            (json!("False"), Some(false)),
            (json!("yes"), None),
            (json!("1"), None),
            (json!(1), None),
            (json!(null), None),
        ] {
            assert_eq!(boolean(&value), expected, "{value}");
        }
    }

    #[test]
    fn whole_numbers_in_both_spellings() {
        for (value, expected) in [
            (json!(12), Some(12)),
            (json!("12"), Some(12)),
            (json!("012"), Some(12)),
            (json!(-1), None),
            (json!("-1"), None),
            (json!(1.5), None),
            (json!("1.5"), None),
            (json!(" 12"), None),
            (json!(""), None),
            (json!("99999999999999999999999"), None),
            (json!(true), None),
        ] {
            assert_eq!(whole_number(&value), expected, "{value}");
        }
    }

    #[test]
    fn numbers_in_both_spellings() {
        for (value, expected) in [
            (json!(57.99), Some(57.99)),
            (json!("57.99"), Some(57.99)),
            (json!("-3"), Some(-3.0)),
            (json!("1e3"), None),
            (json!("NaN"), None),
            (json!("inf"), None),
            (json!("1."), None),
            (json!(".5"), None),
            (json!("1,5"), None),
            (json!(false), None),
        ] {
            assert_eq!(number(&value), expected, "{value}");
        }
    }
}
