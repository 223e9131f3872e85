//! The admin API over connections: list, show, import, revoke, purge. Answers carry a
//! connection's metadata only, never a token: the store's listing has no token in it, and an
//! import answers the stored row's metadata.
//!
//! Every bad input is a 400 `{"error": {"code", "message"}}` whose message never repeats what
//! was sent (a refresh token sent in the wrong place must not come back).

use http::{Response, StatusCode};
use pingora::protocols::http::ServerSession;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroize;

use super::{error_answer, json_answer, read_body, AdminApp};
use crate::clock::UnixSeconds;
use crate::error::AdminError;
use crate::metrics::REFRESH_TOKEN_LIFETIME_SECS;
use crate::store::{ConnectionKey, ConnectionStatus, ConnectionSummary, NewConnection, StoreError};

/// Connections per page unless `per_page` says otherwise.
pub const DEFAULT_PER_PAGE: usize = 100;
/// The most connections one page holds.
pub const MAX_PER_PAGE: usize = 1000;
/// The longest refresh token an import accepts.
const MAX_REFRESH_TOKEN_LEN: usize = 8 * 1024;
const DAY_SECS: i64 = 24 * 3600;

/// A store failure, logged here (the store's own words may name internals) and answered
/// with the generic [`AdminError`] it maps to.
fn store_failure(error: StoreError, action: &'static str) -> AdminError {
    match &error {
        StoreError::NotFound(_) => {}
        StoreError::Corrupt(key) => {
            tracing::warn!(connection = %key, action, "admin API: stored connection unreadable")
        }
        error => tracing::warn!(%error, action, "admin API: the store failed"),
    }
    error.into()
}

/// The `GET /admin/connections` query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ListQuery {
    status: Option<ConnectionStatus>,
    /// 1-based.
    page: usize,
    per_page: usize,
}

fn parse_list_query(query: Option<&str>) -> Result<ListQuery, AdminError> {
    let mut parsed = ListQuery {
        status: None,
        page: 1,
        per_page: DEFAULT_PER_PAGE,
    };
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if seen.iter().any(|earlier| *earlier == name) {
            return Err(AdminError::bad_request(
                "invalid_query",
                "a query parameter is given twice",
            ));
        }
        seen.push(name.clone().into_owned());
        match name.as_ref() {
            "status" => {
                parsed.status = Some(ConnectionStatus::parse(&value).ok_or_else(|| {
                    AdminError::bad_request(
                        "invalid_query",
                        "status must be active, reauth_required or revoked",
                    )
                })?);
            }
            "page" => {
                parsed.page = value
                    .parse::<usize>()
                    .ok()
                    .filter(|page| (1..=1_000_000_000).contains(page))
                    .ok_or_else(|| {
                        AdminError::bad_request("invalid_query", "page must be a number from 1")
                    })?;
            }
            "per_page" => {
                parsed.per_page = value
                    .parse::<usize>()
                    .ok()
                    .filter(|per_page| (1..=MAX_PER_PAGE).contains(per_page))
                    .ok_or_else(|| {
                        AdminError::bad_request(
                            "invalid_query",
                            format!("per_page must be a number from 1 to {MAX_PER_PAGE}"),
                        )
                    })?;
            }
            _ => {
                return Err(AdminError::bad_request(
                    "invalid_query",
                    "unknown query parameter (known: status, page, per_page)",
                ))
            }
        }
    }
    Ok(parsed)
}

/// The connection key named by a path segment (already percent-decoded).
fn parse_key(segment: &str) -> Result<ConnectionKey, AdminError> {
    ConnectionKey::from_stored(segment).map_err(|_| {
        AdminError::bad_request(
            "invalid_key",
            "a connection key is a user id or flow:<service>/<flow id>; ids are 1 to 128 \
             characters of A-Z a-z 0-9 . _ @ -",
        )
    })
}

