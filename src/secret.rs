//! References to secrets kept outside the configuration file: the one type every secret of the
//! gateway is named by (client secret, store key, caller keys, state key, database URL).
//!
//! Config files end up in repositories, tickets and log excerpts, so a secret is never written
//! inline: the config names the environment variable or file that holds it.
//!
//! A leaf module: it depends on nothing else in the crate.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

/// Where a secret lives: `{ env = "VAR" }` or `{ file = "path" }` in TOML.
///
/// `Debug` shows only the variable name or path, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretRef {
    /// Name of an environment variable holding the secret.
    Env(String),
    /// Path of a file holding the secret; relative paths are resolved against the config's
    /// directory by [`SecretRef::resolve_in`], or the working directory by [`SecretRef::resolve`].
    File(PathBuf),
}

impl SecretRef {
    /// Reads the secret, resolving a relative file path against the working directory.
    pub fn resolve(&self) -> Result<SecretString, String> {
        self.resolve_in(Path::new("."))
    }

    /// Reads the secret, resolving a relative file path against `base_dir`.
    ///
    /// One trailing line break is dropped from files because editors add one. Empty secrets are
    /// refused: an empty HMAC key or client secret is always a deployment mistake. Error messages
    /// name the variable or path only.
    pub fn resolve_in(&self, base_dir: &Path) -> Result<SecretString, String> {
        let value = match self {
            SecretRef::Env(name) => std::env::var(name).map_err(|err| match err {
                std::env::VarError::NotPresent => {
                    format!("environment variable {name} is not set")
                }
                std::env::VarError::NotUnicode(_) => {
                    format!("environment variable {name} is not valid UTF-8")
                }
            })?,
            SecretRef::File(path) => {
                let full = base_dir.join(path);
                let mut text = std::fs::read_to_string(&full)
                    .map_err(|err| format!("cannot read secret file {}: {err}", full.display()))?;
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                text
            }
        };
        if value.is_empty() {
            return Err(format!("secret from {} is empty", self));
        }
        Ok(SecretString::from(value))
    }

    /// The same reference with a relative file path made relative to `base_dir` (the config
    /// file's directory), so it can be resolved later from any working directory.
    pub fn in_dir(&self, base_dir: &Path) -> SecretRef {
        match self {
            SecretRef::Env(name) => SecretRef::Env(name.clone()),
            SecretRef::File(path) => SecretRef::File(base_dir.join(path)),
        }
    }
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "environment variable {name}"),
            SecretRef::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[derive(Deserialize)]
    struct Holder {
        secret: SecretRef,
    }

    #[test]
    fn parses_env_and_file_forms() {
        let env: Holder = toml::from_str(r#"secret = { env = "X" }"#).unwrap();
        assert_eq!(env.secret, SecretRef::Env("X".into()));
        let file: Holder = toml::from_str(r#"secret = { file = "k.txt" }"#).unwrap();
        assert_eq!(file.secret, SecretRef::File("k.txt".into()));
        assert!(toml::from_str::<Holder>(r#"secret = "inline""#).is_err());
        assert!(toml::from_str::<Holder>(r#"secret = { value = "inline" }"#).is_err());
    }

    #[test]
    fn file_secret_drops_trailing_newline_and_refuses_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "hunter2\n").unwrap();
        let secret = SecretRef::File("s".into()).resolve_in(dir.path()).unwrap();
        assert_eq!(secret.expose_secret(), "hunter2");
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        assert!(SecretRef::File("empty".into())
            .resolve_in(dir.path())
            .is_err());
        let missing = SecretRef::Env("FINX_GATEWAY_TEST_UNSET_VAR".into())
            .resolve()
            .unwrap_err();
        assert!(missing.contains("FINX_GATEWAY_TEST_UNSET_VAR"));
    }
}
