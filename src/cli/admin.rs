//! `finx-gateway admin …`: the admin API of a running gateway, over HTTP. Prints the API's
//! JSON (a compact table for `connections list`); exits non-zero with the API's error message
//! when a call fails. No answer of the admin API holds a token, so nothing printed does.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::clock::{format_utc, Clock, SystemClock};

/// The environment variable holding the admin credential when no file is named.
pub const CREDENTIAL_ENV: &str = "FINX_ADMIN_TOKEN";

/// `admin …`
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The admin listener's base URL.
    #[arg(long, default_value = "http://127.0.0.1:9901")]
    pub url: String,
    /// A file holding the admin credential; without it, the environment variable
    /// FINX_ADMIN_TOKEN.
    #[arg(long)]
    pub credential_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// What to do through the admin API.
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Stored connections, through the running gateway.
    #[command(subcommand)]
    Connections(AdminConnectionsCommand),
    /// The store's encryption keys, through the running gateway.
    #[command(subcommand)]
    Keys(AdminKeysCommand),
}

/// `admin keys …`
#[derive(Subcommand, Debug)]
pub enum AdminKeysCommand {
    /// Connections by the key id their tokens are sealed under, and the rotation's progress.
    Status,
    /// Start re-sealing every connection under the primary key (follow it with `keys status`).
    Rotate,
}

/// `admin connections …`
#[derive(Subcommand, Debug)]
pub enum AdminConnectionsCommand {
    /// List connections: a table, or with --json the API's answer.
    List {
        /// Only connections with this status: active, reauth_required or revoked.
        #[arg(long)]
        status: Option<String>,
        /// The page, from 1.
        #[arg(long)]
        page: Option<u64>,
        /// Connections per page (default 100, at most 1000).
        #[arg(long)]
        per_page: Option<u64>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one connection (a user id, or flow:<service>/<flow id>).
    Show { key: String },
    /// Store a refresh token read from stdin as KEY's connection, through the running gateway.
    Import { key: String },
    /// Mark KEY's connection revoked: requests for it are refused until a new import or consent.
    Revoke { key: String },
    /// Delete KEY's stored connection.
    Purge { key: String },
}

/// Path-segment encoding of a key: everything but unreserved characters (so `/` and `:` too).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@');

/// Runs an `admin` command.
pub fn run(args: AdminArgs) -> Result<(), String> {
    let credential = credential(args.credential_file.as_deref())?;
    let base = base_url(&args.url)?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let api = Api {
        client,
        base,
        credential,
    };
    let command = match args.command {
        AdminCommand::Connections(command) => command,
        AdminCommand::Keys(command) => {
            return super::block_on(async move {
                let answer = match command {
                    AdminKeysCommand::Status => {
                        api.call(reqwest::Method::GET, "/admin/keys", |r| r).await?
                    }
                    AdminKeysCommand::Rotate => {
                        api.call(reqwest::Method::POST, "/admin/keys/rotate", |r| r)
                            .await?
                    }
                };
                print_json(&answer)
            })
        }
    };
    super::block_on(async move {
        match command {
            AdminConnectionsCommand::List {
                status,
                page,
                per_page,
                json,
            } => {
                let mut query = url::form_urlencoded::Serializer::new(String::new());
                if let Some(status) = &status {
                    query.append_pair("status", status);
                }
                if let Some(page) = page {
                    query.append_pair("page", &page.to_string());
                }
                if let Some(per_page) = per_page {
                    query.append_pair("per_page", &per_page.to_string());
                }
                let query = query.finish();
                let path = if query.is_empty() {
                    "/admin/connections".to_owned()
                } else {
                    format!("/admin/connections?{query}")
                };
                let listed = api.call(reqwest::Method::GET, &path, |r| r).await?;
                if json {
                    print_json(&listed)
                } else {
                    print_table(&listed);
                    Ok(())
                }
            }
            AdminConnectionsCommand::Show { key } => {
                let path = connection_path(&key, "");
                print_json(&api.call(reqwest::Method::GET, &path, |r| r).await?)
            }
            AdminConnectionsCommand::Import { key } => {
                let token = read_refresh_token()?;
                let body = Zeroizing::new(
                    serde_json::json!({ "refresh_token": token.expose_secret() }).to_string(),
                );
                let path = connection_path(&key, "/import");
                let stored = api
                    .call(reqwest::Method::POST, &path, |r| {
                        r.header(reqwest::header::CONTENT_TYPE, "application/json")
                            .body(body.as_bytes().to_vec())
                    })
                    .await?;
                print_json(&stored)
            }
            AdminConnectionsCommand::Revoke { key } => {
                let path = connection_path(&key, "/revoke");
                print_json(&api.call(reqwest::Method::POST, &path, |r| r).await?)
            }
            AdminConnectionsCommand::Purge { key } => {
                let path = connection_path(&key, "");
                print_json(&api.call(reqwest::Method::DELETE, &path, |r| r).await?)
            }
        }
    })
}

/// The admin credential: from `--credential-file`, else from `FINX_ADMIN_TOKEN`.
fn credential(file: Option<&Path>) -> Result<SecretString, String> {
    let text = match file {
        Some(path) => Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the credential file {}: {e}", path.display()))?,
        ),
        None => Zeroizing::new(std::env::var(CREDENTIAL_ENV).map_err(|_| {
            format!("no admin credential: pass --credential-file PATH or set {CREDENTIAL_ENV}")
        })?),
    };
    let credential = text.trim();
    if credential.is_empty() {
        return Err("the admin credential is empty".into());
    }
    Ok(SecretString::from(credential.to_owned()))
}

