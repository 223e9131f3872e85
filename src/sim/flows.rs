//! Flow initiation: body validation, the flow registry, and how a flow ends (the redirect back
//! to `redirect_uri`, with its parameters in the order finX's guides show).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use rand::Rng;
use serde_json::{Map, Value};
use url::Url;

use super::error::FinxError;
use super::grants::{random_string, CodeOrigin, Grants, Owner};
use super::lenient;

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
    /// One-time flows (and their data) vanish at this time.
    pub vanishes_at: Option<i64>,
    pub outcome: Option<Outcome>,
    /// When the widget (or the control plane) ended the flow.
    pub ended_at: Option<i64>,
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
const READOUTS: [&str; 2] = ["ACCOUNTS", "TRANSACTIONS"];

fn field_name(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Collects field errors so one answer names every bad field.
struct Checker<'a> {
    body: &'a Map<String, Value>,
    errors: BTreeMap<String, String>,
}

impl<'a> Checker<'a> {
    fn fail(&mut self, field: &str, message: &str) {
        self.errors
            .entry(field.to_owned())
            .or_insert_with(|| message.to_owned());
    }

    fn string_in(
        &mut self,
        object: &'a Map<String, Value>,
        path: &str,
        key: &str,
        required: bool,
    ) -> Option<&'a str> {
        let field = field_name(path, key);
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

    /// An optional flag: a JSON boolean or `"true"`/`"false"`.
    fn boolean(&mut self, key: &str) {
        match self.body.get(key) {
            None | Some(Value::Null) => {}
            Some(value) if lenient::boolean(value).is_some() => {}
            Some(_) => self.fail(key, "Must be a boolean."),
        }
    }

