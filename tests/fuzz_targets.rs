//! The fuzz targets of `fuzz/` on stable, in the normal suite: each target runs over its seed
//! corpus (`fuzz/corpus/<target>/`), then over generated inputs (proptest): seeds with random
//! edits, inputs built from the tokens that matter to the parser, and arbitrary bytes.
//!
//! `FINX_FUZZ_CASES` sets how many inputs each generator produces (default 2000, about ten
//! seconds in all in a debug build). A failure is shrunk to a small input and printed; add it to
//! the target's corpus once fixed.

#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The seed corpus of `target`, sorted by file name.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|file| std::fs::read(file).expect("corpus file"))
        .collect();
    assert!(!seeds.is_empty(), "{} has no seeds", dir.display());
    seeds
}

fn cases() -> u32 {
    std::env::var("FINX_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000)
}

/// Runs `target` on every input `strategy` generates (`cases` of them).
fn generated(target: &str, cases: u32, strategy: impl Strategy<Value = Vec<u8>>) {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new(config)
        .run(&strategy, |input| {
            targets::run(target, &input);
            Ok(())
        })
        .unwrap_or_else(|failure| panic!("fuzz target {target}: {failure}"));
}

/// A seed with up to eight random byte edits (overwrite, insert, delete, truncate).
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let count = seeds.len();
    (
        0..count,
        prop::collection::vec((any::<usize>(), 0u8..4, any::<u8>()), 0..8),
    )
        .prop_map(move |(index, edits)| {
            let mut input = seeds[index].clone();
            for (position, kind, byte) in edits {
                let at = if input.is_empty() {
                    0
                } else {
                    position % input.len()
                };
                match kind {
                    0 if !input.is_empty() => input[at] = byte,
                    1 => input.insert(at, byte),
                    2 if !input.is_empty() => {
                        input.remove(at);
                    }
                    3 => input.truncate(at),
                    _ => {}
                }
            }
            input
        })
}

/// Inputs made of `tokens`, joined by `separator`.
fn built(tokens: Vec<String>, separator: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(tokens), 0..14)
        .prop_map(move |parts| parts.join(separator).into_bytes())
}

fn strings(tokens: &[&str]) -> Vec<String> {
    tokens.iter().map(|t| (*t).to_owned()).collect()
}

fn every_seed_passes(target: &str) {
    for (index, seed) in seeds(target).iter().enumerate() {
        let outcome = std::panic::catch_unwind(|| targets::run(target, seed));
        assert!(
            outcome.is_ok(),
            "{target} seed #{index} ({:?}) fails",
            String::from_utf8_lossy(seed)
        );
    }
}

#[test]
fn every_target_has_a_corpus_and_a_binary() {
    for target in targets::TARGETS {
        assert!(!seeds(target).is_empty());
        let binary = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/fuzz_targets")
            .join(format!("{target}.rs"));
        assert!(binary.is_file(), "{} is missing", binary.display());
    }
}

/// The path pieces that decide a route: separators, dots and parameters in every spelling,
/// the route names, `auth` in several spellings, whitespace and Unicode lookalikes.
const PATH_TOKENS: &[&str] = &[
    "/",
    "/",
    "/",
    "/",
    ".",
    "..",
    "...",
    ";",
    ";x=1",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "%25",
    "%252e",
    "%252f",
    "%3b",
    "%3B",
    "%3f",
    "%23",
    "%00",
    "%20",
    "%09",
    "%C2%A0",
    " ",
    "\\",
    "\t",
    "?",
    "#",
    "%",
    "2e",
    "auth",
    "AUTH",
    "Auth",
    "%61uth",
    "%2561uth",
    "auth.",
    "rest",
    "rest",
    "accounts",
    "accounts",
    "transactions",
    "balances",
    "payments",
    "category-tree",
    "payment-receipts",
    "42",
    "healthz",
    "callback",
    "demo",
    "ongoing",
    "access",
    "acc.1",
    "x",
    "\u{ff0e}",
    "%EF%BC%8E",
    "\u{ff0f}",
    "%EF%BC%8F",
    "\u{2025}",
    "\u{212a}",
];

/// For any path, if the gateway forwards it, no lenient reading of it (decoded once or twice,
/// `;params` removed, `\` as `/`, case- and Unicode-folded) names `/auth` or leaves the route a
/// policy matched; and the `url` crate (a second, independent normaliser) reads every forwarded
/// path segment for segment as the gateway does. See `targets::route`.
#[test]
fn route_target_property_and_url_differential() {
    every_seed_passes("route");
    let tokens = strings(PATH_TOKENS);
    // Most paths start like a forwarded route, so the forwarded-path properties get inputs.
    let prefixes = strings(&[
        "/rest/",
        "/rest/accounts/",
        "/rest/accounts/a1/",
        "/payment-receipts/",
        "/category-tree",
        "/",
        "",
    ]);
    for separator in ["", "/"] {
        let paths = (
            prop::sample::select(prefixes.clone()),
            built(tokens.clone(), separator),
        )
            .prop_map(|(prefix, rest)| [prefix.into_bytes(), rest].concat());
        generated("route", cases() * 3, paths);
    }
    generated("route", cases(), mutated(seeds("route")));
    generated("route", cases(), prop::collection::vec(any::<u8>(), 0..48));
}

