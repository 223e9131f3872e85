//! Deterministic banking data for one data owner (an ongoing `user_id` or a one-time flow).
//!
//! Everything is derived from a hash of the owner key, so the same user always sees the same
//! accounts, transactions and contracts across runs. The `GET /rest/accounts` body is serialized
//! once, when the owner is first seen, because it is the endpoint benchmarks hammer.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use time::{Date, Duration, Month};

const BANK_CODE: &str = "90090042";
const BANK_NAME: &str = "Simulated Bank";
const BIC: &str = "SIMBDEMMXXX";
/// How far transaction history reaches back.
const HISTORY_DAYS: i64 = 180;

/// The fixed "today" of all generated data; keeps data identical whatever the clock says.
pub(crate) fn base_date() -> Date {
    Date::from_calendar_date(2025, Month::June, 30).unwrap_or(Date::MIN)
}

/// A category as finX nests it in transactions.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Category {
    pub id: u32,
    pub name: &'static str,
    pub parent_id: Option<u32>,
}

/// The client-level category tree (`GET /category-tree`); leaves point at their parent.
pub(crate) const CATEGORIES: &[Category] = &[
    Category {
        id: 1,
        name: "Income",
        parent_id: None,
    },
    Category {
        id: 11,
        name: "Salary",
        parent_id: Some(1),
    },
    Category {
        id: 2,
        name: "Living",
        parent_id: None,
    },
    Category {
        id: 21,
        name: "Groceries",
        parent_id: Some(2),
    },
    Category {
        id: 22,
        name: "Rent",
        parent_id: Some(2),
    },
    Category {
        id: 23,
        name: "Utilities",
        parent_id: Some(2),
    },
    Category {
        id: 3,
        name: "Leisure",
        parent_id: None,
    },
    Category {
        id: 31,
        name: "Subscriptions",
        parent_id: Some(3),
    },
    Category {
        id: 32,
        name: "Shopping",
        parent_id: Some(3),
    },
    Category {
        id: 33,
        name: "Travel",
        parent_id: Some(3),
    },
    Category {
        id: 4,
        name: "Insurance",
        parent_id: None,
    },
    Category {
        id: 5,
        name: "Transfers",
        parent_id: None,
    },
    Category {
        id: 9,
        name: "Uncategorized",
        parent_id: None,
    },
];

/// Finds a category by id; unknown ids map to "Uncategorized".
pub(crate) fn category(id: u32) -> Category {
    CATEGORIES
        .iter()
        .copied()
        .find(|c| c.id == id)
        .unwrap_or(Category {
            id: 9,
            name: "Uncategorized",
            parent_id: None,
        })
}

/// Keyword rules behind `POST /rpc/categorize` and the generated transactions.
const COUNTERPARTIES: &[(&str, &str, u32)] = &[
    ("ACME GmbH", "Salary", 11),
    ("REWE Markt", "Groceries card payment", 21),
    ("Vermieter Schmidt", "Rent", 22),
    ("Stadtwerke", "Electricity and water", 23),
    ("Netflix", "Subscription", 31),
    ("Amazon", "Order", 32),
    ("Deutsche Bahn", "Ticket", 33),
    ("Allianz Versicherung", "Insurance premium", 4),
];

/// Categorizes free text the way `POST /rpc/categorize` does: by counterparty keyword.
pub(crate) fn categorize(text: &str, amount: Option<f64>) -> Category {
    let lower = text.to_lowercase();
    let keyword_hit = COUNTERPARTIES.iter().find(|(name, purpose, _)| {
        let first_word = |s: &str| s.split_whitespace().next().unwrap_or("").to_lowercase();
        lower.contains(&first_word(name)) || lower.contains(&first_word(purpose))
    });
    match keyword_hit {
        Some((_, _, id)) => category(*id),
        None if amount.is_some_and(|a| a > 0.0) => category(1),
        None => category(9),
    }
}

