//! Connect flows through the gateway: a service starts a finX flow here and gets finX's widget
//! link back; the user's browser returns to the gateway's callback, which exchanges the code,
//! stores the tokens and only then sends the browser on to the service, without the code.
//!
//! The gateway replaces the caller's `redirect_uri` with its own callback and the caller's
//! `state` with a signed [`state::FlowState`] that carries both originals. The flow id finX
//! issues is remembered in the token store (until the state expires) under the state's id: a
//! callback must bring a state the gateway issued, for the flow it was issued for, once. With a
//! shared store and a shared state key, a flow started on one replica completes on any other.

pub mod callback;
pub mod flows;
pub mod settings;
pub mod state;

use std::borrow::Cow;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use rand::distr::{Alphanumeric, SampleString};
use secrecy::SecretString;
use serde_json::{Map, Value};
use url::Url;

use crate::callers::{AuthError, Caller};
use crate::clock::Clock;
use crate::store::{ConnectionKey, NewConnection, TokenStore};
use crate::tokens::{TokenClient, TokenFailure, TokenManager};
use callback::CallbackQuery;
pub use flows::FlowKind;
pub use settings::{ConnectSettings, RedirectRule};
use state::{FlowState, StateError, StateSigner};

/// The largest flow-initiation body the gateway reads.
pub const MAX_FLOW_BODY: usize = 64 * 1024;

/// finX's answer to a flow initiation, passed back unchanged.
pub struct UpstreamAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// How a callback ended.
#[derive(Debug)]
pub struct Completion {
    /// The caller's `redirect_uri` with its `state` and the outcome; never a code.
    pub redirect: Url,
    pub success: bool,
    pub flow_id: Option<String>,
    /// The connection stored (or synchronised), on success.
    pub connection: Option<ConnectionKey>,
    /// A short reason when the flow failed at the gateway (e.g. `exchange_failed`).
    pub error: Option<&'static str>,
}

/// Starts flows and completes callbacks.
pub struct ConnectService {
    settings: ConnectSettings,
    /// `settings.allowed_redirects`, replaceable by a reload (SIGHUP).
    allowed_redirects: ArcSwap<Vec<RedirectRule>>,
    signer: StateSigner,
    client: TokenClient,
    store: Arc<dyn TokenStore>,
    tokens: TokenManager,
    clock: Arc<dyn Clock>,
}

