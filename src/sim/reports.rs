//! The reports of finX's analytics products (income report, risk report, account
//! verification), computed from an owner's generated data and shaped like finX's published
//! examples of them.
//!
//! Amounts in summaries are positive (an expense of 800 counts as 800), summaries are over
//! single transactions (`count`, `total`, `low`, `high`, `average`), and a report covers the
//! `period` months up to the data's "today", or the history there is when that is shorter.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::data::{base_date, category, round_cents, OwnerData, Transaction};
use super::flows::Flow;

/// Expense categories that recur on a schedule: rent, utilities, subscriptions, insurance.
const REGULAR_EXPENSES: [u32; 4] = [22, 23, 31, 4];
/// The income category that recurs on a schedule: salary.
const SALARY: u32 = 11;

/// `GET /rest/income-reports/{flow_id}`.
pub(crate) fn income_report(data: &OwnerData, flow: &Flow) -> Value {
    let months = flow.request.reporting_period;
    let covered = covered(data, months);
    let income: Vec<&Transaction> = covered.iter().copied().filter(|tx| is_income(tx)).collect();
    let streams = by_category(&income);
    let primary = streams
        .values()
        .max_by(|a, b| total(a).total_cmp(&total(b)))
        .map(|txs| {
            let mut primary = stream(txs);
            primary["payment_partner"] = json!(most_frequent_name(txs));
            primary
        });
    let expense_groups = |regular: bool| -> Vec<Value> {
        let expenses: Vec<&Transaction> = covered
            .iter()
            .copied()
            .filter(|tx| !is_income(tx) && is_regular_expense(tx) == regular)
            .collect();
        by_category(&expenses)
            .values()
            .map(|txs| json!({ "summary": summary(txs), "streams": [stream(txs)] }))
            .collect()
    };
    json!({
        "id": flow.id,
        "period": months,
        "income": {
            "summary": summary(&income),
            "streams": streams.values().map(|txs| stream(txs)).collect::<Vec<_>>(),
            "primary": primary,
        },
        "regular_expenses": expense_groups(true),
        "variable_expenses": expense_groups(false),
        "disposable_income": monthly_rest(&covered, false),
        "discretionary_income": monthly_rest(&covered, true),
    })
}

/// `GET /rest/account-verifications/{flow_id}`: the claimed name against the holder of the
/// account named at initiation (else the first one).
pub(crate) fn account_verification(data: &OwnerData, flow: &Flow) -> Value {
    let provided_iban = flow.request.account_hints.first();
    let account = data
        .accounts()
        .iter()
        .find(|account| provided_iban.is_some_and(|iban| account["iban"] == iban.as_str()))
        .or_else(|| data.accounts().first());
    let provided_name = flow.request.name.as_deref().unwrap_or_default();
    json!({
        "id": flow.id,
        "provided": { "name": provided_name, "iban": provided_iban },
        "matched": account.map(|account| matched(account, provided_name)),
        "account": account.map(|account| json!({
            "name": account["name"],
            "type": account["type"],
            "owners": [account["owner"]],
            "iban": account["iban"],
            "currency": account["currency"],
        })),
    })
}

/// `GET /rest/risk-reports/{flow_id}`: finX's published parts (accounts, income) plus the
/// simulator's own score, class and insights in place of finX's risk indicators.
pub(crate) fn risk_report(data: &OwnerData, flow: &Flow) -> Value {
    let months = flow.request.reporting_period;
    let covered = covered(data, months);
    let score = data.risk_score();
    let accounts: Vec<Value> = data
        .accounts()
        .iter()
        .enumerate()
        .map(|(index, account)| {
            let balance = account["balance"]["balance"].as_f64().unwrap_or_default();
            let last_transaction_on = data
                .transactions()
                .iter()
                .find(|tx| account["account_id"] == tx.account_id.as_str())
                .map(|tx| tx.booking_date.clone());
            let mut entry = json!({
                "name": account["name"],
                "type": account["type"],
                "owners": [account["owner"]],
                "iban": account["iban"],
                "currency": account["currency"],
                "is_jointly_managed": false,
                "is_main_account": index == 0,
                "last_transaction_on": last_transaction_on,
                "balance": {
                    "days_in_overdraft": if balance < 0.0 { score % 17 } else { 0 },
                    "average": { "one_month": balance, "three_months": balance, "six_months": balance },
                },
            });
            if let Some(name) = &flow.request.name {
                entry["verification_result"] = json!({
                    "provided": { "name": name },
                    "matched": matched(account, name),
                });
            }
            entry
        })
        .collect();
    let income: Vec<&Transaction> = covered.iter().copied().filter(|tx| is_income(tx)).collect();
    let part = |regular: bool| {
        let txs: Vec<&Transaction> = income
            .iter()
            .copied()
            .filter(|tx| (tx.category.id == SALARY) == regular)
            .collect();
        json!({
            "summary": summary(&txs),
            "streams": by_category(&txs).values().map(|txs| stream(txs)).collect::<Vec<_>>(),
        })
    };
    let risk_class = match score {
        0..=333 => "high",
        334..=666 => "medium",
        _ => "low",
    };
    json!({
        "id": flow.id,
        "period": months,
        "accounts": accounts,
        "income": { "summary": summary(&income), "regular": part(true), "variable": part(false) },
        "score": score,
        "risk_class": risk_class,
        "insights": [
            { "name": "regular_income", "value": true },
            { "name": "returned_debits", "value": score % 3 },
            { "name": "overdraft_days", "value": score % 17 },
        ],
    })
}