/// One generated transaction.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Transaction {
    pub transaction_id: String,
    pub account_id: String,
    pub amount: f64,
    pub currency: &'static str,
    pub booking_date: String,
    pub value_date: String,
    pub name: &'static str,
    pub purpose: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub booked: bool,
    pub category: Category,
}

/// Everything an owner can read, generated once.
#[derive(Debug)]
pub(crate) struct OwnerData {
    seed: u64,
    /// The serialized `GET /rest/accounts` answer.
    pub accounts_json: Bytes,
    accounts: Vec<Value>,
    details: OnceLock<Details>,
    /// Contracts removed with `DELETE /rest/contracts/{id}`.
    deleted_contracts: Mutex<HashSet<String>>,
}

/// The heavier data, generated on first use so seeding thousands of users stays fast.
#[derive(Debug)]
struct Details {
    /// Newest first.
    transactions: Vec<Transaction>,
    securities: Vec<Value>,
    contracts: Vec<Value>,
}

/// FNV-1a: a stable hash (std's hasher is randomly keyed per process).
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A German IBAN with correct check digits for the simulated bank code.
fn german_iban(account_number: u64) -> String {
    let bban = format!("{BANK_CODE}{account_number:010}");
    // "DE00" moved to the end, letters as numbers (D=13, E=14): ISO 13616 mod-97 check.
    let rearranged = format!("{bban}131400");
    let remainder = rearranged
        .bytes()
        .fold(0u64, |acc, digit| (acc * 10 + u64::from(digit - b'0')) % 97);
    format!("DE{:02}{bban}", 98 - remainder)
}