#[test]
fn jwt_target() {
    every_seed_passes("jwt");
    let valid = targets::valid_caller_token();
    let token_edits = mutated(vec![format!("Bearer {valid}").into_bytes()]);
    generated(
        "jwt",
        cases(),
        (any::<u8>(), token_edits).prop_map(|(selector, mut value)| {
            value.insert(0, selector);
            value
        }),
    );
    let parts = {
        let mut pieces = valid.split('.').map(str::to_owned).collect::<Vec<_>>();
        pieces.extend(strings(&[
            "Bearer ",
            "bearer",
            " ",
            ".",
            "eyJhbGciOiJub25lIn0",
            "eyJhbGciOiJIUzI1NiIsImtpZCI6ImZ1enotaG1hYyJ9",
            "",
            "\u{0}",
        ]));
        pieces
    };
    generated(
        "jwt",
        cases(),
        (any::<u8>(), built(parts, "")).prop_map(|(selector, mut value)| {
            value.insert(0, selector);
            value
        }),
    );
    generated("jwt", cases(), mutated(seeds("jwt")));
    generated("jwt", cases(), prop::collection::vec(any::<u8>(), 0..96));
}

#[test]
fn callback_target() {
    every_seed_passes("callback");
    let state = targets::valid_state();
    let pairs = vec![
        format!("state={state}"),
        "state=x".into(),
        "state=".into(),
        "code=finx-code-12345678".into(),
        "code=%ZZ".into(),
        "success=true".into(),
        "success=false".into(),
        "flow_id=f1".into(),
        "abort=1".into(),
        "cancel=1".into(),
        "other=1".into(),
        "%".into(),
        "+".into(),
        "=".into(),
        "".into(),
    ];
    generated("callback", cases(), built(pairs, "&"));
    generated("callback", cases(), mutated(seeds("callback")));
    generated(
        "callback",
        cases(),
        prop::collection::vec(any::<u8>(), 0..64),
    );
}

/// A JSON value of the shapes a token answer takes, nested at most twice.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{json, Value};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "[a-z_]{0,12}".prop_map(Value::from),
        Just(Value::from("invalid_grant")),
        Just(Value::from("3600")),
        Just(Value::from("")),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "name",
                    "message",
                    "description",
                    "code",
                    "access_token",
                ]),
                inner,
                0..3
            )
            .prop_map(|map| json!(map)),
        ]
    })
}

#[test]
fn token_answer_target() {
    every_seed_passes("token_answer");
    let keys = vec![
        "access_token",
        "refresh_token",
        "expires_in",
        "scope",
        "token_type",
        "error",
        "error_description",
        "status",
    ];
    let answers = prop::collection::btree_map(prop::sample::select(keys), json_value(), 0..6)
        .prop_map(|map| serde_json::to_vec(&map).unwrap_or_default());
    generated("token_answer", cases() * 2, answers);
    generated("token_answer", cases(), mutated(seeds("token_answer")));
    generated(
        "token_answer",
        cases(),
        prop::collection::vec(any::<u8>(), 0..64),
    );
}

/// A seed config with whole lines removed, repeated or given another value.
fn edited_config(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    const VALUES: &[&str] = &[
        "\"\"",
        "0",
        "-1",
        "1e309",
        "true",
        "[]",
        "{}",
        "\"billing eu\"",
        "\"team/a\"",
        "\"x\"",
        "\"trusted-local\"",
        "\"http://evil.example\"",
        "\"https://[::1]:1/v1\"",
        "\"1ms\"",
        "\"999999d\"",
        "{ file = \"/dev/zero\" }",
        "{ env = \"HOME\" }",
        "[\"GET /rest/**\"]",
        "[\"claim:\"]",
    ];
    let count = seeds.len();
    (
        0..count,
        prop::collection::vec((any::<usize>(), 0u8..3, prop::sample::select(VALUES)), 0..6),
    )
        .prop_map(move |(index, edits)| {
            let text = String::from_utf8_lossy(&seeds[index]).into_owned();
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            for (position, kind, value) in edits {
                if lines.is_empty() {
                    break;
                }
                let at = position % lines.len();
                match kind {
                    0 => {
                        lines.remove(at);
                    }
                    1 => {
                        let line = lines[at].clone();
                        lines.insert(at, line);
                    }
                    _ => {
                        if let Some((key, _)) = lines[at].split_once('=') {
                            lines[at] = format!("{key}= {value}");
                        }
                    }
                }
            }
            lines.join("\n").into_bytes()
        })
}

#[test]
fn config_target() {
    every_seed_passes("config");
    // Validation reads files and builds a caller cache per config: fewer, heavier cases.
    let cases = (cases() / 2).max(1);
    generated("config", cases * 2, edited_config(seeds("config")));
    generated("config", cases, mutated(seeds("config")));
    generated("config", cases, prop::collection::vec(any::<u8>(), 0..64));
}
