//! The `[callers]` table checked without touching the outside world.
//!
//! [`CallerSettings::check`] validates syntax and cross-references only: it reads no file, no
//! environment variable and no network. Every mistake in the table is then reported at once, and
//! a config can be checked where its secrets are not available. Reading key material is the
//! second step, [`CallerAuth::resolve`](super::CallerAuth::resolve).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, AUTHORIZATION};
use jsonwebtoken::{Algorithm, AlgorithmFamily};

use crate::secret::SecretRef;

use super::config::{CallersFile, KeyFile};
use super::policy::{ServicePolicy, UserRule};
use super::verify::ClaimRules;
use super::Mode;

const DEFAULT_LEEWAY_SECS: u64 = 30;
/// More tolerated clock skew than this would keep expired tokens usable for too long.
const MAX_LEEWAY_SECS: u64 = 600;
const DEFAULT_JWKS_POLL: Duration = Duration::from_secs(1);

/// A `[callers]` table whose syntax and cross-references are valid, its keys not yet read.
///
/// Made by [`CallerSettings::check`]; [`CallerAuth::resolve`](super::CallerAuth::resolve) turns
/// it into the runtime form. `Debug` shows key references (variable names, paths) only: no
/// secret has been read.
#[derive(Debug)]
pub struct CallerSettings {
    pub(super) mode: Mode,
    pub(super) header: HeaderName,
    pub(super) claim_rules: ClaimRules,
    pub(super) keys: Vec<KeySettings>,
    pub(super) jwks: Option<JwksSettings>,
    pub(super) services: Vec<Arc<ServicePolicy>>,
}

impl CallerSettings {
    /// Refuses trusted-local mode unless `listener` is loopback (127.0.0.0/8, ::1, localhost)
    /// or a Unix socket path. Always `Ok` in JWT mode.
    pub fn check_listener(&self, listener: &str) -> Result<(), String> {
        match self.mode {
            Mode::Jwt => Ok(()),
            Mode::TrustedLocal(_) if super::listener::is_local(listener) => Ok(()),
            Mode::TrustedLocal(_) => Err(format!(
                "callers.mode = \"trusted-local\" accepts unauthenticated requests, so the listener \
                 must be loopback or a Unix socket, not {listener:?}"
            )),
        }
    }
}

/// One checked `[[callers.keys]]` entry.
#[derive(Debug)]
pub(super) struct KeySettings {
    pub(super) kid: String,
    /// Not empty, all of one family, never `none`.
    pub(super) algorithms: Vec<Algorithm>,
    pub(super) material: KeyMaterial,
}

/// Where a static key's material is; a relative path is already anchored to the config directory.
#[derive(Debug)]
pub(super) enum KeyMaterial {
    /// HMAC secret, for HMAC algorithms only.
    Secret(SecretRef),
    /// PEM file with a public key of the algorithms' family.
    PublicKeyPem(PathBuf),
}

/// The checked `jwks_file` settings.
#[derive(Debug)]
pub(super) struct JwksSettings {
    /// Anchored to the config directory.
    pub(super) path: PathBuf,
    /// Not empty, all of one asymmetric family.
    pub(super) algorithms: Vec<Algorithm>,
    pub(super) poll_interval: Duration,
}

impl CallerSettings {
    /// Validates the `[callers]` table without reading any file, environment variable or network.
    ///
    /// Relative paths are anchored to `base_dir` (the config file's directory), so the keys can
    /// be read later from any working directory. Returns every problem found, not just the first.
    pub fn check(file: &CallersFile, base_dir: &Path) -> Result<CallerSettings, Vec<String>> {
        let mut errors = Vec::new();
        let trusted_local = check_mode(file, &mut errors);
        let header = check_header(file, &mut errors);
        let claim_rules = check_claim_rules(file, &mut errors);

        let mut keys = Vec::with_capacity(file.keys.len());
        for (index, key_file) in file.keys.iter().enumerate() {
            if file.keys[..index].iter().any(|k| k.kid == key_file.kid) {
                errors.push(format!("callers.keys: duplicate kid {:?}", key_file.kid));
            }
            keys.extend(check_key(key_file, base_dir, &mut errors));
        }
        let jwks = check_jwks(file, base_dir, &mut errors);
        if !trusted_local && file.keys.is_empty() && file.jwks_file.is_none() {
            errors.push("callers: no keys and no jwks_file; no caller could authenticate".into());
        }

        let services = check_services(file, &mut errors);
        let mode = if trusted_local {
            check_trusted_local(file, &services, &mut errors)
        } else {
            Mode::Jwt
        };

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CallerSettings {
            mode,
            header,
            claim_rules,
            keys,
            jwks,
            services,
        })
    }
}

