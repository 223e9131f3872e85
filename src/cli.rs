//! The command line: `serve`, `check-config`, `sim`, `demo`, `connections`, `admin`, `key`,
//! `store`.

mod admin;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pingora::server::RunArgs;
use secrecy::{ExposeSecret, SecretString};

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StoreBackend};
use crate::store::crypto::EncryptionKey;
use crate::store::postgres::{OpenWait, PostgresStore};
use crate::store::rotation::{self, RotationOptions};
use crate::store::{ConnectionKey, CopyOutcome, KeyStatus, NewConnection, TokenStore};

/// finx-gateway: a pingora sidecar that injects per-user finX bearer tokens.
#[derive(Parser, Debug)]
#[command(name = "finx-gateway", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway. SIGTERM or SIGINT stop it gracefully; SIGQUIT hands its listening
    /// sockets to a new process started with `--upgrade`.
    Serve {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Take over the listening sockets of the running gateway (graceful upgrade), which is
        /// then sent SIGQUIT.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file, reporting every problem; non-zero exit when there is one.
    CheckConfig {
        /// The TOML config file.
        config: PathBuf,
        /// Check the file only: read no secret, resolve no host name, load no key (for CI and
        /// build machines without the production secrets or network).
        #[arg(long)]
        offline: bool,
    },
    /// Run the finX simulator.
    #[cfg(feature = "sim")]
    Sim(crate::sim::SimArgs),
    /// Start the simulator and the gateway on loopback with a throwaway store and print curl
    /// commands to try; runs until Ctrl-C.
    #[cfg(feature = "sim")]
    Demo(crate::demo::DemoArgs),
    /// Manage stored connections.
    #[command(subcommand)]
    Connections(ConnectionsCommand),
    /// A running gateway's admin API (list, show, import, revoke, purge connections).
    Admin(admin::AdminArgs),
    /// Encryption keys for the token store.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The token store itself: schema migrations, copying between stores, key rotation.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Caller tokens (development helpers).
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `token …`
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Mint a caller JWT with one of the config's HMAC keys, for local testing.
    Mint {
        #[arg(long, short)]
        config: PathBuf,
        /// The `kid` of the HMAC key in `[[callers.keys]]`.
        #[arg(long)]
        key: String,
        /// The `iss` claim.
        #[arg(long)]
        iss: String,
        /// The `sub` claim.
        #[arg(long)]
        sub: String,
        /// The `aud` claim.
        #[arg(long)]
        aud: Option<String>,
        /// Lifetime, e.g. `15m`, `1h`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Extra string claims, `name=value` (repeatable), e.g. `--claim user=alice`.
        #[arg(long = "claim", value_parser = parse_claim)]
        claims: Vec<(String, String)>,
    },
}

fn parse_claim(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("{text:?} is not name=value"))
}

