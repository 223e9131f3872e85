//! The status page's login session: after the admin credential was posted to the login form,
//! the browser holds a cookie `<issued at>.<MAC>`, where the MAC is an HMAC-SHA256 keyed with the
//! admin credential over a random per-process nonce and the issue time. The cookie is never
//! the credential and tells nothing about it; it ends after [`SESSION_LIFETIME_SECS`], when the
//! process restarts (a new nonce) and when the credential changes.
//!
//! The cookie opens the status page only: every endpoint that changes something takes the
//! bearer credential, so a page another site makes the browser load can change nothing.

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use crate::clock::UnixSeconds;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "finx_admin_session";
/// How long a login lasts.
pub const SESSION_LIFETIME_SECS: i64 = 12 * 3600;
/// How far in the future an issue time may lie (clock steps between replicas do not apply:
/// a session is only good on the process that issued it).
const CLOCK_LEEWAY_SECS: i64 = 60;

/// Issues and checks sessions of one process.
pub struct Sessions {
    nonce: [u8; 32],
}

impl Sessions {
    /// Sessions keyed to a fresh random nonce.
    pub fn new() -> Self {
        Self {
            nonce: rand::random(),
        }
    }

    fn mac(&self, credential: &SecretString, issued_at: UnixSeconds) -> Option<Hmac<Sha256>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(credential.expose_secret().as_bytes()).ok()?;
        mac.update(b"finx-gateway admin session\0");
        mac.update(&self.nonce);
        mac.update(&issued_at.to_be_bytes());
        Some(mac)
    }

    /// A session value issued at `now`; `None` only if no MAC can be keyed (never with HMAC).
    pub fn issue(&self, credential: &SecretString, now: UnixSeconds) -> Option<String> {
        let tag = self.mac(credential, now)?.finalize().into_bytes();
        let mut value = format!("{now}.");
        for byte in tag {
            let _ = write!(value, "{byte:02x}");
        }
        Some(value)
    }

    /// Whether `value` is a session this process issued under `credential` that has not ended.
    pub fn verify(&self, credential: &SecretString, value: &str, now: UnixSeconds) -> bool {
        let Some((issued, hex)) = value.split_once('.') else {
            return false;
        };
        let Ok(issued_at) = issued.parse::<UnixSeconds>() else {
            return false;
        };
        if issued_at > now + CLOCK_LEEWAY_SECS || now - issued_at > SESSION_LIFETIME_SECS {
            return false;
        }
        let Some(tag) = decode_hex(hex) else {
            return false;
        };
        // `verify_slice` compares in constant time.
        self.mac(credential, issued_at)
            .is_some_and(|mac| mac.verify_slice(&tag).is_ok())
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_good_for_its_credential_process_and_lifetime_only() {
        let credential = SecretString::from("the-admin-credential-0123456789");
        let sessions = Sessions::new();
        let now = 1_700_000_000;
        let value = sessions.issue(&credential, now).expect("issued");
        assert!(!value.contains("the-admin-credential"), "{value}");
        assert!(sessions.verify(&credential, &value, now));
        assert!(sessions.verify(&credential, &value, now + SESSION_LIFETIME_SECS));
        assert!(!sessions.verify(&credential, &value, now + SESSION_LIFETIME_SECS + 1));
        assert!(
            !sessions.verify(&credential, &value, now - 3600),
            "issued in the future"
        );
        let other = SecretString::from("another-admin-credential-000000");
        assert!(!sessions.verify(&other, &value, now), "credential changed");
        assert!(
            !Sessions::new().verify(&credential, &value, now),
            "another process"
        );
        let (issued, tag) = value.split_once('.').expect("two parts");
        let later = format!("{}.{tag}", issued.parse::<i64>().expect("number") + 100);
        assert!(
            !sessions.verify(&credential, &later, now),
            "issue time changed"
        );
        for bad in [
            "",
            ".",
            "x.y",
            "1.zz",
            &format!("{now}."),
            &format!("{now}.{}", "0".repeat(64)),
        ] {
            assert!(!sessions.verify(&credential, bad, now), "{bad:?}");
        }
    }
}
