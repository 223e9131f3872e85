//! Flow initiation (finx-api.md §4): body validation, the flow registry, and how a flow ends
//! (the redirect back to `redirect_uri` with the parameters of §5).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use serde_json::{Map, Value};
use url::Url;

use super::error::FinxError;
use super::grants::{random_string, CodeOrigin, Grants, Owner};

/// The kinds of flow finX offers, one per initiation endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlowKind {
    OnetimeAccess,
    OnetimeIncomeReport,
    OnetimeAccountVerification,
    OnetimeRiskReport,
    OnetimePayment,
    OngoingAccess,
    OngoingSync,
    OngoingRiskReport,
    OngoingPayment,
}

impl FlowKind {
    /// Every kind with its initiation path.
    pub(crate) const ALL: [(FlowKind, &'static str); 9] = [
        (FlowKind::OnetimeAccess, "/onetime/access"),
        (FlowKind::OnetimeIncomeReport, "/onetime/income-report"),
        (
            FlowKind::OnetimeAccountVerification,
            "/onetime/account-verification",
        ),
        (FlowKind::OnetimeRiskReport, "/onetime/risk-report"),
        (FlowKind::OnetimePayment, "/onetime/payment"),
        (FlowKind::OngoingAccess, "/ongoing/access"),
        (FlowKind::OngoingSync, "/ongoing/sync"),
        (FlowKind::OngoingRiskReport, "/ongoing/risk-report"),
        (FlowKind::OngoingPayment, "/ongoing/payment"),
    ];

    pub(crate) fn is_onetime(self) -> bool {
        matches!(
            self,
            FlowKind::OnetimeAccess
                | FlowKind::OnetimeIncomeReport
                | FlowKind::OnetimeAccountVerification
                | FlowKind::OnetimeRiskReport
                | FlowKind::OnetimePayment
        )
    }

    /// A heading for the widget page.
    pub(crate) fn title(self) -> &'static str {
        match self {
            FlowKind::OnetimeAccess | FlowKind::OngoingAccess => "Connect your bank account",
            FlowKind::OnetimeIncomeReport => "Share an income report",
            FlowKind::OnetimeAccountVerification => "Verify your account",
            FlowKind::OnetimeRiskReport | FlowKind::OngoingRiskReport => "Share a risk report",
            FlowKind::OnetimePayment | FlowKind::OngoingPayment => "Approve a payment",
            FlowKind::OngoingSync => "Synchronize your accounts",
        }
    }
}

/// How the user left the widget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Abort,
    Error,
}

impl Outcome {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "success" | "connect" => Some(Outcome::Success),
            "abort" | "cancel" => Some(Outcome::Abort),
            "error" => Some(Outcome::Error),
            _ => None,
        }
    }
}

/// One initiated flow.
#[derive(Clone, Debug)]
pub(crate) struct Flow {
    pub id: String,
    pub kind: FlowKind,
    pub client_id: String,
    /// What the client sent, validated.
    pub request: FlowRequest,
    /// Secret part of the widget link, so flow ids alone cannot drive a widget.
    pub widget_token: String,
    pub created_at: i64,
    /// One-time flows (and their data) vanish at this time.
    pub vanishes_at: Option<i64>,
    pub outcome: Option<Outcome>,
}

impl Flow {
    /// Whose data this flow's grant reads.
    pub(crate) fn owner(&self) -> Owner {
        match (&self.request.user_id, self.kind.is_onetime()) {
            (Some(user), false) => Owner::User(user.as_str().into()),
            _ => Owner::Flow(self.id.as_str().into()),
        }
    }

    /// Whether a successful end issues an authorization code (not for `/ongoing/sync`).
    fn issues_code(&self) -> bool {
        self.kind != FlowKind::OngoingSync
    }

    /// Whether data about this flow is readable by a grant of `owner` at `now`.
    pub(crate) fn readable_by(&self, owner: &Owner, now: i64) -> bool {
        self.outcome == Some(Outcome::Success)
            && self.vanishes_at.is_none_or(|at| now < at)
            && match owner {
                Owner::Flow(flow_id) => **flow_id == *self.id,
                Owner::User(user) => self.request.user_id.as_deref() == Some(&**user),
            }
    }
}

