//! Verification and signing keys: static keys from config and a hot-reloaded JWKS file.
//!
//! [`CallerAuth::resolve`] is where key material is read: the I/O step after the pure
//! [`CallerSettings::check`].
//!
//! Every key carries its own algorithm allow-list, checked against the token header before any
//! cryptography runs, so that a key of one family can never be used with another family's
//! algorithm (the classic "HS256 with the RSA public key as secret" confusion).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Validation};
use secrecy::ExposeSecret;

use super::settings::{CallerSettings, KeyMaterial, KeySettings};
use super::verify::VerifiedCache;
use super::CallerAuth;

/// A key that can verify tokens, with the `Validation` built once for its allow-list.
pub(crate) struct VerifyKey {
    pub(crate) kid: String,
    pub(crate) algorithms: Vec<Algorithm>,
    pub(crate) key: DecodingKey,
    /// Signature and algorithm checks only: claims are validated by the caller module against
    /// the request's `now`, which jsonwebtoken's own clock-based checks cannot take.
    pub(crate) validation: Validation,
}

impl VerifyKey {
    fn new(kid: String, algorithms: Vec<Algorithm>, key: DecodingKey) -> Self {
        let mut validation = Validation::new_for_family(algorithms[0].family());
        validation.algorithms.clone_from(&algorithms);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        VerifyKey {
            kid,
            algorithms,
            key,
            validation,
        }
    }