/// `connections …`
#[derive(Subcommand, Debug)]
pub enum ConnectionsCommand {
    /// Store a refresh token read from stdin for a user (or a one-time flow).
    Import {
        #[arg(long, short)]
        config: PathBuf,
        /// The user id the connection belongs to.
        #[arg(long, conflicts_with = "flow", required_unless_present = "flow")]
        user: Option<String>,
        /// The one-time flow id the connection belongs to (with --service).
        #[arg(long, requires = "service")]
        flow: Option<String>,
        /// The service (policy name) that owns the one-time flow.
        #[arg(long)]
        service: Option<String>,
    },
    /// List stored connections (never their tokens).
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// `store …`
#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Apply pending schema migrations (PostgreSQL; an embedded store migrates when opened).
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Copy every connection from one store to another (any kinds), re-encrypting with the
    /// target's key; a target row written later than its source is left alone.
    Copy {
        /// The config whose `[store]` is read.
        #[arg(long)]
        from: PathBuf,
        /// The config whose `[store]` is written.
        #[arg(long)]
        to: PathBuf,
    },
    /// Re-encrypt every stored token under `encryption_key` (key rotation) while gateways keep
    /// serving the store; afterwards `previous_keys` can be removed from every config.
    RotateKey {
        #[arg(long, short)]
        config: PathBuf,
        /// Connections re-encrypted per write transaction.
        #[arg(long, default_value_t = 200)]
        batch_size: u32,
    },
    /// Count stored connections by the id of the key their tokens are encrypted under.
    KeyStatus {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// `key …`
#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Print a new random store encryption key (base64) to stdout.
    Generate,
}

/// Parses the process arguments and runs the command.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<(), String> {
    match command {
        Command::Serve { config, upgrade } => serve(&config, upgrade),
        Command::CheckConfig { config, offline } => check_config(&config, offline),
        #[cfg(feature = "sim")]
        Command::Sim(args) => crate::sim::run(args).map_err(|e| e.to_string()),
        #[cfg(feature = "sim")]
        Command::Demo(args) => crate::demo::run(args),

        Command::Connections(ConnectionsCommand::Import {
            config,
            user,
            flow,
            service,
        }) => {
            let key = match (user, flow, service) {
                (Some(user), _, _) => ConnectionKey::user(&user),
                (None, Some(flow), Some(service)) => ConnectionKey::flow(&service, &flow),
                _ => return Err("--user, or --flow with --service, is required".into()),
            }
            .map_err(|e| e.to_string())?;
            import(&config, key)
        }
        Command::Connections(ConnectionsCommand::List { config }) => list(&config),
        Command::Admin(args) => admin::run(args),
        Command::Token(TokenCommand::Mint {
            config,
            key,
            iss,
            sub,
            aud,
            ttl,
            claims,
        }) => {
            let config = load(&config)?;
            let extra = claims
                .into_iter()
                .map(|(name, value)| (name, serde_json::Value::String(value)))
                .collect();
            let token = config
                .callers
                .mint(&key, &iss, &sub, aud.as_deref(), ttl, extra)
                .map_err(|e| e.to_string())?;
            println!("{token}");
            Ok(())
        }
        Command::Store(StoreCommand::Migrate { config }) => migrate(&config),
        Command::Store(StoreCommand::Copy { from, to }) => copy(&from, &to),
        Command::Store(StoreCommand::RotateKey { config, batch_size }) => {
            rotate_key(&config, batch_size)
        }
        Command::Store(StoreCommand::KeyStatus { config }) => key_status(&config),
        Command::Key(KeyCommand::Generate) => {
            println!("{}", EncryptionKey::generate().to_base64().expose_secret());
            Ok(())
        }
    }
}

fn load(path: &Path) -> Result<Config, String> {
    Config::load(path).map_err(|e| e.to_string())
}

fn serve(path: &Path, upgrade: bool) -> Result<(), String> {
    let mut config = load(path)?;
    config.server.upgrade = upgrade;
    let _log_writer = crate::telemetry::init(&config.telemetry);
    // An upgrading process waits for the old one's serving lock in the background (and does
    // not refresh until it has it); otherwise a held lock refuses the start.
    let (mut serving, refresh_gate) = if upgrade {
        let gate = crate::lock_store_after_upgrade(&config).map_err(|e| e.to_string())?;
        (None, Some(gate))
    } else {
        let lock = crate::lock_store_for_serving(&config).map_err(|e| e.to_string())?;
        (Some(lock), None)
    };
    tracing::info!(store = %config.store.describe(), "opening the token store");
    let store = crate::open_store(&config, OpenWait::UntilReachable).map_err(|e| e.to_string())?;
    // Before any listener opens: from here on a stop is graceful. (While the store is still
    // being waited for, a signal simply ends the process: nothing has started yet.)
    let signals = crate::GatewaySignals::install().map_err(|e| e.to_string())?;
    let predecessors = serving
        .as_ref()
        .map_or_else(Vec::new, |lock| lock.predecessors.clone());
    let built = crate::build_server(
        &config,
        store,
        Arc::new(SystemClock),
        refresh_gate,
        &predecessors,
    )
    .map_err(|e| e.to_string())?;
    if let Some(lock) = serving.as_mut() {
        lock.record_owner(built.tokens.owner());
    }
    let reloader = built.reloader.clone();
    let config_path = path.to_path_buf();
    signals.on_hangup(Box::new(move || reloader.reload_and_log(&config_path)));
    tracing::info!(listen = %config.listen, admin = %config.admin.address, upstream = %config.upstream.base_url, upgrade, "finx-gateway serving");
    built.server.run(RunArgs {
        shutdown_signal: Box::new(signals.reporting_to(built.draining.clone())),
    });
    // The listeners are closed and requests drained; a refresh started is a refresh stored.
    let finished = built.tokens.shutdown(crate::shutdown_deadline(&config));
    tracing::info!(refreshes_finished = finished, "finx-gateway stopped");
    Ok(())
}