/// Whether `mode` is trusted-local (an unknown mode is reported and treated as JWT).
fn check_mode(file: &CallersFile, errors: &mut Vec<String>) -> bool {
    match file.mode.as_deref() {
        None | Some("jwt") => {
            if file.trusted_local.is_some() {
                errors
                    .push("callers.trusted_local is set but mode is not \"trusted-local\"".into());
            }
            false
        }
        Some("trusted-local") => true,
        Some(other) => {
            errors.push(format!(
                "callers.mode {other:?}: expected \"jwt\" or \"trusted-local\""
            ));
            false
        }
    }
}

fn check_header(file: &CallersFile, errors: &mut Vec<String>) -> HeaderName {
    let header_text = file.header.as_deref().unwrap_or("authorization");
    HeaderName::from_bytes(header_text.to_ascii_lowercase().as_bytes()).unwrap_or_else(|_| {
        errors.push(format!(
            "callers.header {header_text:?} is not a header name"
        ));
        AUTHORIZATION
    })
}

fn check_claim_rules(file: &CallersFile, errors: &mut Vec<String>) -> ClaimRules {
    let leeway = file.leeway_secs.unwrap_or(DEFAULT_LEEWAY_SECS);
    if leeway > MAX_LEEWAY_SECS {
        errors.push(format!(
            "callers.leeway_secs {leeway}: more than {MAX_LEEWAY_SECS} s of clock skew defeats expiry"
        ));
    }
    if file.max_token_age_secs == Some(0) {
        errors.push("callers.max_token_age_secs must be at least 1".into());
    }
    for (name, list) in [("issuer", &file.issuer), ("audience", &file.audience)] {
        if let Some(list) = list {
            if list.is_empty() || list.iter().any(String::is_empty) {
                errors.push(format!(
                    "callers.{name}: empty list or empty value; omit it to skip the check"
                ));
            }
        }
    }
    ClaimRules {
        leeway_secs: i64::try_from(leeway).unwrap_or(i64::MAX),
        max_token_age_secs: file
            .max_token_age_secs
            .map(|age| i64::try_from(age).unwrap_or(i64::MAX)),
        issuers: file.issuer.clone(),
        audiences: file.audience.clone(),
    }
}

/// Parses an allow-list, refusing `none`, unknown names, mixed families and empty lists.
fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, String> {
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

/// Checks one static key entry, pushing every problem with it to `errors`.
fn check_key(file: &KeyFile, base_dir: &Path, errors: &mut Vec<String>) -> Option<KeySettings> {
    let before = errors.len();
    let context = format!("callers.keys {:?}", file.kid);
    if file.kid.is_empty() {
        errors.push("callers.keys: a key has an empty kid".to_owned());
    }
    let algorithms = parse_algorithms(&file.algorithms)
        .map_err(|err| errors.push(format!("{context}: {err}")))
        .ok();
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
        // The algorithms are already reported; which material fits them is unknown.
        (_, _, None) => None,
        (Some(secret), None, Some(_)) => Some(KeyMaterial::Secret(secret.in_dir(base_dir))),
        (None, Some(path), Some(_)) => Some(KeyMaterial::PublicKeyPem(base_dir.join(path))),
    };
    match (algorithms, material) {
        (Some(algorithms), Some(material)) if errors.len() == before => Some(KeySettings {
            kid: file.kid.clone(),
            algorithms,
            material,
        }),
        _ => None,
    }
}