pub(crate) fn round_cents(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

impl OwnerData {
    /// Generates the data of `owner_key` (`user:<id>` or `flow:<id>`).
    pub(crate) fn generate(owner_key: &str) -> Self {
        let seed = stable_hash(owner_key);
        let mut rng = StdRng::seed_from_u64(seed);
        let account_count = 1 + (seed % 3) as usize;
        let kinds = ["Giro account", "Savings account", "Depot"];
        let owner_name = format!("Sim User {:04}", seed % 10_000);
        let accounts: Vec<Value> = kinds[..account_count]
            .iter()
            .enumerate()
            .map(|(index, kind)| {
                let account_number = rng.random_range(1_000_000_000u64..9_999_999_999);
                let balance = round_cents(match index {
                    0 => rng.random_range(-500.0..8_000.0),
                    1 => rng.random_range(1_000.0..40_000.0),
                    _ => rng.random_range(5_000.0..120_000.0),
                });
                let credit_line = if index == 0 { 1_000.0 } else { 0.0 };
                json!({
                    "account_id": format!("A{:06}.{}", seed % 1_000_000, index + 1),
                    "bank_id": "B1.1",
                    "bank_name": BANK_NAME,
                    "bank_code": BANK_CODE,
                    "bic": BIC,
                    "iban": german_iban(account_number),
                    "account_number": account_number.to_string(),
                    "owner": owner_name,
                    "name": kind,
                    "type": kind,
                    "currency": "EUR",
                    "balance": {
                        "balance": balance,
                        "available_amount": round_cents(balance + credit_line),
                        "credit_line": credit_line,
                        "currency": "EUR",
                        "balance_date": base_date().to_string(),
                    },
                    "status": { "sync_status": "ok", "success_timestamp": format!("{}T06:00:00Z", base_date()) },
                })
            })
            .collect();
        let accounts_json = Bytes::from(json!({ "accounts": accounts }).to_string());
        Self {
            seed,
            accounts_json,
            accounts,
            details: OnceLock::new(),
            deleted_contracts: Mutex::new(HashSet::new()),
        }
    }

    /// All accounts.
    pub(crate) fn accounts(&self) -> &[Value] {
        &self.accounts
    }

    /// One account by id.
    pub(crate) fn account(&self, account_id: &str) -> Option<&Value> {
        self.accounts
            .iter()
            .find(|account| account["account_id"] == account_id)
    }

    /// The account ids, in order.
    pub(crate) fn account_ids(&self) -> Vec<&str> {
        self.accounts
            .iter()
            .filter_map(|account| account["account_id"].as_str())
            .collect()
    }

    fn details(&self) -> &Details {
        self.details.get_or_init(|| self.generate_details())
    }

    /// All transactions, newest first.
    pub(crate) fn transactions(&self) -> &[Transaction] {
        &self.details().transactions
    }

    /// Securities held in depot accounts.
    pub(crate) fn securities(&self) -> &[Value] {
        &self.details().securities
    }

    /// Contracts not deleted yet.
    pub(crate) fn contracts(&self) -> Vec<Value> {
        let deleted = self
            .deleted_contracts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.details()
            .contracts
            .iter()
            .filter(|contract| {
                contract["id"]
                    .as_str()
                    .is_some_and(|id| !deleted.contains(id))
            })
            .cloned()
            .collect()
    }

    /// Deletes a contract; false when there is no such (undeleted) contract.
    pub(crate) fn delete_contract(&self, contract_id: &str) -> bool {
        let exists = self
            .details()
            .contracts
            .iter()
            .any(|contract| contract["id"] == contract_id);
        exists
            && self
                .deleted_contracts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(contract_id.to_owned())
    }

    fn generate_details(&self) -> Details {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x5eed);
        let today = base_date();
        let day = |days_ago: i64| {
            today
                .checked_sub(Duration::days(days_ago))
                .unwrap_or(today)
                .to_string()
        };
        let mut transactions = Vec::new();
        let account_ids: Vec<String> = self.account_ids().into_iter().map(str::to_owned).collect();
        for (index, account_id) in account_ids.iter().enumerate().take(2) {
            let count = if index == 0 {
                rng.random_range(60..=120)
            } else {
                rng.random_range(6..=12)
            };
            for number in 0..count {
                let days_ago = rng.random_range(0..HISTORY_DAYS);
                let (name, purpose, category_id) = if index == 0 {
                    COUNTERPARTIES[rng.random_range(0..COUNTERPARTIES.len())]
                } else {
                    ("Own account", "Savings transfer", 5)
                };
                let amount = match category_id {
                    11 => rng.random_range(2_800.0..4_200.0),
                    22 => -rng.random_range(700.0..1_400.0),
                    5 => rng.random_range(50.0..500.0),
                    _ => -rng.random_range(3.0..180.0),
                };
                transactions.push(Transaction {
                    transaction_id: format!("T{}.{}", account_id, number + 1),
                    account_id: account_id.clone(),
                    amount: round_cents(amount),
                    currency: "EUR",
                    booking_date: day(days_ago),
                    value_date: day(days_ago),
                    name,
                    purpose,
                    kind: if amount > 0.0 {
                        "Transfer"
                    } else {
                        "Direct debit"
                    },
                    booked: true,
                    category: category(category_id),
                });
            }
        }
        transactions.sort_by(|a, b| {
            b.booking_date
                .cmp(&a.booking_date)
                .then_with(|| a.transaction_id.cmp(&b.transaction_id))
        });

        let securities = match account_ids.get(2) {
            Some(depot) => (1..=rng.random_range(2..=5))
                .map(|n| {
                    let quantity = f64::from(rng.random_range(1u32..200));
                    let price = round_cents(rng.random_range(10.0..400.0));
                    json!({
                        "security_id": format!("S{depot}.{n}"),
                        "account_id": depot,
                        "name": format!("Sim Index Fund {n}"),
                        "isin": format!("DE000SIM{:04}", (self.seed % 1000) * 10 + n),
                        "quantity": quantity,
                        "price": price,
                        "amount": round_cents(quantity * price),
                        "currency": "EUR",
                        "trade_timestamp": format!("{}T12:00:00Z", day(n as i64 * 7)),
                    })
                })
                .collect(),
            None => Vec::new(),
        };

        let giro = account_ids.first().cloned().unwrap_or_default();
        let contracts = COUNTERPARTIES
            .iter()
            .filter(|(_, _, category_id)| matches!(category_id, 22 | 23 | 31 | 4))
            .enumerate()
            .map(|(n, (name, purpose, category_id))| {
                json!({
                    "id": format!("C{giro}.{}", n + 1),
                    "account_id": giro,
                    "name": name,
                    "purpose": purpose,
                    "category": category(*category_id),
                    "amount": -round_cents(rng.random_range(9.0..1_200.0)),
                    "currency": "EUR",
                    "frequency": "monthly",
                    "next_due_date": day(-((n as i64 % 28) + 1)),
                    "active": true,
                })
            })
            .collect();
        Details {
            transactions,
            securities,
            contracts,
        }
    }

    /// Counterparties of the transactions (optionally of one account), busiest first.
    /// Their ids are [`payment_partner_id`]s.
    pub(crate) fn payment_partners(&self, account_id: Option<&str>) -> Vec<Value> {
        let mut partners: BTreeMap<&str, (u64, f64, Vec<&str>)> = BTreeMap::new();
        for tx in self.scoped(account_id) {
            let entry = partners.entry(tx.name).or_default();
            entry.0 += 1;
            entry.1 += tx.amount;
            if !entry.2.contains(&tx.account_id.as_str()) {
                entry.2.push(&tx.account_id);
            }
        }
        let mut list: Vec<Value> = partners
            .into_iter()
            .map(|(name, (count, total, accounts))| {
                json!({
                    "id": payment_partner_id(name),
                    "name": name,
                    "iban": german_iban(stable_hash(name) % 9_000_000_000 + 1_000_000_000),
                    "transaction_count": count,
                    "total_amount": round_cents(total),
                    "currency": "EUR",
                    "account_ids": accounts,
                })
            })
            .collect();
        list.sort_by_key(|partner| std::cmp::Reverse(partner["transaction_count"].as_u64()));
        list
    }

    /// Spending and income per category (optionally of one account).
    pub(crate) fn categories(&self, account_id: Option<&str>) -> Vec<Value> {
        let mut totals: BTreeMap<u32, (u64, f64)> = BTreeMap::new();
        for tx in self.scoped(account_id) {
            let entry = totals.entry(tx.category.id).or_default();
            entry.0 += 1;
            entry.1 += tx.amount;
        }
        totals
            .into_iter()
            .map(|(id, (count, total))| {
                let cat = category(id);
                json!({
                    "id": cat.id,
                    "name": cat.name,
                    "parent_id": cat.parent_id,
                    "transaction_count": count,
                    "amount": round_cents(total),
                    "currency": "EUR",
                })
            })
            .collect()
    }

    /// Income, expenses and net per period, over all selected accounts (`timeline`) and for
    /// each selected account on its own (`accounts`, one entry per account even without
    /// transactions), as `(timeline, accounts)`.
    pub(crate) fn timeline(&self, query: &TimelineQuery<'_>) -> (Vec<Value>, Vec<Value>) {
        let selected: Vec<&Transaction> = self
            .transactions()
            .iter()
            .filter(|tx| query.covers(tx))
            .collect();
        let totals = periods(selected.iter().copied(), query.frequency);
        let accounts =
            self.accounts
                .iter()
                .filter(|account| {
                    query.accounts.as_ref().is_none_or(|ids| {
                        ids.iter()
                            .any(|id| account["account_id"].as_str() == Some(id.as_str()))
                    })
                })
                .map(|account| {
                    let own = selected.iter().copied().filter(|tx| {
                        account["account_id"].as_str() == Some(tx.account_id.as_str())
                    });
                    json!({
                        "account_id": account["account_id"],
                        "name": account["name"],
                        "iban": account["iban"],
                        "currency": account["currency"],
                        "timeline": periods(own, query.frequency),
                    })
                })
                .collect();
        (totals, accounts)
    }

    /// A risk score in 0..=1000 derived from the data.
    pub(crate) fn risk_score(&self) -> u64 {
        self.seed % 1001
    }

    fn scoped<'a>(&'a self, account_id: Option<&'a str>) -> impl Iterator<Item = &'a Transaction> {
        self.transactions()
            .iter()
            .filter(move |tx| account_id.is_none_or(|id| tx.account_id == id))
    }
}

