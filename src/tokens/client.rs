//! The finX `/auth/token` client: refresh and code-exchange requests, and the classification of
//! their failures into the classes that decide a connection's fate (only `invalid_grant` kills
//! a connection; see `docs/architecture.md`).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::clock::UnixSeconds;
use crate::store::{AccessToken, TokenGrant};

/// Why a token request failed. Only [`TokenFailure::InvalidGrant`] kills a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFailure {
    /// The grant (refresh token or code) is dead.
    #[error("finX answered invalid_grant")]
    InvalidGrant,
    /// finX rejected our client credentials or the request itself.
    #[error("finX rejected the client or request ({0})")]
    Rejected(&'static str),
    /// Network error, 5xx, 429 or an unreadable answer: try again later, keep the token.
    #[error("finX token endpoint unavailable ({reason})")]
    Unavailable {
        reason: &'static str,
        retry_after_secs: u64,
        /// finX certainly did not act on the request (it answered 429/5xx, or no connection
        /// was made), so asking again at once cannot present a rotated token twice.
        not_processed: bool,
    },
    /// No answer in time: try again later, keep the token.
    #[error("finX token endpoint timed out")]
    Timeout,
}

/// Default `Retry-After` when finX gave none.
const DEFAULT_RETRY_AFTER_SECS: u64 = 1;

/// finX's token endpoint as the token manager sees it: the seam where tests put a scripted fake.
#[async_trait::async_trait]
pub trait TokenEndpoint: Send + Sync + 'static {
    /// Spends `refresh_token` for a new access token (and, usually, a rotated refresh token).
    async fn refresh(
        &self,
        refresh_token: &SecretString,
        now: UnixSeconds,
    ) -> Result<TokenGrant, TokenFailure>;
}

#[async_trait::async_trait]
impl TokenEndpoint for TokenClient {
    async fn refresh(
        &self,
        refresh_token: &SecretString,
        now: UnixSeconds,
    ) -> Result<TokenGrant, TokenFailure> {
        TokenClient::refresh(self, refresh_token, now).await
    }
}

/// Talks to `POST {base}/auth/token` with HTTP Basic client authentication and JSON bodies.
#[derive(Clone)]
pub struct TokenClient {
    http: reqwest::Client,
    base: String,
    endpoint: String,
    client_id: String,
    client_secret: SecretString,
}

/// `expires_in` when finX's answer has none (finX's access tokens live an hour).
const DEFAULT_EXPIRES_IN: i64 = 3600;

/// Reads a successful token answer. Lenient on purpose: by the time this runs finX has already
/// rotated the refresh token, so a rotated token must be kept whatever else is odd about the
/// answer. A missing access token becomes an empty, already-expired one (stored, never used).
/// Public for the fuzz targets.
pub fn parse_grant(body: &[u8], now: UnixSeconds) -> Result<TokenGrant, TokenFailure> {
    let unreadable = TokenFailure::Unavailable {
        reason: "unreadable token answer",
        retry_after_secs: DEFAULT_RETRY_AFTER_SECS,
        not_processed: false,
    };
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) else {
        return Err(unreadable);
    };
    let text = |field: &str| {
        answer
            .get(field)
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
            .map(str::to_owned)
    };
    let refresh_token = text("refresh_token").map(SecretString::from);
    let access_token = text("access_token");
    if access_token.is_none() && refresh_token.is_none() {
        return Err(unreadable);
    }
    let expires_in = match answer.get("expires_in") {
        Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
    .unwrap_or(DEFAULT_EXPIRES_IN)
    .clamp(0, 24 * 3600);
    let expires_at = match access_token {
        Some(_) => now.saturating_add(expires_in),
        None => now,
    };
    Ok(TokenGrant {
        access: AccessToken {
            token: SecretString::from(access_token.unwrap_or_default()),
            expires_at,
        },
        refresh_token,
        scope: text("scope"),
    })
}

