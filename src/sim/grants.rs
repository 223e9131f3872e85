//! Authorization codes, grant families, access and refresh tokens, and the OAuth rules the
//! simulator is strict about: single-use codes bound to client and redirect_uri, rotation,
//! expiries and inactivity.
//!
//! A *family* is everything issued from one consent (one code exchange or one seeded grant): its
//! access tokens and its chain of refresh tokens. Rotation keeps exactly one current refresh token
//! per family; presenting a rotated one outside the grace window revokes the whole family
//! (RFC 9700 §4.14.2).
//!
//! Locking: the token endpoint and the control plane take the one `book` mutex for short,
//! non-async critical sections; `/rest/*` only takes a read lock on one shard of the access-token
//! table. Lock order is always book, then shard.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use rand::Rng;

use super::data::OwnerData;
use super::error::FinxError;
use super::stats::{bump, Counters, UserStats};

/// The scope every grant gets (the one finX's guides show).
pub(crate) const DEFAULT_SCOPE: &str = "accounts=ro balance=ro transactions=ro offline";

/// Whose data a grant reads: an ongoing user, or the single bank connection of a one-time flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Owner {
    User(Arc<str>),
    Flow(Arc<str>),
}

impl Owner {
    /// The key the deterministic data is seeded from.
    pub(crate) fn key(&self) -> String {
        match self {
            Owner::User(id) => format!("user:{id}"),
            Owner::Flow(id) => format!("flow:{id}"),
        }
    }

    /// The user id for ongoing grants.
    pub(crate) fn user_id(&self) -> Option<&str> {
        match self {
            Owner::User(id) => Some(id),
            Owner::Flow(_) => None,
        }
    }
}

/// The parts of a grant family the data hot path needs, shared by all its tokens.
#[derive(Debug)]
pub(crate) struct Family {
    pub owner: Owner,
    pub client_id: Arc<str>,
    pub data: Arc<OwnerData>,
    /// One-time grants vanish with their flow's data.
    pub vanishes_at: Option<i64>,
    revoked: AtomicBool,
    /// Last code exchange, refresh or data call; drives the inactivity limit.
    last_activity: AtomicI64,
}

impl Family {
    fn is_live(&self, now: i64) -> bool {
        !self.revoked.load(Ordering::Acquire) && self.vanishes_at.is_none_or(|at| now < at)
    }
}

/// Tokens handed out by a grant.
#[derive(Debug, Clone)]
pub(crate) struct IssuedTokens {
    pub access_token: String,
    /// `None` in omit-refresh-token mode.
    pub refresh_token: Option<String>,
    pub expires_in: u64,
    pub scope: String,
}

/// Where a code came from, captured when the widget completes.
#[derive(Debug, Clone)]
pub(crate) struct CodeOrigin {
    pub client_id: String,
    pub redirect_uri: Option<String>,
    pub owner: Owner,
    pub vanishes_at: Option<i64>,
}

/// Lifetimes and rotation options, copied from the config.
#[derive(Debug, Clone)]
pub(crate) struct GrantPolicy {
    pub access_ttl: Duration,
    pub code_ttl: Duration,
    pub refresh_ttl: Duration,
    pub inactivity_limit: Duration,
    pub grace_window: Duration,
    pub omit_refresh_token: bool,
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

#[derive(Debug)]
struct AccessRecord {
    family: Arc<Family>,
    expires_at: i64,
}

#[derive(Debug)]
enum RefreshState {
    Current,
    Rotated {
        at: i64,
        successor: Option<String>,
        grace_used: bool,
    },
}

#[derive(Debug)]
struct RefreshRecord {
    family_id: u64,
    expires_at: i64,
    scope: String,
    state: RefreshState,
}

#[derive(Debug)]
struct CodeRecord {
    origin: CodeOrigin,
    expires_at: i64,
    /// Set once exchanged; a second exchange revokes this family (RFC 6749 §4.1.2).
    exchanged_into: Option<u64>,
}

#[derive(Debug)]
struct FamilyTokens {
    family: Arc<Family>,
    access: Vec<String>,
}

#[derive(Debug, Default)]
struct Book {
    refresh: HashMap<String, RefreshRecord>,
    families: HashMap<u64, FamilyTokens>,
    codes: HashMap<String, CodeRecord>,
    families_by_user: HashMap<String, Vec<u64>>,
    user_stats: HashMap<String, UserStats>,
    owner_data: HashMap<String, Arc<OwnerData>>,
    next_family_id: u64,
}

const ACCESS_SHARDS: usize = 16;

/// Access tokens, sharded so concurrent data calls rarely meet on one lock.
#[derive(Debug)]
struct AccessTable {
    shards: Vec<RwLock<HashMap<Box<str>, AccessRecord>>>,
}

impl AccessTable {
    fn new() -> Self {
        Self {
            shards: (0..ACCESS_SHARDS).map(|_| RwLock::default()).collect(),
        }
    }

