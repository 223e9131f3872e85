//! The SQLite token store against real files: encryption at rest in the database and its WAL,
//! tamper and wrong-key handling, key loading. The behaviour every store shares is in
//! `store_contract.rs`.

mod support;

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use finx_gateway::secret::SecretRef;
use finx_gateway::store::crypto::{EncryptionKey, KeyError};
use finx_gateway::store::sqlite::{OpenError, SqliteStore};
use finx_gateway::store::{ConnectionKey, StoreError, TokenStore};
use secrecy::ExposeSecret;
use support::fixtures::{grant, new_connection, same_key, user, NOW};
use tempfile::TempDir;

struct Fixture {
    dir: TempDir,
    key: EncryptionKey,
    store: SqliteStore,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = EncryptionKey::generate();
        let store = SqliteStore::open(&dir.path().join("tokens.db"), same_key(&key)).unwrap();
        Self { dir, key, store }
    }

    /// Creates (or replaces) `key` at `NOW` with the standard scope.
    async fn put(
        &self,
        key: &ConnectionKey,
        refresh: &str,
        access: Option<(&str, i64)>,
    ) -> finx_gateway::store::Connection {
        self.store
            .put_connection(key, &new_connection(refresh, access), NOW)
            .await
            .unwrap()
    }

    /// Loads a connection that must exist and decrypt.
    async fn load(&self, key: &ConnectionKey) -> finx_gateway::store::Connection {
        self.store.load(key).await.unwrap().unwrap()
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("tokens.db")
    }

    /// A plain SQLite connection on the same file, standing in for someone editing it.
    fn raw(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.path()).unwrap()
    }

    fn blob(&self, key: &str, column: &str) -> Vec<u8> {
        self.raw()
            .query_row(
                &format!("SELECT {column} FROM connections WHERE key = ?1"),
                [key],
                |row| row.get(0),
            )
            .unwrap()
    }

    fn set_blob(&self, key: &str, column: &str, value: &[u8]) {
        let changed = self
            .raw()
            .execute(
                &format!("UPDATE connections SET {column} = ?1 WHERE key = ?2"),
                rusqlite::params![value, key],
            )
            .unwrap();
        assert_eq!(changed, 1);
    }
}

/// Every form in which a token could leak into a file: the raw text (a prefix and a window from
/// the middle) and its base64 at each of the three byte alignments, standard and URL-safe.
fn leak_needles(token: &str) -> Vec<Vec<u8>> {
    let bytes = token.as_bytes();
    let mut needles = vec![bytes[..24].to_vec(), bytes[1000..1032].to_vec()];
    for offset in 0..3 {
        for encoded in [
            STANDARD.encode(&bytes[offset..]),
            URL_SAFE_NO_PAD.encode(&bytes[offset..]),
        ] {
            needles.push(encoded.as_bytes()[..24].to_vec());
            needles.push(encoded.as_bytes()[1000..1040].to_vec());
        }
    }
    needles
}

fn find_leak(haystack: &[u8], token: &str) -> Option<usize> {
    leak_needles(token).iter().position(|needle| {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_slice())
    })
}

