//! The serving lock: one process per embedded store, one per journal on the shared store.

use std::path::PathBuf;

use super::StartError;
use crate::config::{Config, StoreBackend};

/// Proof that this process is the one serving an embedded store (SQLite is for one gateway
/// process, because two would refresh the same connections without knowing of each other) or,
/// on the shared store, the one using its journal. Operator commands (`connections import`,
/// `list`) open the store without it.
pub struct ServingLock {
    file: std::fs::File,
    /// The processes that held this lock before (their ids as written by
    /// [`ServingLock::record_owner`]): every one of them has stopped, so a refresh intent they
    /// left is a crash, never a refresh still in flight.
    pub predecessors: Vec<String>,
}

/// How many earlier owners the lock file remembers.
const REMEMBERED_OWNERS: usize = 64;

impl ServingLock {
    fn taken(mut file: std::fs::File) -> Self {
        use std::io::Read;
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let mut predecessors: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && line.len() <= 64)
            .map(str::to_owned)
            .collect();
        let keep_from = predecessors.len().saturating_sub(REMEMBERED_OWNERS - 1);
        predecessors.drain(..keep_from);
        Self { file, predecessors }
    }

    /// Adds this process (`owner`) to the lock file's list, for whoever takes the lock next.
    pub fn record_owner(&mut self, owner: &str) {
        use std::io::{Seek, Write};
        let mut text = self.predecessors.join("\n");
        text.push('\n');
        text.push_str(owner);
        text.push('\n');
        let written = self
            .file
            .set_len(0)
            .and_then(|()| self.file.seek(std::io::SeekFrom::Start(0)))
            .and_then(|_| self.file.write_all(text.as_bytes()))
            .and_then(|()| self.file.sync_data());
        if let Err(error) = written {
            tracing::warn!(%error, "could not record this process in the serving lock file");
        }
    }
}

/// The serving lock's file: `<store>.lock` for the embedded store, `<journal>.lock` for the
/// shared one (each replica needs a journal of its own).
fn serving_lock_file(config: &Config) -> Result<(std::fs::File, PathBuf), StartError> {
    let locked = match &config.store.backend {
        StoreBackend::Sqlite { path } => path,
        StoreBackend::Postgres(_) => &config.store.journal,
    };
    let mut path = locked.clone().into_os_string();
    path.push(".lock");
    let path = PathBuf::from(path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| StartError::ServingLockFile {
            path: path.clone(),
            source,
        })?;
    Ok((file, path))
}

/// Takes the serving lock, or says which store (or journal) is already served.
pub fn lock_store_for_serving(config: &Config) -> Result<ServingLock, StartError> {
    let (file, path) = serving_lock_file(config)?;
    match file.try_lock() {
        Ok(()) => Ok(ServingLock::taken(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::AlreadyServed {
            store: config.store.describe(),
            lock: path,
        }),
        Err(std::fs::TryLockError::Error(source)) => {
            Err(StartError::ServingLockFile { path, source })
        }
    }
}

/// For a graceful upgrade (`serve --upgrade`): the old process still holds the serving lock
/// while it drains, so the new one serves stored tokens at once and refreshes only once the
/// lock is its own. The receiver turns `true` then; the lock is held until the process exits.
pub fn lock_store_after_upgrade(
    config: &Config,
) -> Result<tokio::sync::watch::Receiver<bool>, StartError> {
    let (file, path) = serving_lock_file(config)?;
    let (acquired, receiver) = tokio::sync::watch::channel(false);
    std::thread::Builder::new()
        .name("finx-serving-lock".into())
        .spawn(move || match file.lock() {
            Ok(()) => {
                tracing::info!(lock = %path.display(), "serving lock taken over; refreshing resumes");
                let _ = acquired.send(true);
                // Held for the rest of the process's life.
                std::mem::forget(file);
            }
            Err(e) => tracing::error!(lock = %path.display(), error = %e, "cannot take the serving lock; this process will not refresh"),
        })
        .map_err(StartError::Thread)?;
    Ok(receiver)
}
