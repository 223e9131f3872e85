//! The command line: `serve`, `check-config`, `sim`, `demo`, `connections`, `key`, `store`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use pingora::server::RunArgs;
use secrecy::{ExposeSecret, SecretString};

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StoreBackend};
use crate::store::crypto::EncryptionKey;
use crate::store::postgres::{OpenWait, PostgresStore};
use crate::store::{ConnectionKey, CopyOutcome, NewConnection, TokenStore};

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
    },
    /// Run the finX simulator.
    Sim(crate::sim::SimArgs),
    /// Start the simulator and the gateway on loopback with a throwaway store and print curl
    /// commands to try; runs until Ctrl-C.
    Demo(crate::demo::DemoArgs),
    /// Manage stored connections.
    #[command(subcommand)]
    Connections(ConnectionsCommand),
    /// Encryption keys for the token store.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The token store itself: schema migrations, copying between stores.
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
        Command::CheckConfig { config } => check_config(&config),
        Command::Sim(args) => crate::sim::run(args).map_err(|e| e.to_string()),
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
    tracing::info!(listen = %config.listen, upstream = %config.upstream.base_url, upgrade, "finx-gateway serving");
    built.server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    // The listeners are closed and requests drained; a refresh started is a refresh stored.
    let finished = built.tokens.shutdown(crate::shutdown_deadline(&config));
    tracing::info!(refreshes_finished = finished, "finx-gateway stopped");
    Ok(())
}

fn check_config(path: &Path) -> Result<(), String> {
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