const LANGUAGES: [&str; 5] = ["de", "en", "es", "fr", "ar"];

/// Collects field errors so one answer names every bad field.
struct Checker<'a> {
    body: &'a Map<String, Value>,
    errors: Map<String, Value>,
}

impl<'a> Checker<'a> {
    fn fail(&mut self, field: &str, message: &str) {
        self.errors
            .entry(field.to_owned())
            .or_insert_with(|| Value::String(message.to_owned()));
    }

    fn string_in(
        &mut self,
        object: &'a Map<String, Value>,
        path: &str,
        key: &str,
        required: bool,
    ) -> Option<&'a str> {
        let field = if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        };
        match object.get(key) {
            None | Some(Value::Null) if required => {
                self.fail(&field, "This field is required.");
                None
            }
            None | Some(Value::Null) => None,
            Some(Value::String(text)) if required && text.trim().is_empty() => {
                self.fail(&field, "This field may not be blank.");
                None
            }
            Some(Value::String(text)) => Some(text),
            Some(_) => {
                self.fail(&field, "Must be a string.");
                None
            }
        }
    }

    fn string(&mut self, key: &str, required: bool) -> Option<&'a str> {
        self.string_in(self.body, "", key, required)
    }

    fn redirect_uri(&mut self, required: bool) -> Option<String> {
        let text = self.string("redirect_uri", required)?;
        match Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                Some(text.to_owned())
            }
            _ => {
                self.fail("redirect_uri", "Must be an absolute http(s) URL.");
                None
            }
        }
    }

    fn boolean(&mut self, key: &str) {
        if !matches!(
            self.body.get(key),
            None | Some(Value::Null) | Some(Value::Bool(_))
        ) {
            self.fail(key, "Must be a boolean.");
        }
    }

    fn positive_int(&mut self, key: &str, min: u64, max: u64) -> Option<u32> {
        match self.body.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_u64().filter(|n| (min..=max).contains(n)) {
                Some(n) => u32::try_from(n).ok(),
                None => {
                    self.fail(key, &format!("Must be an integer between {min} and {max}."));
                    None
                }
            },
        }
    }

    fn string_list(&mut self, key: &str, required: bool) -> Vec<String> {
        match self.body.get(key) {
            None | Some(Value::Null) if required => {
                self.fail(key, "This field is required.");
                Vec::new()
            }
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items))
                if items
                    .iter()
                    .all(|i| i.as_str().is_some_and(|s| !s.is_empty())) =>
            {
                if required && items.is_empty() {
                    self.fail(key, "Must not be empty.");
                }
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect()
            }
            Some(_) => {
                self.fail(key, "Must be a list of non-empty strings.");
                Vec::new()
            }
        }
    }

    /// `accounts: [{"id": IBAN}]`.
    fn account_hints(&mut self) -> Vec<String> {
        match self.body.get("accounts") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                let ids: Vec<String> = items
                    .iter()
                    .filter_map(|item| item.get("id").and_then(Value::as_str).map(str::to_owned))
                    .collect();
                if ids.len() != items.len() {
                    self.fail(
                        "accounts",
                        "Each account must be an object with a string id.",
                    );
                }
                ids
            }
            Some(_) => {
                self.fail("accounts", "Must be a list of accounts.");
                Vec::new()
            }
        }
    }

    fn object(
        &mut self,
        object: &'a Map<String, Value>,
        path: &str,
        key: &str,
        required: bool,
    ) -> Option<&'a Map<String, Value>> {
        let field = if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        };
        match object.get(key) {
            None | Some(Value::Null) => {
                if required {
                    self.fail(&field, "This field is required.");
                }
                None
            }
            Some(Value::Object(inner)) => Some(inner),
            Some(_) => {
                self.fail(&field, "Must be an object.");
                None
            }
        }
    }

    /// `payment{creditor{iban,name}, amount{value,currency}, purpose}`; errors keyed by dotted path.
    fn payment(&mut self) -> Option<Value> {
        let payment = self.object(self.body, "", "payment", true)?;
        if let Some(creditor) = self.object(payment, "payment", "creditor", true) {
            self.string_in(creditor, "payment.creditor", "iban", true);
            self.string_in(creditor, "payment.creditor", "name", true);
        }
        if let Some(amount) = self.object(payment, "payment", "amount", true) {
            match amount.get("value") {
                None | Some(Value::Null) => {
                    self.fail("payment.amount.value", "This field is required.")
                }
                Some(value) if value.as_f64().is_some_and(|v| v > 0.0) => {}
                Some(_) => self.fail("payment.amount.value", "Must be a positive number."),
            }
            if let Some(currency) = self.string_in(amount, "payment.amount", "currency", true) {
                if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
                    self.fail("payment.amount.currency", "Must be an ISO 4217 code.");
                }
            }
        }
        self.string_in(payment, "payment", "purpose", true);
        Some(Value::Object(payment.clone()))
    }
}

