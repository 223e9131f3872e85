//! The validated settings of connect flows (`[connect]`), and the allow-list rule for the
//! addresses users are sent back to.

use std::time::Duration;

use secrecy::SecretString;
use url::Url;

/// Connect flows through the gateway.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    pub callback_url: Url,
    /// The path of `callback_url`, answered by the gateway.
    pub callback_path: String,
    pub allowed_redirects: Vec<RedirectRule>,
    pub state_key: SecretString,
    pub state_ttl: Duration,
}

/// One allowed return address: scheme, host and port must be equal, the path must start with
/// `path_prefix` at a segment boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectRule {
    scheme: String,
    host: String,
    port: Option<u16>,
    path_prefix: String,
}

impl RedirectRule {
    /// Parses an allow-list entry such as `https://app.example.com/finx/`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "{text:?}: only http and https redirects are allowed"
            ));
        }
        if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
            return Err(format!(
                "{text:?}: no query, fragment or user info in an allowed redirect"
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| format!("{text:?} has no host"))?;
        Ok(Self {
            scheme: url.scheme().to_owned(),
            host: host.to_owned(),
            port: url.port_or_known_default(),
            path_prefix: url.path().to_owned(),
        })
    }

    /// Whether `candidate` is a return address this rule allows.
    pub fn allows(&self, candidate: &Url) -> bool {
        let path = candidate.path();
        let prefix = self.path_prefix.trim_end_matches('/');
        candidate.scheme() == self.scheme
            && candidate.host_str() == Some(self.host.as_str())
            && candidate.port_or_known_default() == self.port
            && candidate.username().is_empty()
            && candidate.password().is_none()
            && (path == prefix
                || path.starts_with(&format!("{prefix}/"))
                || path == self.path_prefix)
    }
}