/// Deterministic and scriptable: a claimed name containing "mismatch" never matches.
fn matched(account: &Value, provided_name: &str) -> Value {
    let affinity = if provided_name.to_lowercase().contains("mismatch") {
        "LOW"
    } else {
        "VERY_HIGH"
    };
    json!({ "name": account["owner"], "affinity": affinity })
}

fn is_income(tx: &Transaction) -> bool {
    tx.amount >= 0.0
}

fn is_regular_expense(tx: &Transaction) -> bool {
    REGULAR_EXPENSES.contains(&tx.category.id)
}

/// The transactions of the last `months` calendar months up to the data's "today".
fn covered(data: &OwnerData, months: u64) -> Vec<&Transaction> {
    let today = base_date();
    let first = i64::from(today.year()) * 12 + i64::from(u8::from(today.month()))
        - 1
        - i64::try_from(months.saturating_sub(1)).unwrap_or(i64::MAX / 2);
    let since = format!(
        "{:04}-{:02}",
        first.div_euclid(12),
        first.rem_euclid(12) + 1
    );
    data.transactions()
        .iter()
        .filter(|tx| tx.booking_date.as_str() >= since.as_str())
        .collect()
}

fn by_category<'t>(transactions: &[&'t Transaction]) -> BTreeMap<u32, Vec<&'t Transaction>> {
    let mut groups: BTreeMap<u32, Vec<&Transaction>> = BTreeMap::new();
    for tx in transactions {
        groups.entry(tx.category.id).or_default().push(tx);
    }
    groups
}

fn total(transactions: &[&Transaction]) -> f64 {
    transactions.iter().map(|tx| tx.amount.abs()).sum()
}

/// `count`, `total`, `low`, `high`, `average` of the transactions' amounts.
fn summary(transactions: &[&Transaction]) -> Value {
    let amounts = transactions.iter().map(|tx| tx.amount.abs());
    let count = transactions.len();
    let total = total(transactions);
    json!({
        "count": count,
        "total": round_cents(total),
        "low": round_cents(amounts.clone().reduce(f64::min).unwrap_or_default()),
        "high": round_cents(amounts.reduce(f64::max).unwrap_or_default()),
        "average": if count == 0 { 0.0 } else { round_cents(total / count as f64) },
    })
}

/// One category's transactions: their summary, the category, first and last booking.
fn stream(transactions: &[&Transaction]) -> Value {
    let mut stream = summary(transactions);
    let dates = transactions.iter().map(|tx| tx.booking_date.as_str());
    stream["category"] = transactions
        .first()
        .map(|tx| json!({ "id": tx.category.id, "name": category(tx.category.id).name }))
        .unwrap_or(Value::Null);
    stream["first_booked_on"] = json!(dates.clone().min());
    stream["last_booked_on"] = json!(dates.max());
    stream
}

fn most_frequent_name(transactions: &[&Transaction]) -> Option<&'static str> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for tx in transactions {
        *counts.entry(tx.name).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, count)| *count)
        .map(|(name, _)| name)
}

/// What is left of each month's income after its regular expenses (and, for discretionary
/// income, its variable ones too): `total`, `low`, `high`, `average` per month, and `ratio`
/// of the total to the income.
fn monthly_rest(transactions: &[&Transaction], discretionary: bool) -> Value {
    let months: BTreeSet<&str> = transactions
        .iter()
        .filter_map(|tx| tx.booking_date.get(..7))
        .collect();
    let rests: Vec<f64> = months
        .iter()
        .map(|month| {
            transactions
                .iter()
                .filter(|tx| tx.booking_date.starts_with(month))
                .filter(|tx| is_income(tx) || discretionary || is_regular_expense(tx))
                .map(|tx| tx.amount)
                .sum()
        })
        .collect();
    let total: f64 = rests.iter().sum();
    let income: f64 = transactions
        .iter()
        .filter(|tx| is_income(tx))
        .map(|tx| tx.amount)
        .sum();
    json!({
        "total": round_cents(total),
        "low": round_cents(rests.iter().copied().reduce(f64::min).unwrap_or_default()),
        "high": round_cents(rests.iter().copied().reduce(f64::max).unwrap_or_default()),
        "average": if rests.is_empty() { 0.0 } else { round_cents(total / rests.len() as f64) },
        "ratio": if income > 0.0 { (total / income * 100.0).round() / 100.0 } else { 0.0 },
    })
}