/// The sampling of a timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frequency {
    Daily,
    Weekly,
    Monthly,
    Quarterly,
    Yearly,
}

impl Frequency {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "daily" => Some(Frequency::Daily),
            "weekly" => Some(Frequency::Weekly),
            "monthly" => Some(Frequency::Monthly),
            "quarterly" => Some(Frequency::Quarterly),
            "yearly" => Some(Frequency::Yearly),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Frequency::Daily => "daily",
            Frequency::Weekly => "weekly",
            Frequency::Monthly => "monthly",
            Frequency::Quarterly => "quarterly",
            Frequency::Yearly => "yearly",
        }
    }

    /// The period an ISO date falls in: `2025-06-30`, `2025-W27`, `2025-06`, `2025-Q2`, `2025`.
    fn period_of(self, iso_date: &str) -> String {
        let year = iso_date.get(..4).unwrap_or_default();
        match self {
            Frequency::Daily => iso_date.to_owned(),
            Frequency::Weekly => week_of(iso_date),
            Frequency::Monthly => iso_date.get(..7).unwrap_or_default().to_owned(),
            Frequency::Quarterly => {
                let month: u32 = iso_date.get(5..7).and_then(|m| m.parse().ok()).unwrap_or(1);
                format!("{year}-Q{}", (month.saturating_sub(1)) / 3 + 1)
            }
            Frequency::Yearly => year.to_owned(),
        }
    }
}

