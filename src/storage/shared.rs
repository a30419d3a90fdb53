//! A store replicas share through Redis, as this replica sees it: its own folder (the cache)
//! holds every file the relay reads, exactly as a folder store would, and this module keeps
//! that folder and Redis in step.
//!
//! - **Pull**: a name another replica wrote is copied from Redis into the folder (private keys
//!   opened with the storage key), `meta.json` last, so the folder never names a pair it does
//!   not hold. A follower task pulls what the change feed announces, and everything now and
//!   then in case a message was lost; tasks that read the folder are woken after each pull.
//! - **Push**: what this replica wrote to its folder goes to Redis, private keys sealed; a
//!   certificate under the writer's order lock, checked in the same script (fencing).
//!
//! Serving never waits for Redis: handshakes and requests read memory, `/readyz` and
//! `cert status` read the folder. While Redis is away the replica keeps serving what the
//! folder holds, orders nothing (the locks live in Redis) and says so in `/readyz`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::redis::{RedisStore, RedisStoreError, Taken};
use crate::config::RedisStorage;
use crate::fsutil;
use crate::seal::{Protection, SealError};

/// How often everything is pulled even when the change feed is quiet.
const FULL_PULL_EVERY: Duration = Duration::from_secs(60);
/// The longest wait between two tries to reach Redis.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Why a pull or push did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("the shared store is unreachable: {0}")]
    Unreachable(String),
    #[error(transparent)]
    Redis(#[from] RedisStoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{0}` cannot name a file of the store")]
    BadName(String),
}

/// Why `store copy` refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{store} already holds a store ({names} names): copy into an empty one")]
    NotEmpty { store: String, names: usize },
    #[error(transparent)]
    Shared(#[from] SharedError),
}

/// The shared store of one relay process.
pub struct Shared {
    settings: RedisStorage,
    root: PathBuf,
    protection: Protection,
    conn: ArcSwapOption<RedisStore>,
    /// Bumped after each pull that changed the folder.
    changed: watch::Sender<u64>,
    /// Since when, and why, Redis could not be reached (`None`: reachable).
    outage: Mutex<Option<(SystemTime, String)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("url", &self.settings.url.as_str()).field("root", &self.root).finish()
    }
}

/// Whether a store name holds a secret: private keys, the ACME account (its key), a pending
/// order (its key). These are sealed in Redis when a storage key is set.
pub fn is_secret(name: &str) -> bool {
    let file = name.rsplit('/').next().unwrap_or(name);
    file == "account.json"
        || file == "pending.json"
        || file == "tickets.json"
        || file.starts_with("key-")
        || file.ends_with(".key")
}

/// Sorts store names so each `meta.json` (the commit point of a certificate) comes after the
/// files it names: written in this order, a folder never names a pair it does not hold.
fn commit_order(names: &mut [String]) {
    names.sort_by_key(|n| (n.ends_with("/meta.json"), n.clone()));
}

/// A name the folder may hold: relative, plain segments (no `..`, no hidden files).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('/').all(|s| !s.is_empty() && !s.starts_with('.') && s.bytes().all(|b| b.is_ascii_graphic()))
}

/// The shared store `config` names, if any (not connected yet), with its storage key loaded;
/// `previous` is kept when it is the same server and folder (a reload keeps its connection).
pub fn open(config: &crate::config::Config, previous: Option<&Arc<Shared>>) -> Result<Option<Arc<Shared>>, SealError> {
    let Some(settings) = &config.server.shared else { return Ok(None) };
    if let Some(p) = previous.filter(|p| p.same_as(settings, &config.server.storage)) {
        return Ok(Some(p.clone()));
    }
    open_at(config, settings, &config.server.storage).map(Some)
}