    fn shard(&self, token: &str) -> &RwLock<HashMap<Box<str>, AccessRecord>> {
        // Tokens are uniformly random, so a few bytes pick a shard well enough.
        let pick = token.bytes().take(4).fold(0usize, |acc, byte| {
            acc.wrapping_mul(31).wrapping_add(usize::from(byte))
        });
        &self.shards[pick % ACCESS_SHARDS]
    }

    fn insert(&self, token: &str, record: AccessRecord) {
        self.shard(token)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.into(), record);
    }

    fn remove(&self, token: &str) {
        self.shard(token)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }

    fn clear(&self) {
        for shard in &self.shards {
            shard.write().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

/// URL-safe characters for tokens and codes.
const TOKEN_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A random URL-safe string of exactly `len` characters.
pub(crate) fn random_string(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(TOKEN_ALPHABET[rng.random_range(0..TOKEN_ALPHABET.len())]))
        .collect()
}

/// A token of random length: finX's token lengths vary (its guides say to allow at least 2048
/// bytes).
fn random_token() -> String {
    let len = rand::rng().random_range(300..=2100);
    random_string(len)
}

/// The grant store.
#[derive(Debug)]
pub(crate) struct Grants {
    policy: GrantPolicy,
    book: Mutex<Book>,
    access: AccessTable,
}

impl Grants {
    pub(crate) fn new(policy: GrantPolicy) -> Self {
        Self {
            policy,
            book: Mutex::new(Book::default()),
            access: AccessTable::new(),
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every code, family and token.
    pub(crate) fn clear(&self) {
        *self.book() = Book::default();
        self.access.clear();
    }

    /// The (cached) data of `owner`.
    pub(crate) fn owner_data(&self, owner: &Owner) -> Arc<OwnerData> {
        Self::owner_data_in(&mut self.book(), owner)
    }

    fn owner_data_in(book: &mut Book, owner: &Owner) -> Arc<OwnerData> {
        let key = owner.key();
        book.owner_data
            .entry(key)
            .or_insert_with_key(|key| Arc::new(OwnerData::generate(key)))
            .clone()
    }

    /// Stores a fresh authorization code for a completed flow and returns it.
    pub(crate) fn new_code(&self, origin: CodeOrigin, now: i64) -> String {
        // finX's codes are JWTs whose length varies like its tokens': a client must not
        // assume a fixed size.
        let code = random_string(rand::rng().random_range(200..=1200));
        let record = CodeRecord {
            origin,
            expires_at: now.saturating_add(secs(self.policy.code_ttl)),
            exchanged_into: None,
        };
        self.book().codes.insert(code.clone(), record);
        code
    }

    /// `grant_type=authorization_code`.
    pub(crate) fn exchange_code(
        &self,
        client_id: &str,
        code: &str,
        redirect_uri: Option<&str>,
        now: i64,
        counters: &Counters,
    ) -> Result<IssuedTokens, FinxError> {
        let mut book = self.book();
        let Some(record) = book.codes.get(code) else {
            return Err(FinxError::invalid_grant("unknown authorization code"));
        };
        if record.origin.client_id != client_id {
            return Err(FinxError::invalid_grant(
                "code was issued to another client",
            ));
        }
        if let Some(family_id) = record.exchanged_into {
            self.revoke_family(&mut book, family_id, counters);
            return Err(FinxError::invalid_grant(
                "authorization code already used; its tokens are revoked",
            ));
        }
        if now >= record.expires_at {
            return Err(FinxError::invalid_grant("authorization code expired"));
        }
        if redirect_uri.is_some_and(|sent| Some(sent) != record.origin.redirect_uri.as_deref()) {
            return Err(FinxError::invalid_grant(
                "redirect_uri does not match the flow's redirect_uri",
            ));
        }
        if record.origin.vanishes_at.is_some_and(|at| now >= at) {
            return Err(FinxError::invalid_grant("the flow's data has been deleted"));
        }
        let origin = record.origin.clone();
        let (family_id, tokens) = self.new_family(&mut book, &origin, now);
        if let Some(record) = book.codes.get_mut(code) {
            record.exchanged_into = Some(family_id);
        }
        bump(&counters.code_grants);
        Ok(tokens)
    }

    /// Creates a consented grant without a flow (`POST /_sim/grants`).
    pub(crate) fn seed(&self, origin: &CodeOrigin, now: i64, counters: &Counters) -> IssuedTokens {
        let mut book = self.book();
        let (_, tokens) = self.new_family(&mut book, origin, now);
        bump(&counters.seeded_grants);
        tokens
    }

    fn new_family(&self, book: &mut Book, origin: &CodeOrigin, now: i64) -> (u64, IssuedTokens) {
        let family_id = book.next_family_id;
        book.next_family_id += 1;
        let family = Arc::new(Family {
            owner: origin.owner.clone(),
            client_id: origin.client_id.as_str().into(),
            data: Self::owner_data_in(book, &origin.owner),
            vanishes_at: origin.vanishes_at,
            revoked: AtomicBool::new(false),
            last_activity: AtomicI64::new(now),
        });
        if let Some(user) = origin.owner.user_id() {
            book.families_by_user
                .entry(user.to_owned())
                .or_default()
                .push(family_id);
        }
        book.families.insert(
            family_id,
            FamilyTokens {
                family,
                access: Vec::new(),
            },
        );
        let access_token = self.issue_access(book, family_id, now);
        let refresh_token = self.issue_refresh(book, family_id, DEFAULT_SCOPE, now);
        let tokens = IssuedTokens {
            access_token,
            refresh_token: Some(refresh_token),
            expires_in: self.policy.access_ttl.as_secs(),
            scope: DEFAULT_SCOPE.to_owned(),
        };
        (family_id, tokens)
    }

    fn issue_access(&self, book: &mut Book, family_id: u64, now: i64) -> String {
        let token = random_token();
        if let Some(entry) = book.families.get_mut(&family_id) {
            entry.access.push(token.clone());
            self.access.insert(
                &token,
                AccessRecord {
                    family: entry.family.clone(),
                    expires_at: now.saturating_add(secs(self.policy.access_ttl)),
                },
            );
        }
        token
    }

    fn issue_refresh(&self, book: &mut Book, family_id: u64, scope: &str, now: i64) -> String {
        let token = random_token();
        book.refresh.insert(
            token.clone(),
            RefreshRecord {
                family_id,
                expires_at: now.saturating_add(secs(self.policy.refresh_ttl)),
                scope: scope.to_owned(),
                state: RefreshState::Current,
            },
        );
        token
    }

    /// `grant_type=refresh_token`, with rotation, reuse detection and the grace window.
    pub(crate) fn refresh(
        &self,
        client_id: &str,
        refresh_token: &str,
        requested_scope: Option<&str>,
        now: i64,
        counters: &Counters,
    ) -> Result<IssuedTokens, FinxError> {
        let mut book = self.book();
        let Some(record) = book.refresh.get(refresh_token) else {
            return Err(FinxError::invalid_grant("unknown refresh token"));
        };
        let family_id = record.family_id;
        let expires_at = record.expires_at;
        let granted_scope = record.scope.clone();
        let rotated = match &record.state {
            RefreshState::Current => None,
            RefreshState::Rotated {
                at,
                successor,
                grace_used,
            } => Some((*at, successor.clone(), *grace_used)),
        };
        let Some(family) = book.families.get(&family_id).map(|f| f.family.clone()) else {
            return Err(FinxError::invalid_grant("unknown refresh token"));
        };
        if *family.client_id != *client_id {
            return Err(FinxError::invalid_grant(
                "refresh token was issued to another client",
            ));
        }
        if family.revoked.load(Ordering::Acquire) {
            return Err(FinxError::invalid_grant("grant revoked"));
        }
        if !family.is_live(now) {
            return Err(FinxError::invalid_grant("the flow's data has been deleted"));
        }
        let mut grace_reuse = false;
        let mut superseded = None;
        if let Some((rotated_at, successor, grace_used)) = rotated {
            let successor_current = successor.as_ref().is_some_and(|next| {
                book.refresh
                    .get(next)
                    .is_some_and(|r| matches!(r.state, RefreshState::Current))
            });
            let in_window = now.saturating_sub(rotated_at) <= secs(self.policy.grace_window);
            if self.policy.grace_window.is_zero() || !in_window || grace_used || !successor_current
            {
                self.revoke_family(&mut book, family_id, counters);
                bump(&counters.refresh_reuse_detected);
                if let Some(user) = family.owner.user_id() {
                    user_entry(&mut book, user).refresh_reuse_detected += 1;
                }
                return Err(FinxError::invalid_grant(
                    "refresh token already used; the grant is revoked",
                ));
            }
            grace_reuse = true;
            superseded = successor;
        }
        if now >= expires_at {
            return Err(FinxError::invalid_grant("refresh token expired"));
        }
        let idle = now.saturating_sub(family.last_activity.load(Ordering::Relaxed));
        if idle > secs(self.policy.inactivity_limit) {
            return Err(FinxError::invalid_grant(
                "grant lapsed after a period of inactivity",
            ));
        }
        // An empty scope counts as not sent (the granted scope stays), like an empty
        // redirect_uri at the exchange.
        let scope = match requested_scope.filter(|requested| !requested.trim().is_empty()) {
            Some(requested) => {
                let granted: Vec<&str> = granted_scope.split_whitespace().collect();
                if !requested
                    .split_whitespace()
                    .all(|item| granted.contains(&item))
                {
                    return Err(FinxError::invalid_scope());
                }
                requested.split_whitespace().collect::<Vec<_>>().join(" ")
            }
            None => granted_scope.clone(),
        };

        family.last_activity.store(now, Ordering::Relaxed);
        let access_token = self.issue_access(&mut book, family_id, now);
        let refresh_token = if self.policy.omit_refresh_token && !grace_reuse {
            None
        } else {
            let next = self.issue_refresh(&mut book, family_id, &scope, now);
            if grace_reuse {
                // The pair handed out by the first use was never seen by the client (that is
                // what the grace window is for); it is superseded, and using it later is reuse.
                if let Some(previous) = superseded.and_then(|p| book.refresh.get_mut(&p)) {
                    previous.state = RefreshState::Rotated {
                        at: now,
                        successor: Some(next.clone()),
                        grace_used: true,
                    };
                }
                if let Some(old) = book.refresh.get_mut(refresh_token) {
                    old.state = RefreshState::Rotated {
                        at: now,
                        successor: Some(next.clone()),
                        grace_used: true,
                    };
                }
                bump(&counters.grace_reuses);
            } else if let Some(old) = book.refresh.get_mut(refresh_token) {
                old.state = RefreshState::Rotated {
                    at: now,
                    successor: Some(next.clone()),
                    grace_used: false,
                };
            }
            Some(next)
        };
        bump(&counters.refresh_grants);
        if let Some(user) = family.owner.user_id() {
            user_entry(&mut book, user).refresh_grants += 1;
        }
        Ok(IssuedTokens {
            access_token,
            refresh_token,
            expires_in: self.policy.access_ttl.as_secs(),
            scope,
        })
    }

    /// Marks a family revoked and drops its access tokens.
    fn revoke_family(&self, book: &mut Book, family_id: u64, counters: &Counters) {
        if let Some(entry) = book.families.get_mut(&family_id) {
            if !entry.family.revoked.swap(true, Ordering::AcqRel) {
                bump(&counters.families_revoked);
            }
            for token in entry.access.drain(..) {
                self.access.remove(&token);
            }
        }
    }

    /// Revokes every family of a user; returns how many were live.
    pub(crate) fn revoke_user(&self, user_id: &str, counters: &Counters) -> usize {
        let mut book = self.book();
        let ids = book
            .families_by_user
            .get(user_id)
            .cloned()
            .unwrap_or_default();
        let live = ids
            .iter()
            .filter(|id| {
                book.families
                    .get(id)
                    .is_some_and(|f| !f.family.revoked.load(Ordering::Acquire))
            })
            .count();
        for id in ids {
            self.revoke_family(&mut book, id, counters);
        }
        live
    }

    /// Makes every access token issued so far unusable (refresh tokens are unaffected).
    pub(crate) fn expire_access_tokens(&self) {
        let _book = self.book();
        self.access.clear();
    }

    /// The family behind a bearer token, if it is usable now. This is the data hot path.
    pub(crate) fn authenticate(&self, token: &str, now: i64) -> Result<Arc<Family>, &'static str> {
        let shard = self
            .access
            .shard(token)
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let Some(record) = shard.get(token) else {
            return Err("unknown access token");
        };
        if now >= record.expires_at {
            return Err("access token expired");
        }
        if !record.family.is_live(now) {
            return Err("access token revoked");
        }
        record.family.last_activity.store(now, Ordering::Relaxed);
        Ok(record.family.clone())
    }

    /// One user's counters.
    pub(crate) fn user_stats(&self, user_id: &str) -> UserStats {
        let book = self.book();
        let mut stats = book.user_stats.get(user_id).cloned().unwrap_or_default();
        stats.user_id = user_id.to_owned();
        stats
    }
}

fn user_entry<'a>(book: &'a mut Book, user_id: &str) -> &'a mut UserStats {
    book.user_stats.entry(user_id.to_owned()).or_default()
}