/// Which transactions a timeline covers (every filter is optional).
#[derive(Debug)]
pub(crate) struct TimelineQuery<'a> {
    pub frequency: Frequency,
    pub since: Option<&'a str>,
    pub until: Option<&'a str>,
    pub accounts: Option<Vec<String>>,
    pub categories: Option<Vec<u32>>,
    pub payment_partners: Option<Vec<String>>,
}

impl TimelineQuery<'_> {
    fn covers(&self, tx: &Transaction) -> bool {
        self.accounts
            .as_ref()
            .is_none_or(|ids| ids.contains(&tx.account_id))
            && self
                .categories
                .as_ref()
                .is_none_or(|ids| ids.contains(&tx.category.id))
            && self
                .payment_partners
                .as_ref()
                .is_none_or(|ids| ids.contains(&payment_partner_id(tx.name)))
            && in_date_range(&tx.booking_date, self.since, self.until)
    }
}

/// Income, expenses and net per period of `transactions`, oldest period first.
fn periods<'t>(
    transactions: impl Iterator<Item = &'t Transaction>,
    frequency: Frequency,
) -> Vec<Value> {
    let mut periods: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for tx in transactions {
        let entry = periods
            .entry(frequency.period_of(&tx.booking_date))
            .or_default();
        if tx.amount >= 0.0 {
            entry.0 += tx.amount;
        } else {
            entry.1 += tx.amount;
        }
    }
    periods
        .into_iter()
        .map(|(period, (income, expenses))| {
            json!({
                "period": period,
                "income": round_cents(income),
                "expenses": round_cents(expenses),
                "net": round_cents(income + expenses),
                "currency": "EUR",
            })
        })
        .collect()
}

/// The id of the payment partner called `name`.
pub(crate) fn payment_partner_id(name: &str) -> String {
    format!("P{:08x}", stable_hash(name) as u32)
}