/// The validated parts of an initiation body.
#[derive(Clone, Debug)]
pub(crate) struct FlowRequest {
    pub redirect_uri: Option<String>,
    pub state: Option<String>,
    pub user_id: Option<String>,
    /// Name of the account holder (account verification) or of the report subject.
    pub name: Option<String>,
    /// IBANs or account ids the client suggested (`accounts`, `account_ids`, `account`).
    pub account_hints: Vec<String>,
    pub reporting_period: u32,
    pub payment: Option<Value>,
}

/// Validates an initiation body for `kind` (finx-api.md §4), naming every bad field.
pub(crate) fn validate(kind: FlowKind, body: &Value) -> Result<FlowRequest, FinxError> {
    let Value::Object(body) = body else {
        return Err(FinxError::bad_request("request body must be a JSON object"));
    };
    let mut check = Checker {
        body,
        errors: Map::new(),
    };
    let needs_user = matches!(
        kind,
        FlowKind::OngoingAccess
            | FlowKind::OngoingSync
            | FlowKind::OngoingRiskReport
            | FlowKind::OngoingPayment
    );
    let redirect_uri = check.redirect_uri(kind != FlowKind::OngoingSync);
    let user_id = check.string("user_id", needs_user).map(str::to_owned);
    let state = check.string("state", false).map(str::to_owned);
    if let Some(language) = check.string("language", false) {
        if !LANGUAGES.contains(&language) {
            check.fail("language", "Must be one of de, en, es, fr, ar.");
        }
    }
    for flag in ["allow_multi_selection", "save_secrets", "readout"] {
        check.boolean(flag);
    }
    for optional in ["tracking_id", "provider_id", "end_to_end_reference"] {
        check.string(optional, false);
    }
    check.string_list("account_types", false);
    check.positive_int("sync_period", 1, 730);
    let mut account_hints = check.account_hints();
    let mut reporting_period = 12;
    let mut name = None;
    let mut payment = None;
    match kind {
        FlowKind::OnetimeIncomeReport => {
            if let Some(months) = check.positive_int("reporting_period", 4, 24) {
                reporting_period = months;
                if body.get("sync_period").is_some_and(|v| !v.is_null()) {
                    check.fail("reporting_period", "Cannot be combined with sync_period.");
                }
            }
        }
        FlowKind::OnetimeRiskReport | FlowKind::OngoingRiskReport => {
            if let Some(months) = check.positive_int("reporting_period", 1, 24) {
                reporting_period = months;
            }
            name = check.string("name", false).map(str::to_owned);
        }
        FlowKind::OnetimeAccountVerification => {
            name = check.string("name", true).map(str::to_owned);
            match body.get("account") {
                None | Some(Value::Null) => {}
                Some(Value::String(iban)) => account_hints.push(iban.clone()),
                Some(Value::Object(account)) => {
                    if let Some(iban) = check.string_in(account, "account", "iban", false) {
                        account_hints.push(iban.to_owned());
                    }
                }
                Some(_) => check.fail("account", "Must be an object or an IBAN string."),
            }
        }
        FlowKind::OnetimePayment | FlowKind::OngoingPayment => {
            payment = check.payment();
            check.object(body, "", "debtor", false);
        }
        FlowKind::OngoingSync => {
            account_hints = check.string_list("account_ids", true);
        }
        FlowKind::OnetimeAccess | FlowKind::OngoingAccess => {}
    }
    if !check.errors.is_empty() {
        return Err(FinxError::validation(check.errors));
    }
    Ok(FlowRequest {
        redirect_uri,
        state,
        user_id,
        name,
        account_hints,
        reporting_period,
        payment,
    })
}

