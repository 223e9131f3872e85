//! Verification and signing keys: static keys from config and a hot-reloaded JWKS file.
//!
//! Every key carries its own algorithm allow-list, checked against the token header before any
//! cryptography runs, so that a key of one family can never be used with another family's
//! algorithm (the classic "HS256 with the RSA public key as secret" confusion).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Validation};
use secrecy::ExposeSecret;

use super::config::KeyFile;

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

/// Parses an allow-list, refusing `none`, unknown names, mixed families and empty lists.
pub(crate) fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, String> {
    if names.is_empty() {
        return Err("algorithms is empty; list the algorithms this key may verify".into());
    }
    let mut algorithms = Vec::with_capacity(names.len());
    for name in names {
        if name.eq_ignore_ascii_case("none") {
            return Err("algorithm \"none\" is never accepted".into());
        }
        let algorithm = Algorithm::from_str(name)
            .map_err(|_| format!("unknown algorithm {name:?} (e.g. HS256, RS256, ES256, EdDSA)"))?;
        if !algorithms.contains(&algorithm) {
            algorithms.push(algorithm);
        }
    }
    let family = algorithms[0].family();
    if algorithms.iter().any(|a| a.family() != family) {
        return Err(format!(
            "algorithms {names:?} mix key families; one key is HMAC or RSA or EC or EdDSA"
        ));
    }
    Ok(algorithms)
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

/// Builds a static key from its config entry; `Err` lists every problem with it.
pub(crate) fn load_static_key(
    file: &KeyFile,
    base_dir: &Path,
) -> Result<(VerifyKey, Option<SigningKey>), Vec<String>> {
    let context = format!("callers.keys {:?}", file.kid);
    let mut errors = Vec::new();
    if file.kid.is_empty() {
        errors.push("callers.keys: a key has an empty kid".to_owned());
    }
    let algorithms = match parse_algorithms(&file.algorithms) {
        Ok(algorithms) => Some(algorithms),
        Err(err) => {
            errors.push(format!("{context}: {err}"));
            None
        }
    };
    let family = algorithms.as_ref().map(|a| a[0].family());
    let material = match (&file.secret, &file.public_key_pem, family) {
        (Some(_), Some(_), _) => {
            errors.push(format!(
                "{context}: set either secret (HMAC) or public_key_pem, not both"
            ));
            None
        }
        (None, None, _) => {
            errors.push(format!("{context}: needs secret (HMAC) or public_key_pem"));
            None
        }
        (Some(_), None, Some(f)) if f != AlgorithmFamily::Hmac => {
            errors.push(format!(
                "{context}: a secret can only verify HS256/HS384/HS512, not {:?}",
                file.algorithms
            ));
            None
        }
        (None, Some(_), Some(AlgorithmFamily::Hmac)) => {
            errors.push(format!(
                "{context}: HMAC algorithms need a secret, not a public key"
            ));
            None
        }
        (_, _, None) => None,
        (Some(secret), None, Some(_)) => match secret.resolve_in(base_dir) {
            Ok(secret) => {
                let bytes = secret.expose_secret().as_bytes();
                let min = min_hmac_len(algorithms.as_deref().unwrap_or_default());
                if bytes.len() < min {
                    errors.push(format!(
                        "{context}: HMAC secret from {} is shorter than {min} bytes",
                        file.secret
                            .as_ref()
                            .map(|s| s.describe())
                            .unwrap_or_default()
                    ));
                    None
                } else {
                    Some((
                        DecodingKey::from_secret(bytes),
                        Some(EncodingKey::from_secret(bytes)),
                    ))
                }
            }
            Err(err) => {
                errors.push(format!("{context}: {err}"));
                None
            }
        },
        (None, Some(path), Some(family)) => {
            let full = base_dir.join(path);
            match std::fs::read(&full) {
                Ok(pem) => {
                    let decoded = match family {
                        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&pem),
                        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&pem),
                        AlgorithmFamily::Ed => DecodingKey::from_ed_pem(&pem),
                        // Excluded by the arm above; kept total rather than panicking.
                        AlgorithmFamily::Hmac => {
                            Err(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat.into())
                        }
                    };
                    match decoded {
                        Ok(key) => Some((key, None)),
                        Err(err) => {
                            errors.push(format!(
                                "{context}: {} is not a {family:?} public key PEM: {err}",
                                full.display()
                            ));
                            None
                        }
                    }
                }
                Err(err) => {
                    errors.push(format!("{context}: cannot read {}: {err}", full.display()));
                    None
                }
            }
        }
    };
    match (algorithms, material) {
        (Some(algorithms), Some((decoding, encoding))) if errors.is_empty() => {
            let signing = encoding.map(|key| SigningKey {
                kid: file.kid.clone(),
                algorithm: algorithms[0],
                key,
            });
            Ok((
                VerifyKey::new(file.kid.clone(), algorithms, decoding),
                signing,
            ))
        }
        _ => Err(errors),
    }
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