/// Why a flow could not be started or completed. The error mapping (`src/error.rs`) turns each into the answer.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The request body or callback query is not what a flow needs.
    #[error("{0}")]
    BadRequest(Cow<'static, str>),
    /// The callback's state is not one this gateway issued, or has expired.
    #[error(transparent)]
    State(#[from] StateError),
    /// The caller's policy does not allow the user, or the flow is another caller's.
    #[error(transparent)]
    Caller(#[from] AuthError),
    /// finX could not be asked, or refused the gateway's request.
    #[error(transparent)]
    Upstream(#[from] TokenFailure),
    /// Started flows cannot be read or written.
    #[error("the token store is unavailable")]
    Store,
    /// A bug: logged where it happens.
    #[error("internal error")]
    Internal,
}

impl ConnectError {
    /// A request the flow cannot use, with `why` as the caller's message.
    fn bad_request(why: impl Into<Cow<'static, str>>) -> Self {
        Self::BadRequest(why.into())
    }
}

impl ConnectService {
    /// Builds the service; `tokens` is told about every connection a callback stores.
    pub fn new(
        settings: ConnectSettings,
        client: TokenClient,
        store: Arc<dyn TokenStore>,
        tokens: TokenManager,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            signer: StateSigner::new(&settings.state_key),
            allowed_redirects: ArcSwap::from_pointee(settings.allowed_redirects.clone()),
            settings,
            client,
            store,
            tokens,
            clock,
        }
    }

    /// Replaces the allowed return addresses (a reload); flows already started keep theirs.
    pub fn replace_allowed_redirects(&self, rules: Vec<RedirectRule>) {
        self.allowed_redirects.store(Arc::new(rules));
    }

    /// The path the callback is served on.
    pub fn callback_path(&self) -> &str {
        &self.settings.callback_path
    }

    /// Checks and rewrites a flow-initiation body, forwards it to finX and returns finX's answer.
    pub async fn start_flow(
        &self,
        kind: FlowKind,
        caller: &Caller,
        body: &[u8],
    ) -> Result<UpstreamAnswer, ConnectError> {
        let mut request: Map<String, Value> = match serde_json::from_slice(body) {
            Ok(Value::Object(object)) => object,
            _ => {
                return Err(ConnectError::bad_request(
                    "the flow request body must be a JSON object",
                ))
            }
        };
        let redirect_uri = match request.get("redirect_uri") {
            Some(Value::String(uri)) => uri.clone(),
            Some(_) => return Err(ConnectError::bad_request("redirect_uri must be a string")),
            None => {
                return Err(ConnectError::bad_request(
                    "redirect_uri is required (the gateway returns the user there)",
                ))
            }
        };
        let parsed = Url::parse(&redirect_uri)
            .map_err(|_| ConnectError::bad_request("redirect_uri is not a URL"))?;
        if !self
            .allowed_redirects
            .load()
            .iter()
            .any(|rule| rule.allows(&parsed))
        {
            return Err(ConnectError::bad_request(
                "redirect_uri is not allowed by this gateway",
            ));
        }
        let original_state = match request.get("state") {
            Some(Value::String(state)) => Some(state.clone()),
            None | Some(Value::Null) => None,
            Some(_) => return Err(ConnectError::bad_request("state must be a string")),
        };
        let user = match (kind.is_ongoing(), request.get("user_id")) {
            (true, Some(Value::String(user))) => {
                ConnectionKey::user(user).map_err(|_| {
                    ConnectError::bad_request(
                        "user_id: ids are 1 to 128 characters of A-Z a-z 0-9 . _ @ -",
                    )
                })?;
                caller.authorize_user(user)?;
                Some(user.clone())
            }
            (true, _) => {
                return Err(ConnectError::bad_request(
                    "user_id is required for ongoing flows",
                ))
            }
            (false, _) => None,
        };

        let now = self.clock.now();
        let state = FlowState {
            kind: kind.name().to_owned(),
            user,
            svc: caller.service().to_owned(),
            ru: redirect_uri,
            st: original_state,
            iat: now,
            exp: now + self.settings.state_ttl.as_secs() as i64,
            jti: Alphanumeric.sample_string(&mut rand::rng(), 24),
        };
        let signed = self
            .signer
            .sign(&state)
            .map_err(|_| ConnectError::Internal)?;
        request.insert(
            "redirect_uri".into(),
            Value::String(self.settings.callback_url.to_string()),
        );
        request.insert("state".into(), Value::String(signed));

        let (status, content_type, body) = self
            .client
            .post_json(&format!("/{}", kind.name()), &Value::Object(request))
            .await
            .map_err(ConnectError::Upstream)?;
        if status == 201 {
            let flow_id = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|answer| answer.get("id")?.as_str().map(str::to_owned));
            match flow_id {
                // Started flows by their state's `jti`: a callback takes the entry, which makes
                // a state single use and binds the flow id to it.
                Some(flow_id) => self
                    .store
                    .put_flow_state(&state.jti, &flow_id, state.exp, now)
                    .await
                    .map_err(|error| {
                        tracing::error!(%error, flow = kind.name(), "a started flow could not be stored; it cannot complete");
                        ConnectError::Store
                    })?,
                None => tracing::warn!(
                    flow = kind.name(),
                    "finX started a flow without an id; it cannot complete"
                ),
            }
        }
        tracing::info!(
            flow = kind.name(),
            service = caller.service(),
            status,
            "connect flow started"
        );
        Ok(UpstreamAnswer {
            status,
            content_type,
            body,
        })
    }

    /// Completes a flow from the callback's query string. `caller` is the authenticated caller
    /// of a server-to-server callback; it must be the service that started the flow.
    pub async fn complete(
        &self,
        query: &str,
        caller: Option<&Caller>,
    ) -> Result<Completion, ConnectError> {
        let CallbackQuery {
            state: state_token,
            success,
            code,
            flow_id,
            abort,
            cancel,
        } = CallbackQuery::parse(query).map_err(ConnectError::bad_request)?;
        let state_token = state_token
            .ok_or_else(|| ConnectError::bad_request("the callback carries no state"))?;
        let state = self.signer.verify(&state_token, self.clock.now())?;
        if let Some(caller) = caller {
            if caller.service() != state.svc {
                return Err(AuthError::Forbidden {
                    reason: "the flow was started by another caller",
                }
                .into());
            }
        }
        let kind =
            FlowKind::from_path(&format!("/{}", state.kind)).ok_or(ConnectError::Internal)?;
        // Single use, and bound to the flow finX started for it: the first callback with this
        // state takes its entry, even if it then fails.
        let started_flow = self
            .store
            .take_flow_state(&state.jti, self.clock.now())
            .await
            .map_err(|error| {
                tracing::error!(%error, "started flows cannot be read");
                ConnectError::Store
            })?
            .ok_or_else(|| {
                ConnectError::bad_request("the flow state is unknown or was already used")
            })?;
        if flow_id.as_deref().is_some_and(|id| id != started_flow) {
            return Err(ConnectError::bad_request(
                "flow_id does not belong to this flow state",
            ));
        }
        let flow_id = Some(started_flow);

        let mut outcome = Outcome {
            success,
            connection: None,
            error: None,
        };
        if success {
            outcome = self.finish(kind, &state, code, flow_id.as_deref()).await;
        }
        let mut redirect = Url::parse(&state.ru).map_err(|_| ConnectError::Internal)?;
        {
            let mut pairs = redirect.query_pairs_mut();
            if let Some(original) = &state.st {
                pairs.append_pair("state", original);
            }
            pairs.append_pair("success", if outcome.success { "true" } else { "false" });
            if let Some(flow_id) = &flow_id {
                pairs.append_pair("flow_id", flow_id);
            }
            if let Some(abort) = &abort {
                pairs.append_pair("abort", abort);
            }
            if let Some(cancel) = &cancel {
                pairs.append_pair("cancel", cancel);
            }
            if let Some(error) = outcome.error {
                pairs.append_pair("error", error);
            }
        }
        tracing::info!(
            flow = kind.name(),
            service = %state.svc,
            success = outcome.success,
            error = outcome.error.unwrap_or("-"),
            connection = outcome.connection.as_ref().map_or("-", ConnectionKey::as_str),
            "connect flow completed"
        );
        Ok(Completion {
            redirect,
            success: outcome.success,
            flow_id,
            connection: outcome.connection,
            error: outcome.error,
        })
    }

    /// A successful return: exchange the code and store the tokens (or record the sync).
    async fn finish(
        &self,
        kind: FlowKind,
        state: &FlowState,
        code: Option<SecretString>,
        flow_id: Option<&str>,
    ) -> Outcome {
        let key = match (&state.user, flow_id) {
            (Some(user), _) => ConnectionKey::user(user),
            (None, Some(flow_id)) => ConnectionKey::flow(&state.svc, flow_id),
            (None, None) => return Outcome::failed("missing_flow_id"),
        };
        let Ok(key) = key else {
            return Outcome::failed("invalid_connection");
        };
        let now = self.clock.now();
        if !kind.yields_code() {
            return match self.store.record_sync(&key, now).await {
                Ok(()) => Outcome::stored(key),
                Err(error) => {
                    tracing::warn!(connection = %key, %error, "could not record a manual sync");
                    Outcome::failed("sync_not_recorded")
                }
            };
        }
        let Some(code) = code else {
            return Outcome::failed("missing_code");
        };
        let grant = match self
            .client
            .exchange_code(&code, self.settings.callback_url.as_str(), now)
            .await
        {
            Ok(grant) => grant,
            Err(failure) => {
                tracing::warn!(connection = %key, %failure, "code exchange failed");
                return Outcome::failed("exchange_failed");
            }
        };
        let connection = NewConnection {
            // A grant without a refresh token lives as long as its access token.
            refresh_token: grant
                .refresh_token
                .unwrap_or_else(|| SecretString::from(String::new())),
            access: Some(grant.access),
            scope: grant.scope,
        };
        match self.tokens.store_consent(&key, &connection).await {
            Ok(_) => Outcome::stored(key),
            Err(error) => {
                tracing::error!(connection = %key, %error, "exchanged tokens could not be stored");
                Outcome::failed("store_unavailable")
            }
        }
    }
}

struct Outcome {
    success: bool,
    connection: Option<ConnectionKey>,
    error: Option<&'static str>,
}

impl Outcome {
    fn stored(key: ConnectionKey) -> Self {
        Self {
            success: true,
            connection: Some(key),
            error: None,
        }
    }

    fn failed(error: &'static str) -> Self {
        Self {
            success: false,
            connection: None,
            error: Some(error),
        }
    }
}