/// The admin listener's base URL, without a trailing `/`.
fn base_url(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|e| format!("--url {text:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "--url {text:?}: an http:// or https:// URL is needed"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("--url {text:?}: no query or fragment, please"));
    }
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    };
    if url.scheme() == "http" && !loopback {
        eprintln!(
            "warning: the admin credential is sent unencrypted to {}",
            url.host_str().unwrap_or_default()
        );
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// `/admin/connections/<key, percent-encoded><suffix>`.
fn connection_path(key: &str, suffix: &str) -> String {
    format!(
        "/admin/connections/{}{suffix}",
        utf8_percent_encode(key, SEGMENT)
    )
}

/// One refresh token from stdin (surrounding whitespace ignored).
fn read_refresh_token() -> Result<SecretString, String> {
    let mut input = Zeroizing::new(String::new());
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("cannot read the refresh token from stdin: {e}"))?;
    let token = input.trim();
    if token.is_empty() || token.chars().any(char::is_whitespace) {
        return Err("stdin must hold exactly one refresh token".into());
    }
    Ok(SecretString::from(token.to_owned()))
}

struct Api {
    client: reqwest::Client,
    base: String,
    credential: SecretString,
}

impl Api {
    /// One call; the API's JSON on success, its error message otherwise.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Value, String> {
        let mut authorization = reqwest::header::HeaderValue::try_from(format!(
            "Bearer {}",
            self.credential.expose_secret()
        ))
        .map_err(|_| "the admin credential cannot be sent in a header".to_owned())?;
        authorization.set_sensitive(true);
        let request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::AUTHORIZATION, authorization);
        let response = build(request)
            .send()
            .await
            .map_err(|e| format!("the admin API at {} did not answer: {e}", self.base))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|_| format!("the admin API answered {status} without JSON"))?;
        if status.is_success() {
            return Ok(body);
        }
        let error = &body["error"];
        Err(format!(
            "{}: {} ({})",
            status,
            error["message"].as_str().unwrap_or("no message"),
            error["code"].as_str().unwrap_or("no code")
        ))
    }
}

fn print_json(value: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}

/// `connections list` as a table: key, status, scope, created, refresh token issued (the last
/// refresh), its age, days until lapse, last used.
fn print_table(listed: &Value) {
    let text = |value: &Value| match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let time = |value: &Value| {
        value
            .as_i64()
            .map_or_else(|| "never".to_owned(), format_utc)
    };
    println!(
        "{:<40} {:<16} {:<16} {:<17} {:<17} {:>8} {:>10}  {:<17}",
        "connection",
        "status",
        "scope",
        "created",
        "token issued",
        "age (d)",
        "lapse (d)",
        "last used"
    );
    let connections = listed["connections"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for c in &connections {
        println!(
            "{:<40} {:<16} {:<16} {:<17} {:<17} {:>8} {:>10}  {:<17}",
            text(&c["key"]),
            text(&c["status"]),
            text(&c["scope"]),
            time(&c["created_at"]),
            time(&c["refresh_token_issued_at"]),
            text(&c["refresh_token_age_days"]),
            text(&c["days_until_lapse"]),
            time(&c["last_used_at"]),
        );
    }
    let total = listed["total"].as_u64().unwrap_or(0);
    let page = listed["page"].as_u64().unwrap_or(1);
    let per_page = listed["per_page"].as_u64().unwrap_or(1).max(1);
    println!(
        "{} shown, {total} in all, page {page} of {} ({per_page} per page), as of {} UTC",
        connections.len(),
        total.div_ceil(per_page).max(1),
        format_utc(SystemClock.now()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_one_path_segment() {
        assert_eq!(connection_path("alice", ""), "/admin/connections/alice");
        assert_eq!(
            connection_path("flow:demo/f-1.x@y", "/revoke"),
            "/admin/connections/flow%3Ademo%2Ff-1.x@y/revoke"
        );
        assert_eq!(
            connection_path("a b?#", ""),
            "/admin/connections/a%20b%3F%23"
        );
    }

    #[test]
    fn base_urls_are_checked() {
        assert_eq!(
            base_url("http://127.0.0.1:9901/").as_deref(),
            Ok("http://127.0.0.1:9901")
        );
        assert!(base_url("ftp://127.0.0.1").is_err());
        assert!(base_url("127.0.0.1:9901").is_err());
        assert!(base_url("http://127.0.0.1:9901/?x=1").is_err());
    }
}
