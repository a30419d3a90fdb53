//! The ACME store on disk. One folder per directory URL, so staging, production and other
//! CAs never mix:
//!
//! ```text
//! {storage}/acme/{directory}/account.json        account URL + key (0600)
//! {storage}/acme/{directory}/account.lock        held while the account is created
//! {storage}/acme/{directory}/{hostname}/meta.json the current certificate: files, dates, renewal time
//! {storage}/acme/{directory}/{hostname}/chain-{serial}.pem, key-{serial}.pem
//! {storage}/acme/{directory}/{hostname}/status.json last error, failures, next attempt
//! {storage}/acme/{directory}/{hostname}/pending.json an order being finalized: its URL and key
//! {storage}/acme/{directory}/{hostname}/order.lock held while one replica orders
//! ```
//!
//! Every file is written atomically with mode 0600 in folders of mode 0700 ([`crate::fsutil`]).
//! `meta.json` is the commit point: a new chain and key are written under new names first, and
//! only the rename of `meta.json` switches to them, so a crash between writes leaves the old,
//! consistent pair in use.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::fsutil;
use crate::storage::shared::{Shared, SharedError};
use crate::tls::LoadedCert;

/// A store file that could not be read, parsed or written; always names the path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON for this file: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {source}")]
    Cert {
        path: String,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error("{path}: names `{file}`, which is not a file of this folder")]
    BadFileName { path: String, file: String },
}

/// What `meta.json` records about the certificate currently stored for a hostname.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertMeta {
    pub hostname: String,
    pub directory: String,
    /// File names (in the hostname's folder) of the PEM chain and key.
    pub chain_file: String,
    pub key_file: String,
    pub serial: String,
    pub issuer: String,
    #[serde(with = "humantime_serde")]
    pub not_before: SystemTime,
    #[serde(with = "humantime_serde")]
    pub not_after: SystemTime,
    #[serde(with = "humantime_serde")]
    pub issued_at: SystemTime,
    /// When renewal is due (a random point of the renewal window, chosen once at issuance so
    /// restarts and replicas agree).
    #[serde(with = "humantime_serde")]
    pub renew_at: SystemTime,
    pub order_url: Option<String>,
}

/// What `status.json` records about the last attempts for a hostname (shared by replicas).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostStatus {
    /// The last failure, with the CA's problem detail; `None` after a success.
    pub last_error: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub last_error_at: Option<SystemTime>,
    /// Consecutive failures; drives the backoff.
    #[serde(default)]
    pub failures: u32,
    /// No attempt before this time (backoff after failures), whichever replica tries.
    #[serde(default, with = "humantime_serde")]
    pub next_attempt: Option<SystemTime>,
    /// Set when the latest certificate's dates say this machine's clock is far off the CA's
    /// (a `/readyz` warning); cleared by the next issuance with sane dates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_warning: Option<String>,
}

/// An order about to be finalized whose certificate is not stored yet (`pending.json`, 0600).
/// Written before the CSR is sent, so an attempt cut after that (a crash, a deploy, a timeout
/// while the CA is still processing, a failed write) resumes this order and downloads its
/// certificate instead of ordering again: a second order would burn one of the CA's duplicate
/// certificates and, with ARI, fail with `alreadyReplaced`.
#[derive(Clone, Serialize, Deserialize)]
pub struct PendingOrder {
    pub order_url: String,
    /// The key the CSR is made with (PEM); never logged.
    pub key_pem: String,
    #[serde(with = "humantime_serde")]
    pub finalized_at: SystemTime,
}

impl std::fmt::Debug for PendingOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingOrder").field("order_url", &self.order_url).finish_non_exhaustive()
    }
}

/// A certificate loaded from the store, ready to install.
#[derive(Debug, Clone)]
pub struct StoredCert {
    pub meta: CertMeta,
    pub cert: Arc<LoadedCert>,
    /// The leaf in DER, for ARI's certificate identifier.
    pub leaf_der: Vec<u8>,
}

/// The store folder of one ACME directory, and the shared store it is kept in step with when
/// replicas share one (every method reads and writes the folder; the `share_*` and `sync_*`
/// ones copy between the folder and the shared store, and do nothing without one).
#[derive(Debug, Clone)]
pub struct AcmeStore {
    root: PathBuf,
    directory: String,
    /// `acme/{folder}`: the names of this directory's files in the shared store.
    base: String,
    shared: Option<Arc<Shared>>,
}

impl AcmeStore {
    /// The folder for `directory` under `{storage}/acme/`.
    pub fn new(storage: &Path, directory: &Url) -> AcmeStore {
        let folder = folder_name(directory);
        AcmeStore {
            root: storage.join("acme").join(&folder),
            directory: directory.to_string(),
            base: format!("acme/{folder}"),
            shared: None,
        }
    }

    /// This store kept in step with `shared` (replicas without a shared disk).
    pub fn with_shared(mut self, shared: Option<Arc<Shared>>) -> AcmeStore {
        self.shared = shared;
        self
    }

