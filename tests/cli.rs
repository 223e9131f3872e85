//! The binary's commands, run as a process: config checking, key handling, imports.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use finx_gateway::store::crypto::EncryptionKey;
use secrecy::ExposeSecret;
use support::process::ProcessSetup;

fn gateway(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_finx-gateway"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    if let Some(input) = stdin {
        // The command may refuse its arguments before reading stdin: a broken pipe is fine.
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A valid config (an unreachable finX, an embedded store) in the setup's directory.
fn write_config(setup: &ProcessSetup, extra: &str) -> std::path::PathBuf {
    let listen = "127.0.0.1:0".parse().unwrap();
    setup.config("gateway", listen, ProcessSetup::sqlite_store(), extra)
}

/// Keys and secret files for a config, in a directory of their own.
fn setup() -> ProcessSetup {
    ProcessSetup::new("http://127.0.0.1:9".into())
}

#[test]
fn check_config_reports_every_error_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[listener]
address = "not-an-address"
[upstream]
base_url = "http://api.example"
[client]
secret = { env = "FINX_TEST_SURELY_UNSET_VARIABLE" }
[store]
encryption_key = { file = "missing.key" }
[tokens]
cache_capacity = 0
"#,
    )
    .unwrap();
    let output = gateway(&["check-config", path.to_str().unwrap()], None);
    assert!(!output.status.success());
    let report = text(&output);
    for problem in [
        "listener.address",
        "allow_insecure_http",
        "client.id",
        "store.path",
        "cache_capacity",
        "callers",
    ] {
        assert!(
            report.contains(problem),
            "{problem} missing from:\n{report}"
        );
    }
    // Secrets are read only once the file itself is right (the second step).
    assert!(
        !report.contains("FINX_TEST_SURELY_UNSET_VARIABLE"),
        "{report}"
    );
}

#[test]
fn check_config_resolves_secrets_in_a_second_step_that_offline_skips() {
    let setup = setup();
    let path = write_config(&setup, "");
    let config = std::fs::read_to_string(&path).unwrap();
    // A file that is right in itself, naming a secret that is not there.
    let broken = config.replace("client-secret", "no-such-secret-file");
    assert_ne!(
        broken, config,
        "the test config names its client secret file"
    );
    std::fs::write(&path, broken).unwrap();

    let online = gateway(&["check-config", path.to_str().unwrap()], None);
    assert!(!online.status.success());
    assert!(
        text(&online).contains("no-such-secret-file"),
        "{}",
        text(&online)
    );

    let offline = gateway(&["check-config", "--offline", path.to_str().unwrap()], None);
    assert!(offline.status.success(), "{}", text(&offline));
    assert!(text(&offline).contains("OK offline"), "{}", text(&offline));

    // Offline resolves no address: a host no DNS knows (`.invalid` never resolves) passes
    // offline and fails the full check.
    let unresolvable = config.replace("http://127.0.0.1:9", "http://finx-upstream.invalid:9");
    assert_ne!(unresolvable, config, "the test config names its upstream");
    std::fs::write(&path, unresolvable).unwrap();
    let offline = gateway(&["check-config", "--offline", path.to_str().unwrap()], None);
    assert!(offline.status.success(), "{}", text(&offline));
    let online = gateway(&["check-config", path.to_str().unwrap()], None);
    assert!(!online.status.success(), "{}", text(&online));
    assert!(text(&online).contains("upstream"), "{}", text(&online));

    // Offline still finds every mistake in the file itself.
    std::fs::write(&path, "[tokens]\ncache_capacity = 0\n").unwrap();
    let offline = gateway(&["check-config", "--offline", path.to_str().unwrap()], None);
    assert!(!offline.status.success());
    assert!(
        text(&offline).contains("cache_capacity"),
        "{}",
        text(&offline)
    );
}

#[test]
fn check_config_accepts_the_shipped_examples_shape() {
    let setup = setup();
    let path = write_config(&setup, "");
    let output = gateway(&["check-config", path.to_str().unwrap()], None);
    assert!(output.status.success(), "{}", text(&output));
}

#[test]
fn unknown_keys_and_inline_secrets_are_refused() {
    let setup = setup();
    let path = write_config(&setup, "[tokens]\nrefresh_skeww = \"60s\"");
    let output = gateway(&["check-config", path.to_str().unwrap()], None);
    assert!(!output.status.success());
    assert!(text(&output).contains("refresh_skeww"), "{}", text(&output));
}

#[test]
fn trusted_local_is_refused_on_a_public_listener() {
    let setup = setup();
    let path = write_config(&setup, "");
    let config = std::fs::read_to_string(&path)
        .unwrap()
        .replace("127.0.0.1:0", "0.0.0.0:8080")
        .replace(
            "[callers]",
            "[callers]\nmode = \"trusted-local\"\ntrusted_local = { service = \"svc\" }",
        );
    std::fs::write(&path, config).unwrap();
    let output = gateway(&["check-config", path.to_str().unwrap()], None);
    assert!(!output.status.success());
    assert!(text(&output).contains("loopback"), "{}", text(&output));

    let local = std::fs::read_to_string(&path)
        .unwrap()
        .replace("0.0.0.0:8080", "127.0.0.1:8080");
    std::fs::write(&path, local).unwrap();
    let output = gateway(&["check-config", path.to_str().unwrap()], None);
    assert!(output.status.success(), "{}", text(&output));
}