/// The shared store `settings` (of `config`), mirrored in `folder`: the cache, or for
/// `store copy` the folder a store is copied from or to.
pub fn open_at(
    config: &crate::config::Config,
    settings: &RedisStorage,
    folder: &Path,
) -> Result<Arc<Shared>, SealError> {
    let protection = match &config.server.storage_key_file {
        Some(file) => Protection::Sealed(crate::seal::Sealer::load(file)?),
        None => Protection::Clear,
    };
    Ok(Shared::new(settings.clone(), folder.to_path_buf(), protection))
}

impl Shared {
    /// The shared store behind `settings`, mirrored in the folder `root`; not connected yet.
    pub fn new(settings: RedisStorage, root: PathBuf, protection: Protection) -> Arc<Shared> {
        let (changed, _) = watch::channel(0);
        Arc::new(Shared {
            settings,
            root,
            protection,
            conn: ArcSwapOption::empty(),
            changed,
            outage: Mutex::new(Some((SystemTime::now(), "not connected yet".into()))),
        })
    }

    /// Whether this is the same server and folder as `other` (a reload keeps the connection).
    pub fn same_as(&self, settings: &RedisStorage, root: &Path) -> bool {
        self.settings == *settings && self.root == root
    }

    /// The folder this replica keeps its copy of the store in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Wakes after every pull that changed the folder.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Since when and why Redis is unreachable, for `/readyz`; `None` while it answers.
    pub fn outage(&self) -> Option<(SystemTime, String)> {
        self.outage.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_outage(&self, why: Option<String>) {
        let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        match (why, outage.is_some()) {
            (None, true) => {
                tracing::info!(url = %self.settings.url, "the shared store is reachable");
                *outage = None;
            }
            (Some(why), false) => {
                tracing::warn!(url = %self.settings.url, error = %why, "the shared store is unreachable; serving what this replica holds");
                *outage = Some((SystemTime::now(), why));
            }
            (Some(why), true) => {
                if let Some((_, was)) = outage.as_mut() {
                    *was = why;
                }
            }
            (None, false) => {}
        }
    }

    /// The connection, made now if there is none (one try, bounded by the connect timeout).
    pub async fn redis(&self) -> Result<Arc<RedisStore>, SharedError> {
        if let Some(conn) = self.conn.load_full() {
            return Ok(conn);
        }
        match RedisStore::connect(&self.settings).await {
            Ok(conn) => {
                let conn = Arc::new(conn);
                self.conn.store(Some(conn.clone()));
                self.set_outage(None);
                Ok(conn)
            }
            Err(e) => {
                let why = e.to_string();
                self.set_outage(Some(why.clone()));
                Err(SharedError::Unreachable(why))
            }
        }
    }

    /// Notes the outcome of a call: an error means Redis is away until a call succeeds.
    fn noted<T>(&self, result: Result<T, RedisStoreError>) -> Result<T, SharedError> {
        match result {
            Ok(v) => {
                self.set_outage(None);
                Ok(v)
            }
            Err(e) => {
                self.set_outage(Some(e.to_string()));
                Err(e.into())
            }
        }
    }

    fn path(&self, name: &str) -> Result<PathBuf, SharedError> {
        if !valid_name(name) {
            return Err(SharedError::BadName(name.to_string()));
        }
        Ok(self.root.join(name))
    }

    /// Copies `name` from Redis into the folder (removes it there when Redis has none); true
    /// when the folder changed.
    pub async fn pull_name(&self, name: &str) -> Result<bool, SharedError> {
        let path = self.path(name)?;
        let redis = self.redis().await?;
        let stored = self.noted(redis.get(name).await)?;
        let io = |source| SharedError::Io { path: path.display().to_string(), source };
        let Some(stored) = stored else {
            return match std::fs::remove_file(&path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io(e)),
            };
        };
        let value = if is_secret(name) { self.protection.reveal(name, &stored)? } else { stored };
        if std::fs::read(&path).is_ok_and(|here| here == value) {
            return Ok(false);
        }
        if let Some(dir) = path.parent() {
            fsutil::private_dir(dir).map_err(io)?;
        }
        fsutil::write_private(&path, &value).map_err(io)?;
        Ok(true)
    }