/// `YYYY-Www` (ISO week) of an ISO date string; unparseable input is kept as is.
fn week_of(iso_date: &str) -> String {
    let parts: Vec<&str> = iso_date.split('-').collect();
    let parsed = match parts.as_slice() {
        [y, m, d] => (|| {
            let month = Month::try_from(m.parse::<u8>().ok()?).ok()?;
            Date::from_calendar_date(y.parse().ok()?, month, d.parse().ok()?).ok()
        })(),
        _ => None,
    };
    match parsed {
        Some(date) => {
            let (year, week, _) = date.to_iso_week_date();
            format!("{year}-W{week:02}")
        }
        None => iso_date.to_owned(),
    }
}

/// A Unix time as an ISO 8601 UTC timestamp (`2025-06-30T12:00:00Z`).
pub(crate) fn iso_timestamp(unix_seconds: i64) -> String {
    let time = time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        time.year(),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second()
    )
}

/// Whether `text` is a date filter: `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
pub(crate) fn is_date_filter(text: &str) -> bool {
    let bytes = text.as_bytes();
    matches!(bytes.len(), 4 | 7 | 10)
        && bytes.iter().enumerate().all(|(index, byte)| match index {
            4 | 7 => *byte == b'-',
            _ => byte.is_ascii_digit(),
        })
}

/// Whether the ISO date `date` lies within `since..=until`, both inclusive and either as
/// coarse as a year or a month (`until=2025-05` includes 31 May).
pub(crate) fn in_date_range(date: &str, since: Option<&str>, until: Option<&str>) -> bool {
    let prefix = |bound: &str| date.get(..bound.len()).unwrap_or(date);
    since.is_none_or(|since| prefix(since) >= since)
        && until.is_none_or(|until| prefix(until) <= until)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_owner_same_data() {
        let a = OwnerData::generate("user:alice");
        let b = OwnerData::generate("user:alice");
        assert_eq!(a.accounts_json, b.accounts_json);
        assert_eq!(a.transactions().len(), b.transactions().len());
    }

    #[test]
    fn date_filters_may_be_years_months_or_days() {
        for ok in ["2025", "2025-06", "2025-06-30"] {
            assert!(is_date_filter(ok), "{ok}");
        }
        for bad in ["25", "2025-6", "2025/06/30", "yesterday", "2025-06-30T00"] {
            assert!(!is_date_filter(bad), "{bad}");
        }
        assert!(in_date_range(
            "2025-05-31",
            Some("2025-05"),
            Some("2025-05")
        ));
        assert!(in_date_range(
            "2025-05-31",
            Some("2025"),
            Some("2025-05-31")
        ));
        assert!(!in_date_range("2025-06-01", None, Some("2025-05")));
        assert!(!in_date_range("2024-12-31", Some("2025"), None));
    }

    #[test]
    fn timestamps_are_iso_utc() {
        assert_eq!(iso_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_timestamp(1_751_284_800), "2025-06-30T12:00:00Z");
    }

    #[test]
    fn periods_of_every_frequency() {
        let date = "2025-05-31";
        let periods: Vec<String> = [
            Frequency::Daily,
            Frequency::Weekly,
            Frequency::Monthly,
            Frequency::Quarterly,
            Frequency::Yearly,
        ]
        .iter()
        .map(|f| f.period_of(date))
        .collect();
        assert_eq!(
            periods,
            ["2025-05-31", "2025-W22", "2025-05", "2025-Q2", "2025"]
        );
    }

    #[test]
    fn ibans_pass_the_mod97_check() {
        let iban = german_iban(1_234_567_890);
        // ISO 13616: first four characters moved to the end, D=13, E=14; the result is 1 mod 97.
        let rearranged = format!("{}1314{}", &iban[4..], &iban[2..4]);
        let remainder = rearranged
            .bytes()
            .fold(0u64, |acc, d| (acc * 10 + u64::from(d - b'0')) % 97);
        assert_eq!(remainder, 1);
        assert_eq!(iban.len(), 22);
    }
}