/// A connection's metadata, as every admin answer describes it.
struct Described<'a> {
    key: &'a ConnectionKey,
    status: ConnectionStatus,
    version: i64,
    created_at: UnixSeconds,
    refreshed_at: Option<UnixSeconds>,
    synced_at: Option<UnixSeconds>,
    updated_at: UnixSeconds,
    last_used_at: Option<UnixSeconds>,
    /// As finX granted it; `null` when finX's answer named none.
    scope: Option<&'a str>,
}

impl<'a> From<&'a ConnectionSummary> for Described<'a> {
    fn from(c: &'a ConnectionSummary) -> Self {
        Self {
            key: &c.key,
            status: c.status,
            version: c.version,
            created_at: c.created_at,
            refreshed_at: c.refreshed_at,
            synced_at: c.synced_at,
            updated_at: c.updated_at,
            last_used_at: c.last_used_at,
            scope: c.scope.as_deref(),
        }
    }
}

impl Described<'_> {
    /// The JSON form: times in unix seconds; the refresh token's age and how long until finX
    /// lapses it (90 days after it was issued), in seconds and in whole days (negative once
    /// lapsed).
    fn to_json(&self, now: UnixSeconds) -> Value {
        let issued_at = self.refreshed_at.unwrap_or(self.created_at);
        let age = now - issued_at;
        let lapses_in = REFRESH_TOKEN_LIFETIME_SECS - age;
        json!({
            "key": self.key.as_str(),
            "kind": if self.key.is_flow() { "flow" } else { "user" },
            "status": self.status.as_str(),
            "version": self.version,
            "created_at": self.created_at,
            "refreshed_at": self.refreshed_at,
            "last_used_at": self.last_used_at,
            "synced_at": self.synced_at,
            "updated_at": self.updated_at,
            "scope": self.scope,
            "refresh_token_issued_at": issued_at,
            "refresh_token_age_secs": age,
            "refresh_token_age_days": age.div_euclid(DAY_SECS),
            "lapses_at": issued_at + REFRESH_TOKEN_LIFETIME_SECS,
            "lapses_in_secs": lapses_in,
            "days_until_lapse": lapses_in.div_euclid(DAY_SECS),
        })
    }
}

/// The JSON description of one listed connection (shared with the status page's data).
pub fn describe(connection: &ConnectionSummary, now: UnixSeconds) -> Value {
    Described::from(connection).to_json(now)
}

/// `GET /admin/connections?status=&page=&per_page=`: one page of connections, ordered by key.
pub async fn list(app: &AdminApp, query: Option<&str>) -> Response<Vec<u8>> {
    let run = async {
        let query = parse_list_query(query)?;
        let mut connections = app
            .store
            .list()
            .await
            .map_err(|error| store_failure(error, "list"))?;
        connections.retain(|c| query.status.is_none_or(|status| c.status == status));
        connections.sort_by(|a, b| a.key.cmp(&b.key));
        let now = app.clock.now();
        let skip = (query.page - 1).saturating_mul(query.per_page);
        let page: Vec<Value> = connections
            .iter()
            .skip(skip)
            .take(query.per_page)
            .map(|c| describe(c, now))
            .collect();
        Ok::<_, AdminError>(json!({
            "connections": page,
            "total": connections.len(),
            "page": query.page,
            "per_page": query.per_page,
        }))
    };
    match run.await {
        Ok(body) => json_answer(StatusCode::OK, &body),
        Err(error) => error_answer(&error),
    }
}

/// The metadata of `key`, from the store's listing (no token is decrypted).
async fn summary(app: &AdminApp, key: &ConnectionKey) -> Result<ConnectionSummary, AdminError> {
    app.store
        .list()
        .await
        .map_err(|error| store_failure(error, "show"))?
        .into_iter()
        .find(|c| c.key == *key)
        .ok_or_else(|| AdminError::ConnectionNotFound(key.clone()))
}