    /// The shared store, if replicas share one.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// The name in the shared store of `file` in `host`'s folder (`None`: the directory's).
    fn name(&self, host: Option<&str>, file: &str) -> String {
        match host {
            Some(h) => format!("{}/{h}/{file}", self.base),
            None => format!("{}/{file}", self.base),
        }
    }

    /// Copies `host`'s files from the shared store into the folder (another replica may have
    /// renewed). Without a shared store, nothing to do.
    pub async fn sync_host(&self, host: &str) -> Result<(), SharedError> {
        match &self.shared {
            Some(s) => s.pull(&format!("{}/{host}/", self.base)).await.map(drop),
            None => Ok(()),
        }
    }

    /// Copies the account from the shared store into the folder.
    pub async fn sync_account(&self) -> Result<(), SharedError> {
        match &self.shared {
            Some(s) => s.pull_name(&self.name(None, "account.json")).await.map(drop),
            None => Ok(()),
        }
    }

    /// Copies `host`'s newly committed certificate (its `meta.json` `meta`, the pair it names,
    /// and the removal of the pairs in `removed`) to the shared store, only while `owner` holds
    /// the host's order lock. False: the lock was lost, and the shared store keeps what the
    /// next holder wrote.
    pub async fn share_cert(
        &self,
        host: &str,
        owner: &str,
        meta: &CertMeta,
        removed: &[String],
    ) -> Result<bool, SharedError> {
        let Some(s) = &self.shared else { return Ok(true) };
        let mut names: Vec<String> =
            [&meta.key_file, &meta.chain_file].iter().map(|f| self.name(Some(host), f)).collect();
        names.extend(removed.iter().map(|f| self.name(Some(host), f)));
        names.push(self.name(Some(host), "meta.json"));
        s.push_fenced(&names, &self.name(None, &Self::order_lock(host)), owner).await
    }

    /// Copies `host`'s pending order (or its removal) to the shared store under the order lock.
    pub async fn share_pending(&self, host: &str, owner: &str) -> Result<bool, SharedError> {
        let Some(s) = &self.shared else { return Ok(true) };
        let names = [self.name(Some(host), "pending.json")];
        s.push_fenced(&names, &self.name(None, &Self::order_lock(host)), owner).await
    }

    /// Copies `host`'s attempt record to the shared store (every replica may write it).
    pub async fn share_status(&self, host: &str) -> Result<(), SharedError> {
        match &self.shared {
            Some(s) => s.push(&self.name(Some(host), "status.json"), None).await,
            None => Ok(()),
        }
    }

    /// Copies the account to the shared store under the account lock.
    pub async fn share_account(&self, owner: &str) -> Result<bool, SharedError> {
        let Some(s) = &self.shared else { return Ok(true) };
        s.push_fenced(&[self.name(None, "account.json")], &self.name(None, Self::ACCOUNT_LOCK), owner).await
    }

    /// The directory folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory URL this folder belongs to.
    pub fn directory(&self) -> &str {
        &self.directory
    }

    pub fn account_path(&self) -> PathBuf {
        self.root.join("account.json")
    }

    pub fn account_lock_path(&self) -> PathBuf {
        self.root.join("account.lock")
    }

    /// The locks of this directory's relays: in the shared store when replicas share one,
    /// else files in this folder (`account.lock`, `{hostname}/order.lock`).
    pub fn locks(&self) -> Arc<dyn super::lock::Locks> {
        match &self.shared {
            Some(s) => Arc::new(super::lock::SharedLocks::new(s.clone(), &self.base)),
            None => Arc::new(super::lock::FileLocks::new(&self.root)),
        }
    }

    /// The name of the lock held while ordering for `host`.
    pub fn order_lock(host: &str) -> String {
        format!("{host}/order")
    }