    pub(crate) fn allows(&self, algorithm: Algorithm) -> bool {
        self.algorithms.contains(&algorithm)
    }
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// An HMAC key usable by `token mint`.
pub(crate) struct SigningKey {
    pub(crate) kid: String,
    pub(crate) algorithm: Algorithm,
    pub(crate) key: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Minimum HMAC secret length: RFC 7518 §3.2 asks for at least the hash output size.
fn min_hmac_len(algorithms: &[Algorithm]) -> usize {
    algorithms
        .iter()
        .map(|a| match a {
            Algorithm::HS384 => 48,
            Algorithm::HS512 => 64,
            _ => 32,
        })
        .max()
        .unwrap_or(32)
}

impl CallerAuth {
    /// Reads what checked settings name: HMAC secrets (refusing ones shorter than their hash),
    /// public key PEM files and the JWKS file. Returns every problem found, not just the first.
    pub fn resolve(settings: CallerSettings) -> Result<CallerAuth, Vec<String>> {
        let mut errors = Vec::new();
        let mut static_keys = Vec::with_capacity(settings.keys.len());
        let mut signing_keys = Vec::new();
        for key in &settings.keys {
            match load_static_key(key) {
                Ok((verify, signing)) => {
                    static_keys.push(verify);
                    signing_keys.extend(signing);
                }
                Err(err) => errors.push(err),
            }
        }
        let jwks = settings.jwks.and_then(|jwks| {
            let static_kids = settings.keys.iter().map(|k| k.kid.clone()).collect();
            JwksSource::open(jwks.path, jwks.algorithms, jwks.poll_interval, static_kids)
                .map_err(|err| errors.push(err))
                .ok()
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CallerAuth {
            mode: settings.mode,
            header: settings.header,
            claim_rules: settings.claim_rules,
            static_keys,
            signing_keys,
            jwks,
            services: settings.services,
            verified: VerifiedCache::new(),
        })
    }
}

/// Reads one static key's material and builds its verifier (and signer, for HMAC).
fn load_static_key(settings: &KeySettings) -> Result<(VerifyKey, Option<SigningKey>), String> {
    let context = format!("callers.keys {:?}", settings.kid);
    // `check` refuses an empty list; kept total rather than panicking.
    let Some(&algorithm) = settings.algorithms.first() else {
        return Err(format!("{context}: no algorithms"));
    };
    let (decoding, encoding) = match &settings.material {
        KeyMaterial::Secret(secret) => {
            // `check` already anchored a relative file to the config directory; joining it onto
            // an empty base keeps it exactly as anchored.
            let value = secret
                .resolve_in(Path::new(""))
                .map_err(|err| format!("{context}: {err}"))?;
            let bytes = value.expose_secret().as_bytes();
            let min = min_hmac_len(&settings.algorithms);
            if bytes.len() < min {
                return Err(format!(
                    "{context}: HMAC secret from {secret} is shorter than {min} bytes"
                ));
            }
            (
                DecodingKey::from_secret(bytes),
                Some(EncodingKey::from_secret(bytes)),
            )
        }
        KeyMaterial::PublicKeyPem(path) => {
            let pem = std::fs::read(path)
                .map_err(|err| format!("{context}: cannot read {}: {err}", path.display()))?;
            let family = algorithm.family();
            let decoded = match family {
                AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&pem),
                AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&pem),
                AlgorithmFamily::Ed => DecodingKey::from_ed_pem(&pem),
                // `check` refuses a public key for HMAC; kept total rather than panicking.
                AlgorithmFamily::Hmac => {
                    Err(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat.into())
                }
            };
            let key = decoded.map_err(|err| {
                format!(
                    "{context}: {} is not a {family:?} public key PEM: {err}",
                    path.display()
                )
            })?;
            (key, None)
        }
    };
    let signing = encoding.map(|key| SigningKey {
        kid: settings.kid.clone(),
        algorithm,
        key,
    });
    Ok((
        VerifyKey::new(settings.kid.clone(), settings.algorithms.clone(), decoding),
        signing,
    ))
}

/// Identifies one version of the JWKS file cheaply (no read needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp_of(path: &Path) -> std::io::Result<FileStamp> {
    let meta = std::fs::metadata(path)?;
    Ok(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

/// The JWKS file and the keys last read from it.
pub(crate) struct JwksSource {
    path: PathBuf,
    allowed: Vec<Algorithm>,
    keys: ArcSwap<Vec<VerifyKey>>,
    poll_interval_ns: u64,
    origin: Instant,
    /// Nanoseconds since `origin` before which nobody looks at the file again; claimed by CAS
    /// so that only one request per interval pays for the `stat`.
    next_check_ns: AtomicU64,
    stamp: Mutex<Option<FileStamp>>,
    /// Static keys are looked up first, so JWKS keys reusing their kid would be unreachable.
    static_kids: Vec<String>,
    /// Bumped whenever new keys are stored, so results verified with older keys can be dropped.
    generation: AtomicU64,
}

impl JwksSource {
    /// Reads the file once; startup fails if it is unreadable or holds no usable key.
    pub(crate) fn open(
        path: PathBuf,
        allowed: Vec<Algorithm>,
        poll_interval: Duration,
        static_kids: Vec<String>,
    ) -> Result<Self, String> {
        let stamp = stamp_of(&path)
            .map_err(|err| format!("callers.jwks_file {}: {err}", path.display()))?;
        let (keys, warnings) = read_jwks(&path, &allowed, &static_kids)?;
        for warning in warnings {
            tracing::warn!(jwks_file = %path.display(), "{warning}");
        }
        if keys.is_empty() {
            return Err(format!(
                "callers.jwks_file {}: no usable key (need kid, a signing key type and an allowed algorithm)",
                path.display()
            ));
        }
        Ok(JwksSource {
            path,
            allowed,
            keys: ArcSwap::from_pointee(keys),
            poll_interval_ns: u64::try_from(poll_interval.as_nanos()).unwrap_or(u64::MAX),
            origin: Instant::now(),
            next_check_ns: AtomicU64::new(0),
            stamp: Mutex::new(Some(stamp)),
            static_kids,
            generation: AtomicU64::new(0),
        })
    }

    /// Finds a key by kid in the current key set and runs `use_key` on it.
    pub(crate) fn with_key<R>(
        &self,
        kid: &str,
        use_key: impl FnOnce(&VerifyKey) -> R,
    ) -> Option<R> {
        self.maybe_reload();
        let keys = self.keys.load();
        keys.iter().find(|k| k.kid == kid).map(use_key)
    }

    /// Runs `use_key` on the only loaded key, if there is exactly one (tokens without kid).
    pub(crate) fn single_key<R>(&self, use_key: impl FnOnce(&VerifyKey) -> R) -> Option<R> {
        self.maybe_reload();
        let keys = self.keys.load();
        match keys.as_slice() {
            [only] => Some(use_key(only)),
            _ => None,
        }
    }

    pub(crate) fn kids(&self) -> Vec<String> {
        self.keys.load().iter().map(|k| k.kid.clone()).collect()
    }

    /// Checks the file (rate-limited, see [`Self::maybe_reload`]) and returns the key set's
    /// generation.
    pub(crate) fn current_generation(&self) -> u64 {
        self.maybe_reload();
        self.generation.load(Ordering::Acquire)
    }

    /// Hot path: one atomic load unless the poll interval has passed.
    fn maybe_reload(&self) {
        let now_ns = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let due = self.next_check_ns.load(Ordering::Relaxed);
        if now_ns < due {
            return;
        }
        let next = now_ns.saturating_add(self.poll_interval_ns);
        if self
            .next_check_ns
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        self.reload(false);
    }

    /// Re-reads the file if its mtime or size changed, or unconditionally when `force`.
    /// A broken file keeps the previous keys: a half-written rotation must not lock callers out.
    pub(crate) fn reload(&self, force: bool) {
        // Another thread already reloading is as good as us doing it.
        let mut last = match self.stamp.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        let current = match stamp_of(&self.path) {
            Ok(stamp) => stamp,
            Err(err) => {
                tracing::warn!(jwks_file = %self.path.display(), "cannot stat JWKS file, keeping previous keys: {err}");
                return;
            }
        };
        if !force && *last == Some(current) {
            return;
        }
        *last = Some(current);
        match read_jwks(&self.path, &self.allowed, &self.static_kids) {
            Ok((keys, warnings)) => {
                for warning in warnings {
                    tracing::warn!(jwks_file = %self.path.display(), "{warning}");
                }
                if keys.is_empty() {
                    tracing::warn!(jwks_file = %self.path.display(), "JWKS file has no usable key, keeping previous keys");
                    return;
                }
                tracing::info!(jwks_file = %self.path.display(), keys = keys.len(), "reloaded JWKS file");
                self.keys.store(Arc::new(keys));
                self.generation.fetch_add(1, Ordering::Release);
            }
            Err(err) => {
                tracing::warn!("{err}; keeping previous keys");
            }
        }
    }
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksSource")
            .field("path", &self.path)
            .field("allowed", &self.allowed)
            .field("keys", &self.keys.load())
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

/// Parses the JWKS file; unusable keys become warnings so one odd entry cannot break rotation.
fn read_jwks(
    path: &Path,
    allowed: &[Algorithm],
    static_kids: &[String],
) -> Result<(Vec<VerifyKey>, Vec<String>), String> {
    let bytes = std::fs::read(path)
        .map_err(|err| format!("callers.jwks_file {}: {err}", path.display()))?;
    let raw: RawJwks = serde_json::from_slice(&bytes).map_err(|err| {
        format!(
            "callers.jwks_file {}: not a JWKS document: {err}",
            path.display()
        )
    })?;
    let mut keys: Vec<VerifyKey> = Vec::new();
    let mut warnings = Vec::new();
    for (index, value) in raw.keys.into_iter().enumerate() {
        match jwk_to_key(value, allowed) {
            Ok(key) if static_kids.contains(&key.kid) => warnings.push(format!(
                "JWKS key {:?} skipped: kid already used by a static key",
                key.kid
            )),
            Ok(key) if keys.iter().any(|k| k.kid == key.kid) => {
                warnings.push(format!("JWKS key {:?} skipped: duplicate kid", key.kid))
            }
            Ok(key) => keys.push(key),
            Err(reason) => warnings.push(format!("JWKS key #{index} skipped: {reason}")),
        }
    }
    Ok((keys, warnings))
}

fn jwk_to_key(value: serde_json::Value, allowed: &[Algorithm]) -> Result<VerifyKey, String> {
    let jwk: Jwk = serde_json::from_value(value).map_err(|_| "not a valid JWK".to_owned())?;
    let kid = jwk
        .common
        .key_id
        .clone()
        .filter(|kid| !kid.is_empty())
        .ok_or("no kid")?;
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return Err(format!("{kid:?}: use is not \"sig\""));
    }
    let candidates: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa.algorithms(),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            &[Algorithm::ES256]
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
            &[Algorithm::ES384]
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            &[Algorithm::EdDSA]
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err(format!(
                "{kid:?}: symmetric keys do not belong in a JWKS file; configure them under callers.keys"
            ))
        }
        _ => return Err(format!("{kid:?}: unsupported key type or curve")),
    };
    let declared = match jwk.common.key_algorithm {
        Some(declared) => Some(
            Algorithm::try_from(declared)
                .map_err(|_| format!("{kid:?}: alg is not a signature algorithm"))?,
        ),
        None => None,
    };
    let algorithms: Vec<Algorithm> = candidates
        .iter()
        .copied()
        .filter(|a| allowed.contains(a) && declared.is_none_or(|d| d == *a))
        .collect();
    if algorithms.is_empty() {
        return Err(format!(
            "{kid:?}: none of its algorithms is in callers.jwks_algorithms"
        ));
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| format!("{kid:?}: invalid key material"))?;
    Ok(VerifyKey::new(kid, algorithms, key))
}