/// A 2000+ character token with no repeating window, so any 24-byte piece of it is unique.
fn canary(kind: &str) -> String {
    let mut token = format!("CANARY-{kind}-");
    let mut i = 0;
    while token.len() < 2100 {
        token.push_str(&format!("{kind}{i:05}."));
        i += 1;
    }
    token
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn leak_detection_finds_raw_and_base64_copies() {
    let token = canary("SELFTEST");
    for offset in 0..3 {
        let mut file = b"junk".to_vec();
        file.extend_from_slice(STANDARD.encode(&token.as_bytes()[offset..]).as_bytes());
        assert!(find_leak(&file, &token).is_some());
    }
    assert!(find_leak(format!("xx{token}xx").as_bytes(), &token).is_some());
    assert!(find_leak(b"nothing here", &token).is_none());
}

#[tokio::test]
async fn tokens_are_encrypted_at_rest_in_the_database_and_the_wal() {
    let fx = Fixture::new();
    let canaries = [
        canary("REFRESH"),
        canary("ACCESS"),
        canary("ROTATED"),
        canary("ACCESS2"),
    ];
    let alice = user("canary-user");
    fx.put(&alice, &canaries[0], Some((&canaries[1], NOW)))
        .await;
    fx.store
        .commit_refresh(
            &alice,
            1,
            &grant(&canaries[3], NOW, Some(&canaries[2])),
            NOW,
        )
        .await
        .unwrap();

    let wal_path = PathBuf::from(format!("{}-wal", fx.path().display()));
    let wal = read(&wal_path);
    // Not vacuous: the rows really are in the WAL (their plaintext key is), just not the tokens.
    assert!(wal.windows(11).any(|w| w == b"canary-user"));
    for (path, bytes) in [(fx.path(), read(&fx.path())), (wal_path, wal)] {
        for token in &canaries {
            assert_eq!(
                find_leak(&bytes, token),
                None,
                "{} leaks a token",
                path.display()
            );
        }
    }

    // After a clean close SQLite checkpoints the WAL into the main file.
    let Fixture { dir, store, .. } = fx;
    drop(store);
    let db = read(&dir.path().join("tokens.db"));
    assert!(db.windows(11).any(|w| w == b"canary-user"));
    for token in &canaries {
        assert_eq!(find_leak(&db, token), None);
    }
}

#[tokio::test]
async fn a_tampered_ciphertext_fails_only_its_own_connection() {
    let fx = Fixture::new();
    let (alice, bob) = (user("alice"), user("bob"));
    for key in [&alice, &bob] {
        fx.put(key, "refresh", Some(("access", NOW))).await;
    }
    let mut tampered = fx.blob("alice", "refresh_token");
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    fx.set_blob("alice", "refresh_token", &tampered);

    let err = fx.store.load(&alice).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(k) if *k == alice),
        "{err}"
    );
    assert!(!err.to_string().contains("refresh"));
    let loaded = fx.load(&bob).await;
    assert_eq!(loaded.refresh_token.expose_secret(), "refresh");
    // Reads neither repair nor delete: the evidence stays for the operator.
    assert_eq!(fx.blob("alice", "refresh_token"), tampered);
    assert_eq!(fx.store.list().await.unwrap().len(), 2);
    // Keeping the unreadable old token is impossible, so such a refresh is refused unwritten.
    let err = fx
        .store
        .commit_refresh(&alice, 1, &grant("a", NOW, None), NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert_eq!(fx.blob("alice", "refresh_token"), tampered);

    // The access token column is authenticated too.
    let mut access = fx.blob("bob", "access_token");
    access[0] ^= 0xff;
    fx.set_blob("bob", "access_token", &access);
    let err = fx.store.load(&bob).await.unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt(k) if *k == bob), "{err}");
}

#[tokio::test]
async fn a_ciphertext_copied_to_another_row_or_column_is_corrupt() {
    let fx = Fixture::new();
    let (alice, bob) = (user("alice"), user("bob"));
    fx.put(&alice, "r-alice", Some(("a-alice", NOW))).await;
    fx.put(&bob, "r-bob", None).await;

    // Into another row: Bob must never be served Alice's token.
    fx.set_blob("bob", "refresh_token", &fx.blob("alice", "refresh_token"));
    let err = fx.store.load(&bob).await.unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt(k) if *k == bob), "{err}");

    // Into another column of the same row.
    fx.set_blob("alice", "access_token", &fx.blob("alice", "refresh_token"));
    let err = fx.store.load(&alice).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(k) if *k == alice),
        "{err}"
    );
}

#[tokio::test]
async fn the_wrong_key_refuses_to_open_and_names_both_key_ids() {
    let fx = Fixture::new();
    let alice = user("alice");
    fx.put(&alice, "r-1", None).await;
    let Fixture { dir, key, store } = fx;
    drop(store);
    let path = dir.path().join("tokens.db");

    let wrong = EncryptionKey::generate();
    let wrong_id = wrong.key_id();
    let wrong_b64 = wrong.to_base64();
    let err = SqliteStore::open(&path, wrong).unwrap_err();
    match &err {
        OpenError::WrongKey {
            expected_key_id,
            given_key_id,
        } => {
            assert_eq!(expected_key_id, &key.key_id());
            assert_eq!(given_key_id, &wrong_id);
        }
        other => panic!("expected WrongKey, got {other}"),
    }
    let message = err.to_string();
    assert!(message.contains("does not match"), "{message}");
    for text in [message, format!("{err:?}")] {
        assert!(text.contains(&key.key_id()), "{text}");
        assert!(text.contains(&wrong_id), "{text}");
        assert!(!text.contains(key.to_base64().expose_secret()));
        assert!(!text.contains(wrong_b64.expose_secret()));
    }

    // Refusing changed nothing: the right key still reads the data.
    let store = SqliteStore::open(&path, same_key(&key)).unwrap();
    let loaded = store.load(&alice).await.unwrap().unwrap();
    assert_eq!(loaded.refresh_token.expose_secret(), "r-1");
}