#[test]
fn import_stores_a_refresh_token_that_list_never_shows() {
    let setup = setup();
    let path = write_config(&setup, "");
    let token = "CANARY-IMPORTED-REFRESH-TOKEN-".repeat(70);
    let output = gateway(
        &[
            "connections",
            "import",
            "--config",
            path.to_str().unwrap(),
            "--user",
            "alice",
        ],
        Some(&format!("{token}\n")),
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains(&token));

    let output = gateway(
        &["connections", "list", "--config", path.to_str().unwrap()],
        None,
    );
    assert!(output.status.success(), "{}", text(&output));
    let listing = text(&output);
    assert!(
        listing.contains("alice") && listing.contains("active"),
        "{listing}"
    );
    assert!(!listing.contains("CANARY"));

    // Bad input is refused and stores nothing.
    let output = gateway(
        &[
            "connections",
            "import",
            "--config",
            path.to_str().unwrap(),
            "--user",
            "bad user",
        ],
        Some("token"),
    );
    assert!(!output.status.success());
    let output = gateway(
        &[
            "connections",
            "import",
            "--config",
            path.to_str().unwrap(),
            "--user",
            "bob",
        ],
        Some("two tokens"),
    );
    assert!(!output.status.success());
}

#[test]
fn a_wrong_key_refuses_to_start_with_a_clear_message() {
    let setup = setup();
    let dir = &setup.dir;
    let path = write_config(&setup, "");
    let output = gateway(
        &[
            "connections",
            "import",
            "--config",
            path.to_str().unwrap(),
            "--user",
            "alice",
        ],
        Some("REFRESH"),
    );
    assert!(output.status.success(), "{}", text(&output));
    let new_key = EncryptionKey::generate().to_base64();
    std::fs::write(dir.path().join("store.key"), new_key.expose_secret()).unwrap();

    for args in [
        vec!["connections", "list", "--config", path.to_str().unwrap()],
        vec!["serve", "--config", path.to_str().unwrap()],
    ] {
        let output = gateway(&args, None);
        assert!(!output.status.success());
        let message = text(&output);
        assert!(message.contains("does not match"), "{message}");
        assert!(!message.contains(new_key.expose_secret()));
    }
}

#[test]
fn key_generate_prints_a_usable_key() {
    let output = gateway(&["key", "generate"], None);
    assert!(output.status.success());
    let key = String::from_utf8(output.stdout).unwrap();
    assert!(EncryptionKey::from_base64(
        key.trim(),
        finx_gateway::secret::SecretRef::Env("stdout".into())
    )
    .is_ok());
}

#[test]
fn shipped_sample_configs_are_valid() {
    // The example names production paths and variables: it must at least parse with every key
    // known.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.example.toml");
    finx_gateway::config::Config::read_file(&example).expect("example parses");

    // The demo config validates completely once its environment variables are set.
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_finx-gateway"))
        .args(["check-config", demo.to_str().unwrap()])
        .env(
            "FINX_GATEWAY_KEY",
            EncryptionKey::generate().to_base64().expose_secret(),
        )
        .env(
            "FINX_DEMO_CALLER_KEY",
            EncryptionKey::generate().to_base64().expose_secret(),
        )
        .env(
            "FINX_DEMO_STATE_KEY",
            EncryptionKey::generate().to_base64().expose_secret(),
        )
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
}

#[test]
fn previous_keys_are_checked_offline_and_loaded_online_like_the_encryption_key() {
    let setup = setup();
    let listen = "127.0.0.1:0".parse().unwrap();
    let store = |previous: &str| {
        format!(
            "encryption_key = {{ file = \"store.key\" }}\nprevious_keys = {previous}\n{}",
            ProcessSetup::sqlite_store()
        )
    };
    // Paths are relative to the config's directory; a missing one is reported by name, after
    // the offline check (which reads nothing) passed.
    let missing = setup.config(
        "missing",
        listen,
        &store("[{ file = \"old.key\" }, { env = \"FINX_TEST_UNSET_PREVIOUS_KEY\" }]"),
        "",
    );
    let offline = gateway(
        &["check-config", "--offline", missing.to_str().unwrap()],
        None,
    );
    assert!(offline.status.success(), "{}", text(&offline));
    let online = gateway(&["check-config", missing.to_str().unwrap()], None);
    let message = text(&online);
    assert!(!online.status.success());
    assert!(message.contains("store.previous_keys[0]"), "{message}");
    assert!(message.contains("old.key"), "{message}");
    assert!(message.contains("store.previous_keys[1]"), "{message}");
    assert!(
        message.contains("FINX_TEST_UNSET_PREVIOUS_KEY"),
        "{message}"
    );

    let old = EncryptionKey::generate().to_base64();
    std::fs::write(setup.dir.path().join("old.key"), old.expose_secret()).unwrap();
    let valid = setup.config("valid", listen, &store("[{ file = \"old.key\" }]"), "");
    let output = gateway(&["check-config", valid.to_str().unwrap()], None);
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains(old.expose_secret()));
    std::fs::write(setup.dir.path().join("old.key"), "not a key").unwrap();
    let output = gateway(&["check-config", valid.to_str().unwrap()], None);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("store.previous_keys[0]"),
        "{}",
        text(&output)
    );
}
