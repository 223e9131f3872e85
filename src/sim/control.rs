//! A typed async client for the simulator's `/_sim/*` control plane, for tests and benches.

use serde::Deserialize;
use serde_json::json;

use super::faults::Faults;
use super::stats::{SeenRequest, SimStats, UserStats};

/// Tokens of a grant created with `POST /_sim/grants`.
#[derive(Clone, Debug, Deserialize)]
pub struct GrantTokens {
    /// Bearer token for `/rest/*`.
    pub access_token: String,
    /// The grant's current refresh token.
    pub refresh_token: String,
    /// Access-token lifetime in seconds.
    pub expires_in: u64,
    /// Granted scope.
    pub scope: String,
}

#[derive(Deserialize)]
struct Redirect {
    redirect: Option<String>,
}

#[derive(Deserialize)]
struct Seen {
    requests: Vec<SeenRequest>,
}

#[derive(Deserialize)]
struct Revoked {
    families_revoked: u64,
}

/// Control-plane client; cheap to clone.
#[derive(Clone, Debug)]
pub struct SimControl {
    base_url: String,
    http: reqwest::Client,
}

impl SimControl {
    /// A client for the simulator at `base_url` (e.g. `http://127.0.0.1:9100`).
    pub fn new(base_url: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/_sim/{path}", self.base_url)
    }

    async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<reqwest::Response, reqwest::Error> {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await?
            .error_for_status()
    }

    /// All counters.
    pub async fn stats(&self) -> Result<SimStats, reqwest::Error> {
        self.http
            .get(self.url("stats"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }

    /// One user's refresh counters.
    pub async fn user_stats(&self, user: &str) -> Result<UserStats, reqwest::Error> {
        self.http
            .get(self.url(&format!("stats?user={}", urlencode(user))))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }

    /// Creates a consented ongoing grant for `user_id`.
    pub async fn create_grant(&self, user_id: &str) -> Result<GrantTokens, reqwest::Error> {
        self.post("grants", json!({ "user_id": user_id }))
            .await?
            .json()
            .await
    }

    /// Consents the flow `flow_id` directly and creates its grant.
    pub async fn create_flow_grant(&self, flow_id: &str) -> Result<GrantTokens, reqwest::Error> {
        self.post("grants", json!({ "flow_id": flow_id }))
            .await?
            .json()
            .await
    }

    /// Moves the simulator's clock forward (or back, with a negative value).
    pub async fn advance_clock(&self, seconds: i64) -> Result<(), reqwest::Error> {
        self.post("clock/advance", json!({ "seconds": seconds }))
            .await
            .map(drop)
    }

    /// Makes every access token issued so far unusable.
    pub async fn expire_access_tokens(&self) -> Result<(), reqwest::Error> {
        self.post("expire-access-tokens", json!({})).await.map(drop)
    }

    /// Revokes all grants of a user.
    pub async fn revoke(&self, user_id: &str) -> Result<(), reqwest::Error> {
        self.revoke_counted(user_id).await.map(drop)
    }

    /// Revokes all grants of a user; returns how many were live.
    pub async fn revoke_counted(&self, user_id: &str) -> Result<u64, reqwest::Error> {
        let revoked: Revoked = self
            .post("revoke", json!({ "user_id": user_id }))
            .await?
            .json()
            .await?;
        Ok(revoked.families_revoked)
    }

    /// Replaces the fault settings.
    pub async fn set_faults(&self, faults: &Faults) -> Result<(), reqwest::Error> {
        self.http
            .post(self.url("faults"))
            .json(faults)
            .send()
            .await?
            .error_for_status()
            .map(drop)
    }

    /// Clears faults (state is kept).
    pub async fn reset(&self) -> Result<(), reqwest::Error> {
        self.post("reset", json!({})).await.map(drop)
    }

    /// Clears faults and drops all flows, codes, grants, counters and seen headers.
    pub async fn reset_all(&self) -> Result<(), reqwest::Error> {
        self.post("reset", json!({ "state": true })).await.map(drop)
    }

    /// Ends a flow as the widget would (`success`, `abort` or `error`) and returns the redirect
    /// URL; empty when the flow has no `redirect_uri` (possible only for `/ongoing/sync`).
    pub async fn complete_widget(
        &self,
        flow_id: &str,
        outcome: &str,
    ) -> Result<String, reqwest::Error> {
        let path = format!("widget/{}/complete", urlencode(flow_id));
        let redirect: Redirect = self
            .post(&path, json!({ "outcome": outcome }))
            .await?
            .json()
            .await?;
        Ok(redirect.redirect.unwrap_or_default())
    }

    /// The last `limit` requests the simulator received outside `/_sim/`, oldest first.
    pub async fn seen_headers(&self, limit: usize) -> Result<Vec<SeenRequest>, reqwest::Error> {
        let seen: Seen = self
            .http
            .get(self.url(&format!("seen-headers?limit={limit}")))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(seen.requests)
    }

    /// The most recent request outside `/_sim/`, if any.
    pub async fn last_request(&self) -> Result<Option<SeenRequest>, reqwest::Error> {
        Ok(self.seen_headers(1).await?.pop())
    }
}

fn urlencode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}