#[test]
fn key_files_and_variables_load_and_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let key = EncryptionKey::generate();
    let encoded = key.to_base64();

    let file = dir.path().join("key");
    std::fs::write(&file, format!("\n  {}\n", encoded.expose_secret())).unwrap();
    assert_eq!(
        EncryptionKey::from_file(&file).unwrap().key_id(),
        key.key_id()
    );
    assert_eq!(
        EncryptionKey::load(&SecretRef::File(file.clone()))
            .unwrap()
            .key_id(),
        key.key_id()
    );

    // The name is unique to this test and nothing else in this binary reads it.
    let var = "FINX_GATEWAY_STORE_TEST_KEY_5e1f";
    std::env::set_var(var, format!("{}\n", encoded.expose_secret()));
    assert_eq!(EncryptionKey::from_env(var).unwrap().key_id(), key.key_id());
    assert_eq!(
        EncryptionKey::load(&SecretRef::Env(var.into()))
            .unwrap()
            .key_id(),
        key.key_id()
    );
    std::env::remove_var(var);

    let missing_var = "FINX_GATEWAY_STORE_TEST_KEY_NEVER_SET_7c2a";
    let err = EncryptionKey::from_env(missing_var).unwrap_err();
    assert!(matches!(err, KeyError::EnvVarMissing { .. }));
    assert!(err.to_string().contains(missing_var), "{err}");
    assert!(err.to_string().contains("not set"), "{err}");

    let missing_file = dir.path().join("absent");
    let err = EncryptionKey::from_file(&missing_file).unwrap_err();
    assert!(matches!(err, KeyError::FileUnreadable { .. }));
    assert!(err.to_string().contains("absent"), "{err}");

    let bad = dir.path().join("bad");
    let bad_content = "not*base64*SECRETISH-CONTENT";
    std::fs::write(&bad, bad_content).unwrap();
    let err = EncryptionKey::from_file(&bad).unwrap_err();
    assert!(matches!(err, KeyError::BadEncoding { .. }));
    assert!(
        err.to_string().contains("not valid standard base64"),
        "{err}"
    );
    assert!(!format!("{err} {err:?}").contains("SECRETISH"));

    let short = dir.path().join("short");
    let short_content = STANDARD.encode([9u8; 16]);
    std::fs::write(&short, &short_content).unwrap();
    let err = EncryptionKey::from_file(&short).unwrap_err();
    assert!(matches!(err, KeyError::WrongLength { actual: 16, .. }));
    assert!(err.to_string().contains("16 bytes; expected 32"), "{err}");
    assert!(!format!("{err} {err:?}").contains(&short_content));

    let long = STANDARD.encode([9u8; 48]);
    let err = EncryptionKey::from_base64(&long, SecretRef::Env("X".into())).unwrap_err();
    assert!(matches!(err, KeyError::WrongLength { actual: 48, .. }));

    let binary = dir.path().join("binary");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    let err = EncryptionKey::from_file(&binary).unwrap_err();
    assert!(matches!(err, KeyError::BadEncoding { .. }));
}

#[tokio::test]
async fn debug_output_never_shows_tokens_or_keys() {
    let fx = Fixture::new();
    let alice = user("alice");
    let put = fx.put(&alice, "r-SECRET", Some(("a-SECRET", NOW))).await;
    let debug = format!("{put:?} {:?} {:?}", fx.store, fx.key);
    assert!(!debug.contains("SECRET"), "{debug}");
    assert!(!debug.contains(fx.key.to_base64().expose_secret()));
    assert!(debug.contains(&fx.key.key_id()));
    assert_eq!(fx.store.path(), fx.path());
    assert_eq!(fx.store.key_id(), fx.key.key_id());
}