fn check_jwks(
    file: &CallersFile,
    base_dir: &Path,
    errors: &mut Vec<String>,
) -> Option<JwksSettings> {
    match (&file.jwks_file, &file.jwks_algorithms) {
        (None, None) => None,
        (None, Some(_)) => {
            errors.push("callers.jwks_algorithms is set without callers.jwks_file".into());
            None
        }
        (Some(_), None) => {
            errors.push("callers.jwks_file needs callers.jwks_algorithms, e.g. [\"RS256\"]".into());
            None
        }
        (Some(path), Some(names)) => match parse_algorithms(names) {
            Err(err) => {
                errors.push(format!("callers.jwks_algorithms: {err}"));
                None
            }
            Ok(algorithms) if algorithms[0].family() == AlgorithmFamily::Hmac => {
                errors.push(
                    "callers.jwks_algorithms: JWKS keys are public keys; HMAC is not allowed"
                        .into(),
                );
                None
            }
            Ok(algorithms) => Some(JwksSettings {
                path: base_dir.join(path),
                algorithms,
                poll_interval: file
                    .jwks_poll_interval_ms
                    .map_or(DEFAULT_JWKS_POLL, Duration::from_millis),
            }),
        },
    }
}

/// Checks every service policy and how they relate to each other and to the keys and issuers.
fn check_services(file: &CallersFile, errors: &mut Vec<String>) -> Vec<Arc<ServicePolicy>> {
    let mut services: Vec<Arc<ServicePolicy>> = Vec::with_capacity(file.services.len());
    for service_file in &file.services {
        if let Some(policy) = ServicePolicy::from_file(service_file, errors) {
            services.push(Arc::new(policy));
        }
    }
    for (index, service) in services.iter().enumerate() {
        let earlier = &services[..index];
        if earlier.iter().any(|s| s.name == service.name) {
            errors.push(format!(
                "callers.services: duplicate name {:?}",
                service.name
            ));
        }
        if earlier.iter().any(|s| {
            s.issuer == service.issuer
                && s.subject == service.subject
                && s.subject_claim == service.subject_claim
        }) {
            errors.push(format!(
                "callers.services {:?}: another service has the same issuer and subject",
                service.name
            ));
        }
        if let Some(issuers) = &file.issuer {
            if !issuers.contains(&service.issuer) {
                errors.push(format!(
                    "callers.services {:?}: issuer {:?} is not in callers.issuer",
                    service.name, service.issuer
                ));
            }
        }
        for kid in service.keys.iter().flatten() {
            // JWKS kids are only known once the file is read, and change with rotation.
            let known = file.keys.iter().any(|k| &k.kid == kid) || file.jwks_file.is_some();
            if !known {
                errors.push(format!(
                    "callers.services {:?}: keys names unknown kid {kid:?}",
                    service.name
                ));
            }
        }
    }
    if file.services.is_empty() {
        errors.push("callers.services is empty; every caller would be forbidden".into());
    }
    services
}

/// The one policy every request runs under in trusted-local mode.
fn check_trusted_local(
    file: &CallersFile,
    services: &[Arc<ServicePolicy>],
    errors: &mut Vec<String>,
) -> Mode {
    let Some(local) = &file.trusted_local else {
        errors.push(
            "callers.mode = \"trusted-local\" needs [callers.trusted_local] service = \"…\"".into(),
        );
        return Mode::Jwt;
    };
    let Some(policy) = services.iter().find(|s| s.name == local.service) else {
        errors.push(format!(
            "callers.trusted_local.service {:?} is not a configured service",
            local.service
        ));
        return Mode::Jwt;
    };
    if policy.users.iter().any(|u| matches!(u, UserRule::Claim(_))) {
        errors.push(format!(
            "callers.trusted_local: service {:?} uses claim: connections, which need a token",
            local.service
        ));
    }
    Mode::TrustedLocal(Arc::clone(policy))
}