impl TokenClient {
    /// Builds the client. `base_url` is finX's base URL (its path is kept).
    pub fn new(
        base_url: &url::Url,
        client_id: &str,
        client_secret: SecretString,
        connect_timeout: Duration,
        total_timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(total_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        let base = base_url.as_str().trim_end_matches('/').to_owned();
        let endpoint = format!("{base}/auth/token");
        Ok(Self {
            http,
            base,
            endpoint,
            client_id: client_id.to_owned(),
            client_secret,
        })
    }

    /// Spends `refresh_token` for a new access token (and, usually, a rotated refresh token).
    pub async fn refresh(
        &self,
        refresh_token: &SecretString,
        now: UnixSeconds,
    ) -> Result<TokenGrant, TokenFailure> {
        let body = serde_json::json!({
            "grant_type": "refresh_token",
            "refresh_token": refresh_token.expose_secret(),
        });
        self.request(&body, now).await
    }

    /// Exchanges an authorization code.
    pub async fn exchange_code(
        &self,
        code: &SecretString,
        redirect_uri: &str,
        now: UnixSeconds,
    ) -> Result<TokenGrant, TokenFailure> {
        let body = serde_json::json!({
            "grant_type": "authorization_code",
            "code": code.expose_secret(),
            "redirect_uri": redirect_uri,
        });
        self.request(&body, now).await
    }

    /// POSTs a JSON body to `path` with client Basic auth and returns finX's answer as it is
    /// (status, content type, body); only transport failures are errors.
    pub async fn post_json(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<(u16, Option<String>, bytes::Bytes), TokenFailure> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .basic_auth(&self.client_id, Some(self.client_secret.expose_secret()))
            .json(body)
            .send()
            .await
            .map_err(classify_transport)?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.map_err(classify_transport)?;
        Ok((status, content_type, body))
    }

    async fn request(&self, body: &Value, now: UnixSeconds) -> Result<TokenGrant, TokenFailure> {
        let response = self
            .http
            .post(&self.endpoint)
            .basic_auth(&self.client_id, Some(self.client_secret.expose_secret()))
            .json(body)
            .send()
            .await
            .map_err(classify_transport)?;
        let status = response.status();
        let retry_after_secs = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(DEFAULT_RETRY_AFTER_SECS);
        let bytes = response.bytes().await.map_err(classify_transport)?;
        if status.is_success() {
            return parse_grant(&bytes, now);
        }
        Err(classify_error(status.as_u16(), &bytes, retry_after_secs))
    }
}

fn classify_transport(error: reqwest::Error) -> TokenFailure {
    if error.is_timeout() {
        TokenFailure::Timeout
    } else {
        TokenFailure::Unavailable {
            reason: if error.is_connect() {
                "connect failed"
            } else {
                "connection failed"
            },
            retry_after_secs: DEFAULT_RETRY_AFTER_SECS,
            not_processed: error.is_connect(),
        }
    }
}

/// The OAuth error name in either shape finX uses: RFC 6749 `{"error": "invalid_grant"}` or the
/// nested `{"error": {"name" | "message" | "description": "invalid_grant"}}`.
fn oauth_error_names(body: &[u8]) -> Vec<String> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    match value.get("error") {
        Some(Value::String(name)) => vec![name.clone()],
        Some(Value::Object(nested)) => ["name", "message", "description", "code"]
            .iter()
            .filter_map(|field| nested.get(*field).and_then(Value::as_str))
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// Maps a non-2xx token answer to its failure class. Public for the fuzz targets.
pub fn classify_error(status: u16, body: &[u8], retry_after_secs: u64) -> TokenFailure {
    let names = oauth_error_names(body);
    let named = |wanted: &str| names.iter().any(|n| n.trim() == wanted);
    // A 429 says the request was not served (like a 503), whatever its body names.
    if (400..500).contains(&status) && status != 429 && named("invalid_grant") {
        return TokenFailure::InvalidGrant;
    }
    if named("invalid_client") || status == 401 {
        return TokenFailure::Rejected("invalid_client");
    }
    match status {
        // 429 and 503 say the request was not served; any other 5xx (a proxy's 502/504, a
        // 500 after the fact) may come after the rotation took effect.
        429 | 503 => TokenFailure::Unavailable {
            reason: "finX answered 429 or 503",
            retry_after_secs,
            not_processed: true,
        },
        500..=599 => TokenFailure::Unavailable {
            reason: "finX answered 5xx",
            retry_after_secs,
            not_processed: false,
        },
        _ if named("unsupported_grant_type") => TokenFailure::Rejected("unsupported_grant_type"),
        _ if named("unauthorized_client") => TokenFailure::Rejected("unauthorized_client"),
        _ if named("invalid_request") => TokenFailure::Rejected("invalid_request"),
        _ => TokenFailure::Unavailable {
            reason: "unexpected answer",
            retry_after_secs,
            not_processed: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_successful_answers_keep_the_rotated_refresh_token() {
        let grant = parse_grant(
            br#"{"access_token":"a","expires_in":"3600","refresh_token":"r2","scope":5}"#,
            100,
        )
        .unwrap();
        assert_eq!(grant.access.expires_at, 3700);
        assert_eq!(grant.refresh_token.unwrap().expose_secret(), "r2");
        assert_eq!(grant.scope, None);
        let grant = parse_grant(br#"{"access_token":"a","expires_in":3600.0}"#, 100).unwrap();
        assert_eq!(grant.access.expires_at, 3700);
        assert!(grant.refresh_token.is_none());
        let grant = parse_grant(br#"{"access_token":"a"}"#, 100).unwrap();
        assert_eq!(grant.access.expires_at, 100 + DEFAULT_EXPIRES_IN);
        // No access token, but a rotated refresh token: kept, with an unusable access token.
        let grant = parse_grant(br#"{"refresh_token":"r3"}"#, 100).unwrap();
        assert_eq!(grant.access.token.expose_secret(), "");
        assert_eq!(grant.access.expires_at, 100);
        assert_eq!(grant.refresh_token.unwrap().expose_secret(), "r3");
        assert!(parse_grant(b"{}", 100).is_err());
        assert!(parse_grant(b"not json", 100).is_err());
    }

    #[test]
    fn invalid_grant_is_recognised_in_both_shapes() {
        let rfc = br#"{"error":"invalid_grant","error_description":"x"}"#;
        let nested = br#"{"error":{"code":1,"group":"client","name":"invalid_grant","message":"invalid_grant","description":"d","data":{}},"status":400}"#;
        let only_message = br#"{"error":{"message":"invalid_grant"},"status":400}"#;
        for body in [&rfc[..], &nested[..], &only_message[..]] {
            assert_eq!(classify_error(400, body, 1), TokenFailure::InvalidGrant);
        }
    }

    #[test]
    fn other_failures_keep_the_token() {
        assert_eq!(
            classify_error(401, br#"{"error":"invalid_client"}"#, 1),
            TokenFailure::Rejected("invalid_client")
        );
        assert_eq!(
            classify_error(503, b"", 7),
            TokenFailure::Unavailable {
                reason: "finX answered 429 or 503",
                retry_after_secs: 7,
                not_processed: true,
            }
        );
        assert!(matches!(
            classify_error(429, b"not json", 2),
            TokenFailure::Unavailable { .. }
        ));
        // A rate limit is never a verdict on the grant.
        assert!(matches!(
            classify_error(429, br#"{"error":"invalid_grant"}"#, 2),
            TokenFailure::Unavailable {
                not_processed: true,
                ..
            }
        ));
        // A 5xx that happens to mention invalid_grant is still a server failure; other than a
        // 503 it may have come after the rotation, so it is not retried at once.
        assert!(matches!(
            classify_error(500, br#"{"error":"invalid_grant"}"#, 1),
            TokenFailure::Unavailable {
                not_processed: false,
                ..
            }
        ));
        assert!(matches!(
            classify_error(502, b"", 1),
            TokenFailure::Unavailable {
                not_processed: false,
                ..
            }
        ));
    }
}