fn check_config(path: &Path, offline: bool) -> Result<(), String> {
    if offline {
        Config::check_path(path).map_err(|e| e.to_string())?;
        println!(
            "{}: OK offline (secrets, keys and addresses not checked)",
            path.display()
        );
        return Ok(());
    }
    let config = load(path)?;
    println!(
        "{}: OK (listen {}, upstream {}, store {})",
        path.display(),
        config.listen,
        config.upstream.base_url,
        config.store.describe()
    );
    Ok(())
}

fn with_store<T>(
    path: &Path,
    work: impl AsyncFnOnce(Arc<dyn TokenStore>) -> Result<T, String>,
) -> Result<T, String> {
    let config = load(path)?;
    let store = crate::open_store(&config, OpenWait::Once).map_err(|e| e.to_string())?;
    block_on(work(store))
}

fn block_on<T>(work: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(work)
}

fn migrate(path: &Path) -> Result<(), String> {
    let config = load(path)?;
    match &config.store.backend {
        StoreBackend::Postgres(settings) => {
            let applied = block_on(async {
                PostgresStore::migrate_only(settings)
                    .await
                    .map_err(|e| e.to_string())
            })?;
            println!("store migrated: {applied} migration(s) applied");
        }
        StoreBackend::Sqlite { .. } => {
            // Opening migrates an embedded store.
            crate::open_store(&config, OpenWait::Once).map_err(|e| e.to_string())?;
            println!("store migrated (embedded store, schema current)");
        }
    }
    Ok(())
}

/// `store copy`: every connection, decrypted with the source's key and sealed with the
/// target's; a progress bar on a terminal, a summary line always.
fn copy(from: &Path, to: &Path) -> Result<(), String> {
    let source_config = load(from)?;
    let target_config = load(to)?;
    let source = crate::open_store(&source_config, OpenWait::Once)
        .map_err(|e| format!("source store: {e}"))?;
    let target = crate::open_store(&target_config, OpenWait::Once)
        .map_err(|e| format!("target store: {e}"))?;
    block_on(async move {
        let summaries = source
            .list()
            .await
            .map_err(|e| format!("source store: {e}"))?;
        let progress = indicatif::ProgressBar::new(summaries.len() as u64);
        progress.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} connections {msg}")
                .map_err(|e| e.to_string())?,
        );
        let (mut written, mut kept, mut vanished) = (0u64, Vec::new(), 0u64);
        for summary in summaries {
            progress.inc(1);
            let Some(connection) = source
                .load(&summary.key)
                .await
                .map_err(|e| format!("source store, connection {}: {e}", summary.key))?
            else {
                vanished += 1; // deleted while copying
                continue;
            };
            match target
                .copy_in(&connection)
                .await
                .map_err(|e| format!("target store, connection {}: {e}", summary.key))?
            {
                CopyOutcome::Written => written += 1,
                CopyOutcome::TargetNewer => kept.push(summary.key),
            }
        }
        progress.finish_and_clear();
        println!(
            "copied {written} connection(s); {} left alone because the target's row is newer; \
             {vanished} deleted during the copy",
            kept.len()
        );
        for key in kept {
            println!("  target newer, not overwritten: {key}");
        }
        Ok(())
    })
}