    /// Pulls every name under `folder` (`acme/{directory}/auth.example.com/`), each
    /// `meta.json` after the files it names; wakes the readers when the folder changed.
    pub async fn pull(&self, folder: &str) -> Result<usize, SharedError> {
        let redis = self.redis().await?;
        let mut names = self.noted(redis.list(folder).await)?;
        commit_order(&mut names);
        let mut changed = 0;
        for name in names {
            match self.pull_name(&name).await {
                Ok(true) => changed += 1,
                Ok(false) => {}
                Err(SharedError::BadName(n)) => {
                    tracing::warn!(name = %n, "a name in the shared store is not a plain path; skipped")
                }
                Err(e) => return Err(e),
            }
        }
        if changed > 0 {
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(changed)
    }

    /// The folder's bytes of `name` as they go to Redis (sealed when secret); empty when the
    /// folder does not hold it (Redis then removes it).
    fn outgoing(&self, name: &str) -> Result<Vec<u8>, SharedError> {
        let path = self.path(name)?;
        match std::fs::read(&path) {
            Ok(bytes) if is_secret(name) => Ok(self.protection.protect(name, &bytes)),
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(SharedError::Io { path: path.display().to_string(), source }),
        }
    }

    /// Copies `names` from the folder to Redis, all at once, only while `owner` holds the lock
    /// `lock` (a name the folder no longer holds is removed). False when the lock is no longer
    /// the owner's: nothing was written, and what the next holder wrote stands.
    pub async fn push_fenced(&self, names: &[String], lock: &str, owner: &str) -> Result<bool, SharedError> {
        let values: Vec<(&str, Vec<u8>)> =
            names.iter().map(|n| Ok((n.as_str(), self.outgoing(n)?))).collect::<Result<_, SharedError>>()?;
        let refs: Vec<(&str, &[u8])> = values.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let redis = self.redis().await?;
        self.noted(redis.put_fenced(lock, owner, &refs).await)
    }

    /// Copies `name` from the folder to Redis with no lock (a record any replica may write),
    /// with an expiry when `ttl` is set (a challenge answer).
    pub async fn push(&self, name: &str, ttl: Option<Duration>) -> Result<(), SharedError> {
        let value = self.outgoing(name)?;
        let redis = self.redis().await?;
        let done = match (value.is_empty(), ttl) {
            (true, _) => redis.remove(name).await,
            (false, Some(ttl)) => redis.put_for(name, &value, ttl).await,
            (false, None) => redis.put(name, &value).await,
        };
        self.noted(done)
    }

    /// Tries once to take the lock `name`.
    pub async fn try_lock(&self, name: &str, owner: &str, ttl: Duration) -> Result<Taken, SharedError> {
        let redis = self.redis().await?;
        self.noted(redis.try_lock(name, owner, ttl).await)
    }

    pub async fn renew(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, SharedError> {
        let redis = self.redis().await?;
        self.noted(redis.renew(name, owner, ttl).await)
    }

    pub async fn release(&self, name: &str, owner: &str) -> Result<bool, SharedError> {
        let redis = self.redis().await?;
        self.noted(redis.release(name, owner).await)
    }

    /// Keeps the folder in step with Redis until `stop`: pulls what the change feed announces
    /// under `folders`, everything under them at each (re)connection and every minute, and
    /// reconnects with a growing wait (1 s to 30 s) while Redis is away.
    pub async fn follow(self: Arc<Self>, folders: Vec<String>, stop: CancellationToken) {
        let mut retry = Duration::from_secs(1);
        while !stop.is_cancelled() {
            if let Err(e) = self.follow_once(&folders, &stop).await {
                tracing::debug!(error = %e, "following the shared store stopped; trying again");
                self.conn.store(None);
            } else {
                retry = Duration::from_secs(1);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(MAX_RETRY);
        }
    }

    async fn follow_once(&self, folders: &[String], stop: &CancellationToken) -> Result<(), SharedError> {
        let redis = self.redis().await?;
        let mut feed = Box::pin(self.noted(redis.changes().await)?);
        self.pull_all(folders).await?;
        let mut every = tokio::time::interval(FULL_PULL_EVERY);
        every.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                _ = every.tick() => self.pull_all(folders).await?,
                names = feed.next() => {
                    let Some(names) = names else {
                        self.set_outage(Some("the change feed's connection closed".into()));
                        return Err(SharedError::Unreachable("the change feed's connection closed".into()));
                    };
                    let mut changed = false;
                    for name in names.iter().filter(|n| folders.iter().any(|f| n.starts_with(f.as_str()))) {
                        match self.pull_name(name).await {
                            Ok(c) => changed |= c,
                            Err(SharedError::BadName(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    if changed {
                        self.changed.send_modify(|n| *n += 1);
                    }
                }
            }
        }
    }

    /// The names of the store's state in the folder (`acme/`, challenge answers left out):
    /// what `store copy` moves.
    fn folder_names(&self) -> Result<Vec<String>, SharedError> {
        let io = |p: &Path, source| SharedError::Io { path: p.display().to_string(), source };
        let mut names = Vec::new();
        let mut dirs = vec![self.root.join("acme")];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&dir, e)),
            };
            for entry in entries {
                let path = entry.map_err(|e| io(&dir, e))?.path();
                let name = path.strip_prefix(&self.root).unwrap_or(&path).to_string_lossy().into_owned();
                if name.starts_with("acme/challenges") || !valid_name(&name) {
                    continue;
                }
                if path.is_dir() {
                    dirs.push(path);
                } else if !name.ends_with(".lock") && !name.ends_with(".mutex") {
                    names.push(name);
                }
            }
        }
        commit_order(&mut names);
        Ok(names)
    }

    /// Copies the folder's store into Redis (which must hold none yet); the number of names.
    pub async fn copy_to_redis(&self) -> Result<usize, CopyError> {
        let redis = self.redis().await?;
        let there = self.noted(redis.list("acme/").await)?;
        if !there.is_empty() {
            return Err(CopyError::NotEmpty { store: self.settings.url.to_string(), names: there.len() });
        }
        let names = self.folder_names()?;
        for name in &names {
            self.push(name, None).await?;
        }
        Ok(names.len())
    }

    /// Copies the store in Redis into the folder (which must hold none yet); the number of
    /// names.
    pub async fn copy_from_redis(&self) -> Result<usize, CopyError> {
        let here = self.folder_names()?;
        if !here.is_empty() {
            return Err(CopyError::NotEmpty { store: self.root.display().to_string(), names: here.len() });
        }
        let redis = self.redis().await?;
        let mut names = self.noted(redis.list("acme/").await)?;
        names.retain(|n| !n.starts_with("acme/challenges/"));
        commit_order(&mut names);
        for name in &names {
            self.pull_name(name).await?;
        }
        Ok(names.len())
    }

    async fn pull_all(&self, folders: &[String]) -> Result<(), SharedError> {
        for folder in folders {
            self.pull(folder).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_accounts_are_secrets_and_names_stay_inside_the_folder() {
        for name in ["acme/d/account.json", "acme/d/h/pending.json", "acme/d/h/key-01ab.pem", "self-signed/a.key"] {
            assert!(is_secret(name), "{name}");
        }
        for name in ["acme/d/h/meta.json", "acme/d/h/chain-01ab.pem", "acme/d/h/status.json", "store-version"] {
            assert!(!is_secret(name), "{name}");
        }
        for bad in ["", "/etc/passwd", "acme/../x", "acme//x", "acme/.hidden", "acme/a b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name("acme/challenges/tls-alpn-01/auth.example.com"));
    }
}