/// The flow registry.
#[derive(Debug, Default)]
pub(crate) struct Flows {
    flows: Mutex<HashMap<String, Flow>>,
}

impl Flows {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Flow>> {
        self.flows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a validated flow and returns it.
    pub(crate) fn create(
        &self,
        kind: FlowKind,
        request: FlowRequest,
        client_id: &str,
        now: i64,
        onetime_ttl_secs: i64,
    ) -> Flow {
        let flow = Flow {
            id: format!("flow_{}", random_string(24)),
            kind,
            client_id: client_id.to_owned(),
            request,
            widget_token: random_string(32),
            created_at: now,
            vanishes_at: kind
                .is_onetime()
                .then(|| now.saturating_add(onetime_ttl_secs)),
            outcome: None,
        };
        let mut flows = self.lock();
        // One-time data is deleted an hour after the flow; sweeping here bounds memory.
        flows.retain(|_, f| f.vanishes_at.is_none_or(|at| now < at));
        flows.insert(flow.id.clone(), flow.clone());
        flow
    }

    /// A flow that still exists at `now`.
    pub(crate) fn get(&self, flow_id: &str, now: i64) -> Option<Flow> {
        self.lock()
            .get(flow_id)
            .filter(|f| f.vanishes_at.is_none_or(|at| now < at))
            .cloned()
    }

    /// Marks a flow as consented without the widget (for `POST /_sim/grants {"flow_id"}`).
    pub(crate) fn consent(&self, flow_id: &str, now: i64) -> Result<Flow, FinxError> {
        let mut flows = self.lock();
        let Some(flow) = flows
            .get_mut(flow_id)
            .filter(|f| f.vanishes_at.is_none_or(|at| now < at))
        else {
            return Err(FinxError::not_found("unknown flow"));
        };
        match flow.outcome {
            None | Some(Outcome::Success) => {
                flow.outcome = Some(Outcome::Success);
                Ok(flow.clone())
            }
            Some(_) => Err(FinxError::conflict("this flow ended without consent")),
        }
    }

    /// Drops every flow.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    /// Ends a pending flow and builds the redirect (None when the flow has no redirect_uri).
    pub(crate) fn complete(
        &self,
        flow_id: &str,
        outcome: Outcome,
        grants: &Grants,
        now: i64,
    ) -> Result<Option<Url>, FinxError> {
        let flow = {
            let mut flows = self.lock();
            let Some(flow) = flows
                .get_mut(flow_id)
                .filter(|f| f.vanishes_at.is_none_or(|at| now < at))
            else {
                return Err(FinxError::not_found("unknown flow"));
            };
            if flow.outcome.is_some() {
                return Err(FinxError::conflict("this flow has already finished"));
            }
            flow.outcome = Some(outcome);
            flow.clone()
        };
        let code = (outcome == Outcome::Success && flow.issues_code()).then(|| {
            grants.new_code(
                CodeOrigin {
                    client_id: flow.client_id.clone(),
                    redirect_uri: flow.request.redirect_uri.clone(),
                    owner: flow.owner(),
                    vanishes_at: flow.vanishes_at,
                },
                now,
            )
        });
        let Some(redirect_uri) = &flow.request.redirect_uri else {
            return Ok(None);
        };
        let mut url = Url::parse(redirect_uri)
            .map_err(|_| FinxError::bad_request("the flow's redirect_uri is not a URL"))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(state) = &flow.request.state {
                query.append_pair("state", state);
            }
            query.append_pair(
                "success",
                if outcome == Outcome::Success {
                    "true"
                } else {
                    "false"
                },
            );
            if let Some(code) = &code {
                query.append_pair("code", code);
            }
            query.append_pair("flow_id", &flow.id);
            if outcome == Outcome::Abort {
                // Both spellings: the nrich guide says abort, the older guide says cancel.
                query.append_pair("abort", "true");
                query.append_pair("cancel", "true");
            }
        }
        Ok(Some(url))
    }
}