/// `GET /admin/connections/{key}`.
pub async fn show(app: &AdminApp, key: &str) -> Response<Vec<u8>> {
    let run = async {
        let key = parse_key(key)?;
        let found = summary(app, &key).await?;
        Ok::<_, AdminError>(describe(&found, app.clock.now()))
    };
    match run.await {
        Ok(body) => json_answer(StatusCode::OK, &body),
        Err(error) => error_answer(&error),
    }
}

/// The import body: `{"refresh_token": "…"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportBody {
    refresh_token: String,
}

/// Reads the import body; errors say where the JSON went wrong, never what it held.
fn parse_import(body: &[u8]) -> Result<SecretString, AdminError> {
    let parsed: ImportBody = serde_json::from_slice(body).map_err(|error| {
        use serde_json::error::Category;
        let what = match error.classify() {
            Category::Syntax | Category::Eof | Category::Io => "the body is not valid JSON",
            Category::Data => {
                "the body must be a JSON object with exactly one field, refresh_token (a string)"
            }
        };
        AdminError::bad_request(
            "invalid_body",
            format!("{what} (line {}, column {})", error.line(), error.column()),
        )
    })?;
    let mut sent = parsed.refresh_token;
    let mut token = sent.trim().to_owned();
    sent.zeroize();
    if token.is_empty()
        || token.len() > MAX_REFRESH_TOKEN_LEN
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        token.zeroize();
        return Err(AdminError::bad_request(
            "invalid_refresh_token",
            format!(
                "refresh_token must be 1 to {MAX_REFRESH_TOKEN_LEN} printable ASCII characters \
                 without spaces"
            ),
        ));
    }
    Ok(SecretString::from(token))
}

/// `POST /admin/connections/{key}/import` with `{"refresh_token": "…"}`: stores a consented
/// connection through the token manager (so nothing it remembers about an older grant
/// survives) and answers its metadata.
pub async fn import(app: &AdminApp, session: &mut ServerSession, key: &str) -> Response<Vec<u8>> {
    let run = async {
        let key = parse_key(key)?;
        let mut body = read_body(session).await?;
        let parsed = parse_import(&body);
        body.zeroize();
        let consent = NewConnection {
            refresh_token: parsed?,
            access: None,
            scope: None,
        };
        let stored = app
            .tokens
            .store_consent(&key, &consent)
            .await
            .map_err(|error| store_failure(error, "import"))?;
        tracing::info!(connection = %key, version = stored.version, "admin API: connection imported");
        let described = Described {
            key: &stored.key,
            status: stored.status,
            version: stored.version,
            created_at: stored.created_at,
            refreshed_at: stored.refreshed_at,
            synced_at: stored.synced_at,
            updated_at: stored.updated_at,
            last_used_at: stored.last_used_at,
            scope: stored.scope.as_deref(),
        };
        Ok::<_, AdminError>(described.to_json(app.clock.now()))
    };
    match run.await {
        Ok(body) => json_answer(StatusCode::OK, &body),
        Err(error) => error_answer(&error),
    }
}

/// `POST /admin/connections/{key}/revoke`: marks the connection `revoked` and forgets its
/// cached access token; requests for it are refused from now on (424, as for any connection
/// that needs a new consent). An import makes it active again.
pub async fn revoke(app: &AdminApp, key: &str) -> Response<Vec<u8>> {
    let run = async {
        let key = parse_key(key)?;
        app.tokens
            .revoke(&key)
            .await
            .map_err(|error| store_failure(error, "revoke"))?;
        tracing::info!(connection = %key, "admin API: connection revoked");
        let found = summary(app, &key).await?;
        Ok::<_, AdminError>(describe(&found, app.clock.now()))
    };
    match run.await {
        Ok(body) => json_answer(StatusCode::OK, &body),
        Err(error) => error_answer(&error),
    }
}

