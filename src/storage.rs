//! The certificate store folder as a whole: its format version. An upgrade that changes the
//! layout migrates the folder and bumps the number; a rollback to an older binary then stops
//! with a clear message instead of misreading newer files.
//!
//! `{storage}/store-version` holds one number. A store without the file is a version-1 store
//! (the layout this number was introduced with) and gets the file on first use.
//!
//! Replicas that share no disk share the store on Redis: [`redis`] speaks to the server (values,
//! locks, fenced writes, the change feed), [`shared`] keeps each replica's folder in step with it.

pub mod redis;
pub mod shared;

use std::path::{Path, PathBuf};

use crate::config::{Config, TlsSource};
use crate::fsutil;

/// The layout this binary reads and writes: `self-signed/{site}.crt|.key` and
/// `acme/{directory}/...` as described in `acme::store`.
pub const FORMAT_VERSION: u32 = 1;

const VERSION_FILE: &str = "store-version";

/// Why the store cannot be used by this binary.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: refusing to use the certificate store: {source}")]
    Exposed {
        path: String,
        #[source]
        source: fsutil::Exposure,
    },
    #[error("{path}: `{found}` is not a store format version (a number such as {FORMAT_VERSION})")]
    Garbled { path: String, found: String },
    #[error(
        "{path}: the certificate store has format version {found}, written by a newer oauth-relay; \
         this one understands up to {FORMAT_VERSION}. Run the newer binary again, or restore the \
         backup of the store taken before the upgrade (see README, Upgrades and rollbacks)"
    )]
    Newer { path: String, found: u32 },
}

/// Whether any site keeps state in the store (self-signed and ACME sources do; `files` do not).
pub fn needed(config: &Config) -> bool {
    config.sites.iter().any(|s| !matches!(s.tls, TlsSource::Files { .. }))
}

/// Checks the store's format version, recording it when the file is missing. Does nothing for a
/// configuration that keeps no state in the store. Returns the version found.
pub fn check(config: &Config) -> Result<Option<u32>, StorageError> {
    if !needed(config) {
        return Ok(None);
    }
    check_folder(&config.server.storage).map(Some)
}

/// [`check`] for one folder: its privacy (see [`secure`]), then its format version.
pub fn check_folder(storage: &Path) -> Result<u32, StorageError> {
    secure(storage)?;
    let path = storage.join(VERSION_FILE);
    let shown = || path.display().to_string();
    let found = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let t = text.trim();
            t.parse::<u32>()
                .map_err(|_| StorageError::Garbled { path: shown(), found: t.chars().take(20).collect() })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
        Err(source) => return Err(StorageError::Io { path: shown(), source }),
    };
    if found > FORMAT_VERSION {
        return Err(StorageError::Newer { path: shown(), found });
    }
    // Migrations from older formats go here, each bumping the number it leaves behind.
    if found < FORMAT_VERSION || !path.exists() {
        write(&path)?;
    }
    Ok(found)
}

/// How deep [`secure`] looks: `acme/{directory}/{hostname}/{file}` and
/// `acme/challenges/{kind}/{file}` are four levels below the store.
const MAX_DEPTH: usize = 4;

/// Checks the store folder and everything in it, as ssh checks `~/.ssh`: every folder and file
/// owned by the relay's user (or root) and writable by no one else, else start is refused with
/// the path and what to do. Folders and files others can merely read are tightened to 0700 and
/// 0600 (logged). Symlinks to folders are judged by their target; a symlink to anything else is
/// refused (the store never writes one). A missing store is created, mode 0700.
pub fn secure(storage: &Path) -> Result<(), StorageError> {
    let io = |p: &Path, source| StorageError::Io { path: p.display().to_string(), source };
    fsutil::private_dir(storage).map_err(|e| io(storage, e))?;
    walk(
        storage,
        |path, dir| if dir { fsutil::secure_dir(path) } else { fsutil::secure_file(path) },
        &mut |path, mode| {
            tracing::warn!(path = %path.display(), was = %format!("{mode:04o}"), "other users could read this store path; its mode is now private");
        },
    )
}

/// What [`secure`] would say of an existing store, changing nothing (for `doctor`): the
/// refusal, or the paths it would make private with their present modes.
pub fn audit(storage: &Path) -> Result<Vec<(PathBuf, u32)>, StorageError> {
    let mut opened = Vec::new();
    walk(storage, fsutil::inspect, &mut |path, mode| opened.push((path.to_path_buf(), mode)))?;
    Ok(opened)
}

/// Judges `storage` and everything in it with `check` (a folder when its flag is set), down
/// to [`MAX_DEPTH`]; `tightened` hears of each path whose mode was (or would be) narrowed.
fn walk(
    storage: &Path,
    check: impl Fn(&Path, bool) -> Result<fsutil::Checked, fsutil::Exposure>,
    tightened: &mut dyn FnMut(&Path, u32),
) -> Result<(), StorageError> {
    let io = |p: &Path, source| StorageError::Io { path: p.display().to_string(), source };
    let mut pending = vec![(storage.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = pending.pop() {
        judge(&dir, check(&dir, true), tightened)?;
        if depth >= MAX_DEPTH {
            continue;
        }
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let path = entry.map_err(|e| io(&dir, e))?.path();
            if std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
                pending.push((path, depth + 1));
            } else {
                judge(&path, check(&path, false), tightened)?;
            }
        }
    }
    Ok(())
}

fn judge(
    path: &Path,
    checked: Result<fsutil::Checked, fsutil::Exposure>,
    tightened: &mut dyn FnMut(&Path, u32),
) -> Result<(), StorageError> {
    match checked {
        Ok(fsutil::Checked::AlreadyPrivate) => Ok(()),
        Ok(fsutil::Checked::Tightened(mode)) => {
            tightened(path, mode);
            Ok(())
        }
        // Gone between listing and judging (a replica renamed a temp file): nothing to judge.
        Err(fsutil::Exposure::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StorageError::Exposed { path: path.display().to_string(), source }),
    }
}

fn write(path: &Path) -> Result<(), StorageError> {
    fsutil::write_private(path, format!("{FORMAT_VERSION}\n").as_bytes())
        .map_err(|source| StorageError::Io { path: path.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_store_gets_the_current_version_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_folder(dir.path()).unwrap(), 1);
        assert_eq!(std::fs::read_to_string(dir.path().join(VERSION_FILE)).unwrap(), "1\n");
        assert_eq!(check_folder(dir.path()).unwrap(), 1, "an existing version-1 store is accepted");

        std::fs::write(dir.path().join(VERSION_FILE), "2\n").unwrap();
        let e = check_folder(dir.path()).unwrap_err().to_string();
        assert!(e.contains("store-version: the certificate store has format version 2"), "{e}");
        assert!(e.contains("understands up to 1"), "{e}");

        std::fs::write(dir.path().join(VERSION_FILE), "two").unwrap();
        let e = check_folder(dir.path()).unwrap_err().to_string();
        assert!(e.ends_with("store-version: `two` is not a store format version (a number such as 1)"), "{e}");
    }
}