    /// The name of the lock held while creating the account.
    pub const ACCOUNT_LOCK: &str = "account";

    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.root.join(host)
    }

    pub fn order_lock_path(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("order.lock")
    }

    fn meta_path(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("meta.json")
    }

    fn status_path(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("status.json")
    }

    fn pending_path(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("pending.json")
    }

    /// The order of `host` being finalized, if an attempt was cut before storing its result.
    pub fn load_pending(&self, host: &str) -> Result<Option<PendingOrder>, StoreError> {
        read_json(&self.pending_path(host))
    }

    pub fn save_pending(&self, host: &str, pending: &PendingOrder) -> Result<(), StoreError> {
        write_json(&self.pending_path(host), pending)
    }

    /// Forgets the pending order (its certificate is stored, or the CA no longer knows it).
    pub fn clear_pending(&self, host: &str) {
        let path = self.pending_path(host);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the record of a finished order");
        }
    }

    /// The stored account credentials, `None` when there is no account yet.
    pub fn load_account(&self) -> Result<Option<instant_acme::AccountCredentials>, StoreError> {
        read_json(&self.account_path())
    }

    pub fn save_account(&self, creds: &instant_acme::AccountCredentials) -> Result<(), StoreError> {
        write_json(&self.account_path(), creds)
    }

    /// The stored certificate for `host`; `None` when there is none. A torn or corrupt store
    /// is an error that names the file (the caller orders afresh).
    pub fn load_cert(&self, host: &str) -> Result<Option<StoredCert>, StoreError> {
        // A replica may swap the files between our reads of meta.json and of the PEM files:
        // read meta.json again once when a named file has just gone.
        for attempt in 0..2 {
            let Some(meta) = read_json::<CertMeta>(&self.meta_path(host))? else {
                return Ok(None);
            };
            match self.load_files(host, &meta) {
                Err(StoreError::Io { source, .. }) if attempt == 0 && source.kind() == std::io::ErrorKind::NotFound => {
                    continue;
                }
                r => return r.map(Some),
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    fn load_files(&self, host: &str, meta: &CertMeta) -> Result<StoredCert, StoreError> {
        let dir = self.host_dir(host);
        let meta_path = self.meta_path(host).display().to_string();
        for f in [&meta.chain_file, &meta.key_file] {
            if !plain_name(f) {
                return Err(StoreError::BadFileName { path: meta_path, file: f.clone() });
            }
        }
        let chain_path = dir.join(&meta.chain_file);
        let key_path = dir.join(&meta.key_file);
        let chain = read(&chain_path)?;
        let key = read(&key_path)?;
        let what = chain_path.display().to_string();
        let cert = LoadedCert::from_pem(&what, &chain, &key)
            .map_err(|source| StoreError::Cert { path: what.clone(), source })?;
        let leaf_der = cert.key.cert.first().map(|c| c.to_vec()).unwrap_or_default();
        Ok(StoredCert { meta: meta.clone(), cert: Arc::new(cert), leaf_der })
    }

    /// Writes a new chain and key, then commits them by replacing `meta.json`; afterwards the
    /// chain and key the previous `meta.json` named are removed. Nothing else is: files this
    /// commit did not replace may be another writer's pair, written but not yet committed.
    /// Returns the files it removed.
    pub fn save_cert(
        &self,
        host: &str,
        chain_pem: &str,
        key_pem: &str,
        meta: &CertMeta,
    ) -> Result<Vec<String>, StoreError> {
        let dir = self.host_dir(host);
        let previous = read_json::<CertMeta>(&self.meta_path(host)).ok().flatten();
        write(&dir.join(&meta.key_file), key_pem.as_bytes())?;
        write(&dir.join(&meta.chain_file), chain_pem.as_bytes())?;
        write_json(&self.meta_path(host), meta)?;
        let mut removed = Vec::new();
        if let Some(old) = previous {
            for f in [&old.chain_file, &old.key_file] {
                let ours = *f == meta.chain_file || *f == meta.key_file;
                if !ours && plain_name(f) {
                    let _ = std::fs::remove_file(dir.join(f));
                    removed.push(f.clone());
                }
            }
        }
        Ok(removed)
    }

    /// The shared attempt record of `host` (empty when missing or unreadable).
    pub fn load_status(&self, host: &str) -> HostStatus {
        read_json(&self.status_path(host)).ok().flatten().unwrap_or_default()
    }

    pub fn save_status(&self, host: &str, status: &HostStatus) -> Result<(), StoreError> {
        write_json(&self.status_path(host), status)
    }
}

/// A readable, unique folder name for a directory URL: `acme-v02.api.letsencrypt.org-directory`,
/// `127.0.0.1_14000-dir`.
pub fn folder_name(directory: &Url) -> String {
    let mut name = directory.host_str().unwrap_or("directory").to_string();
    if let Some(port) = directory.port() {
        name.push_str(&format!("_{port}"));
    }
    for seg in directory.path().split('/').filter(|s| !s.is_empty()) {
        name.push('-');
        name.push_str(seg);
    }
    name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' }).collect()
}

/// A file name of the hostname's folder itself (no path, not hidden): all `meta.json` may name.
fn plain_name(f: &str) -> bool {
    !f.is_empty() && !f.contains('/') && !f.starts_with('.')
}

fn read(path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::Io { path: path.display().to_string(), source })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    fsutil::write_private(path, bytes).map_err(|source| StoreError::Io { path: path.display().to_string(), source })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Io { path: path.display().to_string(), source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StoreError::Json { path: path.display().to_string(), source })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|source| StoreError::Json { path: path.display().to_string(), source })?;
    bytes.push(b'\n');
    write(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_keep_cas_apart() {
        let le = Url::parse("https://acme-v02.api.letsencrypt.org/directory").unwrap();
        let staging = Url::parse("https://acme-staging-v02.api.letsencrypt.org/directory").unwrap();
        let pebble = Url::parse("https://127.0.0.1:14000/dir").unwrap();
        assert_eq!(folder_name(&le), "acme-v02.api.letsencrypt.org-directory");
        assert_eq!(folder_name(&staging), "acme-staging-v02.api.letsencrypt.org-directory");
        assert_eq!(folder_name(&pebble), "127.0.0.1_14000-dir");
    }
}