/// `DELETE /admin/connections/{key}`: deletes the stored grant and forgets its cached access
/// token; requests for it then find no connection (404).
pub async fn purge(app: &AdminApp, key: &str) -> Response<Vec<u8>> {
    let run = async {
        let key = parse_key(key)?;
        let deleted = app
            .tokens
            .purge(&key)
            .await
            .map_err(|error| store_failure(error, "purge"))?;
        if !deleted {
            return Err(AdminError::ConnectionNotFound(key));
        }
        tracing::info!(connection = %key, "admin API: connection purged");
        Ok::<_, AdminError>(json!({ "key": key.as_str(), "purged": true }))
    };
    match run.await {
        Ok(body) => json_answer(StatusCode::OK, &body),
        Err(error) => error_answer(&error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn list_query_defaults_limits_and_refusals() {
        assert_eq!(
            parse_list_query(None).expect("empty"),
            ListQuery {
                status: None,
                page: 1,
                per_page: DEFAULT_PER_PAGE
            }
        );
        assert_eq!(
            parse_list_query(Some("status=revoked&page=3&per_page=1000")).expect("valid"),
            ListQuery {
                status: Some(ConnectionStatus::Revoked),
                page: 3,
                per_page: 1000
            }
        );
        for bad in [
            "status=gone",
            "status=",
            "page=0",
            "page=-1",
            "page=x",
            "per_page=0",
            "per_page=1001",
            "per_page=99999999999999999999999",
            "sort=key",
            "page=1&page=2",
        ] {
            let error = parse_list_query(Some(bad)).expect_err(bad);
            assert_eq!(error.status(), StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(error.code(), "invalid_query", "{bad}");
        }
    }

    #[test]
    fn import_body_errors_never_repeat_the_input() {
        let canary = "canary-refresh-token-5f2a";
        assert_eq!(
            parse_import(format!(r#"{{"refresh_token": " {canary} "}}"#).as_bytes())
                .expect("valid")
                .expose_secret(),
            canary
        );
        for bad in [
            format!(r#""{canary}""#),
            format!(r#"{{"refresh_token": "{canary}", "extra": "{canary}"}}"#),
            format!(r#"{{"token": "{canary}"}}"#),
            format!(r#"{{"refresh_token": ["{canary}"]}}"#),
            format!(r#"{{"refresh_token": "{canary} {canary}"}}"#),
            format!(r#"{{"refresh_token": "{canary}""#),
            r#"{"refresh_token": ""}"#.to_owned(),
            "not json".to_owned(),
            String::new(),
        ] {
            let error = parse_import(bad.as_bytes()).expect_err(&bad);
            assert_eq!(error.status(), StatusCode::BAD_REQUEST, "{bad}");
            assert!(!error.message().contains("canary"), "{}", error.message());
        }
    }

    #[test]
    fn keys_are_validated() {
        assert!(parse_key("alice").is_ok());
        assert!(parse_key("flow:demo/f-1").is_ok());
        for bad in ["", "a b", "flow:demo", "flow:/x", "x/y", "flow:a/b/c", "é"] {
            let error = parse_key(bad).expect_err(bad);
            assert_eq!(error.code(), "invalid_key", "{bad}");
        }
    }

    #[test]
    fn a_description_reports_age_and_lapse_in_days() {
        let summary = ConnectionSummary {
            key: ConnectionKey::user("alice").expect("valid"),
            status: ConnectionStatus::Active,
            version: 3,
            created_at: 1_000,
            refreshed_at: Some(10_000),
            synced_at: None,
            updated_at: 10_000,
            last_used_at: None,
            scope: Some("accounts".into()),
        };
        let now = 10_000 + 89 * DAY_SECS + 3600;
        let described = describe(&summary, now);
        assert_eq!(described["refresh_token_age_days"], 89);
        assert_eq!(described["days_until_lapse"], 0);
        assert_eq!(described["lapses_at"], 10_000 + 90 * DAY_SECS);
        assert_eq!(described["scope"], "accounts");
        let lapsed = describe(&summary, 10_000 + 91 * DAY_SECS);
        assert_eq!(lapsed["days_until_lapse"], -1);
    }
}