fn import(path: &Path, key: ConnectionKey) -> Result<(), String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("cannot read the refresh token from stdin: {e}"))?;
    let refresh_token = input.trim();
    if refresh_token.is_empty() || refresh_token.chars().any(char::is_whitespace) {
        return Err("stdin must hold exactly one refresh token".into());
    }
    let new = NewConnection {
        refresh_token: SecretString::from(refresh_token.to_owned()),
        access: None,
        scope: None,
    };
    with_store(path, async |store| {
        let stored = store
            .put_connection(&key, &new, SystemClock.now())
            .await
            .map_err(|e| e.to_string())?;
        println!(
            "stored connection {} (version {})",
            stored.key, stored.version
        );
        Ok(())
    })
}

fn list(path: &Path) -> Result<(), String> {
    with_store(path, async |store| {
        let connections = store.list().await.map_err(|e| e.to_string())?;
        println!(
            "{:<40} {:<16} {:>8} {:>12} {:>12}",
            "connection", "status", "version", "created", "refreshed"
        );
        for c in connections {
            println!(
                "{:<40} {:<16} {:>8} {:>12} {:>12}",
                c.key.as_str(),
                c.status.as_str(),
                c.version,
                c.created_at,
                c.refreshed_at.map_or("-".to_owned(), |t| t.to_string())
            );
        }
        Ok(())
    })
}

/// The counts of a [`KeyStatus`], one line per key id (ids only, never key material).
fn print_key_status(status: &KeyStatus) {
    println!(
        "{} connection(s): {} under the primary key {}, {} to re-encrypt",
        status.current + status.pending,
        status.current,
        status.primary_key_id,
        status.pending
    );
    for (key_id, connections) in &status.by_key_id {
        let role = if *key_id == status.primary_key_id {
            " (primary)"
        } else {
            ""
        };
        println!("  key id {key_id}: {connections} connection(s){role}");
    }
    if status.format1 > 0 {
        println!(
            "  {} connection(s) hold tokens in the older format (sealed under key id {})",
            status.format1, status.check_key_id
        );
    }
    println!("key check sealed under key id {}", status.check_key_id);
}

/// `store key-status`.
fn key_status(path: &Path) -> Result<(), String> {
    with_store(path, async |store| {
        let status = store.key_status().await.map_err(|e| e.to_string())?;
        print_key_status(&status);
        if status.is_complete() {
            println!("nothing to rotate: only the primary key is in use");
        } else {
            println!("run `finx-gateway store rotate-key` to re-encrypt under the primary key");
        }
        Ok(())
    })
}

/// `store rotate-key`: passes of batches until every token is under the primary key, a line
/// of progress at most once a second, the final counts.
fn rotate_key(path: &Path, batch_size: u32) -> Result<(), String> {
    with_store(path, async |store| {
        let before = store.key_status().await.map_err(|e| e.to_string())?;
        println!("before:");
        print_key_status(&before);
        let options = RotationOptions {
            batch_size,
            ..RotationOptions::default()
        };
        let mut last_line = std::time::Instant::now();
        let status = rotation::rotate(store.as_ref(), &options, |progress| {
            if progress.last.next.is_none() || last_line.elapsed() >= Duration::from_secs(1) {
                last_line = std::time::Instant::now();
                println!(
                    "pass {}: {} connection(s) re-encrypted, {} changed meanwhile (retried)",
                    progress.pass, progress.resealed, progress.raced
                );
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        println!("after:");
        print_key_status(&status);
        println!(
            "rotation complete: every token is encrypted under key id {}; previous_keys can now \
             be removed from every config",
            status.primary_key_id
        );
        Ok(())
    })
}
