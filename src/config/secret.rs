//! References to secrets held outside the config file: `{ env = "VAR" }` or `{ file = "path" }`.
//! A secret written inline in the config file is refused by the type itself.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

/// Where a secret lives. The config file holds only this reference, never the value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretRef {
    /// An environment variable's value.
    Env(String),
    /// A file's content (surrounding whitespace trimmed); relative to the config file.
    File(PathBuf),
}

impl SecretRef {
    /// Reads the secret. The error names where it looked, never what it found.
    pub fn resolve(&self, base_dir: &Path) -> Result<SecretString, String> {
        let raw = match self {
            Self::Env(var) => std::env::var(var)
                .map_err(|_| format!("environment variable {var} is not set (or not UTF-8)"))?,
            Self::File(path) => {
                let path = base_dir.join(path);
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?
            }
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(format!("{} is empty", self.describe()));
        }
        Ok(SecretString::from(trimmed.to_owned()))
    }

    /// Where the secret lives, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Env(var) => format!("environment variable {var}"),
            Self::File(path) => format!("file {}", path.display()),
        }
    }
}