    /// An optional whole number of at least `min` (a JSON integer or a decimal string). finX
    /// publishes no upper limits: more history than a bank has simply yields what it has.
    fn whole_number(&mut self, key: &str, min: u64) -> Option<u64> {
        let value = self.body.get(key).filter(|value| !value.is_null())?;
        let number = lenient::whole_number(value).filter(|n| *n >= min);
        if number.is_none() {
            self.fail(key, &format!("Must be a whole number of at least {min}."));
        }
        number
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

    /// `readout: ["ACCOUNTS", "TRANSACTIONS"]` (a list, possibly empty).
    fn readout(&mut self) {
        let items = self.string_list("readout", false);
        if items.iter().any(|item| !READOUTS.contains(&item.as_str())) {
            self.fail("readout", "Each entry must be ACCOUNTS or TRANSACTIONS.");
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
        let field = field_name(path, key);
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

    /// An optional `{"iban"}` object (the debtor).
    fn iban_holder(&mut self, object: &'a Map<String, Value>, path: &str) -> Option<String> {
        let debtor = self.object(object, path, "debtor", false)?;
        self.string_in(debtor, &field_name(path, "debtor"), "iban", false)
            .map(str::to_owned)
    }

    /// `payment{creditor{iban,name}, amount{value,currency}, purpose}` plus the optional
    /// `debtor{iban}`, `end_to_end_reference` and `sepa_purpose_code`, inside `payment` (as
    /// finX's examples send them) or beside it; errors keyed by dotted path.
    fn payment(&mut self) -> Option<Payment> {
        let payment = self.object(self.body, "", "payment", true)?;
        let mut creditor = (None, None);
        if let Some(object) = self.object(payment, "payment", "creditor", true) {
            creditor = (
                self.string_in(object, "payment.creditor", "iban", true),
                self.string_in(object, "payment.creditor", "name", true),
            );
        }
        let mut amount = (None, None);
        if let Some(object) = self.object(payment, "payment", "amount", true) {
            amount.0 = match object.get("value") {
                None | Some(Value::Null) => {
                    self.fail("payment.amount.value", "This field is required.");
                    None
                }
                Some(value) => {
                    let positive = lenient::number(value).filter(|v| *v > 0.0);
                    if positive.is_none() {
                        self.fail("payment.amount.value", "Must be a positive number.");
                    }
                    positive
                }
            };
            amount.1 = self
                .string_in(object, "payment.amount", "currency", true)
                .filter(|currency| {
                    let iso =
                        currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase());
                    if !iso {
                        self.fail("payment.amount.currency", "Must be an ISO 4217 code.");
                    }
                    iso
                });
        }
        let purpose = self.string_in(payment, "payment", "purpose", true);
        let debtor_iban = self.iban_holder(payment, "payment");
        let beside_debtor_iban = self.iban_holder(self.body, "");
        let end_to_end_reference =
            self.string_in(payment, "payment", "end_to_end_reference", false);
        let beside_reference = self.string("end_to_end_reference", false);
        let sepa_purpose_code = self
            .string_in(payment, "payment", "sepa_purpose_code", false)
            .map(str::to_owned);
        let (
            (Some(creditor_iban), Some(creditor_name)),
            (Some(value), Some(currency)),
            Some(purpose),
        ) = (creditor, amount, purpose)
        else {
            return None;
        };
        Some(Payment {
            creditor_iban: creditor_iban.to_owned(),
            creditor_name: creditor_name.to_owned(),
            value,
            currency: currency.to_owned(),
            purpose: purpose.to_owned(),
            debtor_iban: debtor_iban.or(beside_debtor_iban),
            end_to_end_reference: end_to_end_reference.or(beside_reference).map(str::to_owned),
            sepa_purpose_code,
        })
    }
}

/// A validated payment order.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Payment {
    pub creditor_iban: String,
    pub creditor_name: String,
    pub value: f64,
    pub currency: String,
    pub purpose: String,
    /// The account to pay from, when the client named it.
    pub debtor_iban: Option<String>,
    pub end_to_end_reference: Option<String>,
    pub sepa_purpose_code: Option<String>,
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
    /// Months a report covers (default 12).
    pub reporting_period: u64,
    pub payment: Option<Payment>,
}

/// Validates an initiation body for `kind`, naming every bad field. Fields the simulator does
/// not know are ignored, as a lenient server would.
pub(crate) fn validate(kind: FlowKind, body: &Value) -> Result<FlowRequest, FinxError> {
    let Value::Object(body) = body else {
        return Err(FinxError::bad_request("request body must be a JSON object"));
    };
    let mut check = Checker {
        body,
        errors: BTreeMap::new(),
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
    for flag in ["allow_multi_selection", "save_secrets"] {
        check.boolean(flag);
    }
    check.readout();
    for optional in ["tracking_id", "provider_id"] {
        check.string(optional, false);
    }
    check.string_list("account_types", false);
    check.whole_number("sync_period", 1);
    let mut account_hints = check.account_hints();
    let mut reporting_period = 12;
    let mut name = None;
    let mut payment = None;
    match kind {
        FlowKind::OnetimeIncomeReport => {
            if let Some(months) = check.whole_number("reporting_period", 4) {
                reporting_period = months;
                if body.get("sync_period").is_some_and(|v| !v.is_null()) {
                    check.fail("reporting_period", "Cannot be combined with sync_period.");
                }
            }
        }
        FlowKind::OnetimeRiskReport | FlowKind::OngoingRiskReport => {
            if let Some(months) = check.whole_number("reporting_period", 1) {
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
            id: new_flow_id(),
            kind,
            client_id: client_id.to_owned(),
            request,
            widget_token: random_string(32),
            vanishes_at: kind
                .is_onetime()
                .then(|| now.saturating_add(onetime_ttl_secs)),
            outcome: None,
            ended_at: None,
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
                flow.ended_at.get_or_insert(now);
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
            flow.ended_at = Some(now);
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
        redirect(&flow, outcome, code.as_deref())
    }
}

/// The return address of an ended flow (None when the flow has no redirect_uri).
///
/// Parameters are appended in the order finX's guides show: `code` first (finX's own client
/// scripts read it as the first parameter), then `state`, `success`, and on success `flow_id`
/// and `abort=false`; a cancel carries `success=false&cancel=true&abort=true` (both spellings
/// of the flag, from the older and the newer guide) and no code; a failure `abort=false`.
fn redirect(flow: &Flow, outcome: Outcome, code: Option<&str>) -> Result<Option<Url>, FinxError> {
    let Some(redirect_uri) = &flow.request.redirect_uri else {
        return Ok(None);
    };
    let mut url = Url::parse(redirect_uri)
        .map_err(|_| FinxError::bad_request("the flow's redirect_uri is not a URL"))?;
    {
        let mut query = url.query_pairs_mut();
        if let Some(code) = code {
            query.append_pair("code", code);
        }
        if let Some(state) = &flow.request.state {
            query.append_pair("state", state);
        }
        match outcome {
            Outcome::Success => query
                .append_pair("success", "true")
                .append_pair("flow_id", &flow.id)
                .append_pair("abort", "false"),
            Outcome::Abort => query
                .append_pair("success", "false")
                .append_pair("cancel", "true")
                .append_pair("abort", "true")
                .append_pair("flow_id", &flow.id),
            Outcome::Error => query
                .append_pair("success", "false")
                .append_pair("flow_id", &flow.id)
                .append_pair("abort", "false"),
        };
    }
    Ok(Some(url))
}

/// A random flow id shaped like finX's (a version-4 UUID), for clients that store it as one.
fn new_flow_id() -> String {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}
