//! Lenient readings of request paths: what the most forgiving server behind the gateway could
//! make of a path segment. A path is forwarded unchanged, so every spelling whose meaning
//! depends on who reads it is refused here rather than guessed at.
//!
//! - `;` is refused everywhere: finX's documented paths use none, and servers that strip path
//!   parameters (servlet containers do) read `..;` as `..`.
//! - A segment whose lenient reading (percent-decoded once and twice, `;params` dropped,
//!   whitespace and control characters trimmed) is empty or only dots is refused: `..;`, `.;x`,
//!   `..%20`, `%2e%2e;`, `...` (Windows drops trailing dots) all climb or vanish somewhere.
//! - Characters that Unicode compatibility folding (NFKC) turns into ASCII punctuation or
//!   letters (fullwidth forms, one/two-dot leaders, small full stop, small reverse solidus,
//!   small percent sign) are refused: a folding server reads `／．．／` as `/../`.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

/// Why a path was refused, for a 400 answer.
pub(crate) const PARAMETERS: &str = "';' is not allowed in paths (finX paths carry no parameters)";
pub(crate) const DOT_SEGMENT: &str =
    "dot segments are not allowed in paths, in any spelling (e.g. '..;', '..%20', '...')";
pub(crate) const EMPTY_SEGMENT: &str = "empty path segments are not allowed, in any spelling";
pub(crate) const FOLDING: &str =
    "the path contains a character that Unicode folding turns into ASCII (e.g. a fullwidth dot)";

/// Refuses a raw path (still percent-encoded, starting with `/`) that any lenient reading turns
/// into a dot or empty segment, that carries `;`, or that Unicode folding would change.
pub(crate) fn check_segments(raw_path: &str) -> Result<(), &'static str> {
    if raw_path.contains(';') {
        return Err(PARAMETERS);
    }
    let segments = raw_path.strip_prefix('/').unwrap_or(raw_path).split('/');
    let mut segments = segments.peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        // A trailing `/` is an ordinary spelling (`/rest/accounts/`); `//` is refused earlier.
        if segment.is_empty() {
            if last {
                continue;
            }
            return Err(EMPTY_SEGMENT);
        }
        let reading = lenient_reading(segment);
        if reading.is_empty() {
            return Err(EMPTY_SEGMENT);
        }
        if reading.bytes().all(|b| b == b'.') {
            return Err(DOT_SEGMENT);
        }
    }
    if !raw_path.is_ascii() || raw_path.contains('%') {
        let decoded = percent_decode_str(raw_path).decode_utf8_lossy();
        if decoded.chars().any(folds_to_ascii) {
            return Err(FOLDING);
        }
    }
    Ok(())
}

/// The most lenient reading of one segment: percent-decoded twice, `;params` dropped, and
/// whitespace and control characters (NUL included) trimmed from both ends.
fn lenient_reading(segment: &str) -> Cow<'_, str> {
    let trim = |s: &str| -> (usize, usize) {
        let trimmed = s.trim_matches(|c: char| c.is_whitespace() || c.is_control());
        let start = trimmed.as_ptr() as usize - s.as_ptr() as usize;
        (start, start + trimmed.len())
    };
    if !segment.contains(['%', ';']) {
        let (start, end) = trim(segment);
        return Cow::Borrowed(&segment[start..end]);
    }
    let once = percent_decode_str(segment).decode_utf8_lossy();
    let twice = percent_decode_str(&once).decode_utf8_lossy().into_owned();
    let without_params = twice.split(';').next().unwrap_or("");
    let (start, end) = trim(without_params);
    Cow::Owned(without_params[start..end].to_owned())
}

/// Characters whose NFKC form is (or contains) printable ASCII: fullwidth ASCII variants, the
/// dot leaders and the small forms of `.`, `\` and `%`.
fn folds_to_ascii(c: char) -> bool {
    matches!(c,
        '\u{FF01}'..='\u{FF5E}'
        | '\u{2024}'..='\u{2026}'
        | '\u{FE52}'
        | '\u{FE68}'
        | '\u{FE6A}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lenient_dot_segment_is_refused() {
        for path in [
            "/rest/accounts/..;/payments",
            "/rest/accounts/.;x/payments",
            "/rest/accounts/..%3B/payments",
            "/rest/accounts/%2e%2e;/payments",
            "/rest/accounts/..%20/payments",
            "/rest/accounts/..%09/payments",
            "/rest/accounts/..%00",
            "/rest/accounts/%252e%252e/payments",
            "/rest/accounts/...",
            "/rest/accounts/%2E",
            "/rest/accounts/..\u{a0}/x",
        ] {
            assert!(check_segments(path).is_err(), "{path}");
        }
    }

    #[test]
    fn parameters_empty_readings_and_folding_characters_are_refused() {
        assert_eq!(check_segments("/rest/accounts;x=1"), Err(PARAMETERS));
        assert_eq!(check_segments("/rest;/accounts"), Err(PARAMETERS));
        assert_eq!(check_segments("/rest/%20/x"), Err(EMPTY_SEGMENT));
        assert_eq!(check_segments("/rest//x"), Err(EMPTY_SEGMENT));
        for path in [
            "/rest/%EF%BC%8E%EF%BC%8E/x",
            "/rest/\u{ff0e}\u{ff0e}/x",
            "/rest/a\u{2025}",
            "/rest/\u{ff41}uth",
            "/rest/x%EF%BC%8Fy",
        ] {
            assert_eq!(check_segments(path), Err(FOLDING), "{path}");
        }
    }

    #[test]
    fn ordinary_paths_pass() {
        for path in [
            "/rest/accounts",
            "/rest/accounts/",
            "/rest/accounts/acc.1/transactions",
            "/rest/accounts/A%20B",
            "/rest/accounts/.hidden",
            "/rest/accounts/..x",
            "/rest/caf%C3%A9",
            "/",
        ] {
            assert_eq!(check_segments(path), Ok(()), "{path}");
        }
    }
}
