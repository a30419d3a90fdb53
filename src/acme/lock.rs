//! The locks that let several relays share one store (a shared volume behind a load balancer)
//! with exactly one of them ordering a given hostname, or creating the account, at a time.
//!
//! [`Locks`] is the interface; [`FileLocks`] keeps each lock as a file in the store, which works
//! on every shared volume, including NFS, where `flock` semantics vary. Another backend (Redis)
//! implements the same three calls with the same meaning.
//!
//! A lock names its owner and an expiry. The holder renews it while it works ([`LockGuard`]'s
//! heartbeat), so a slow order never loses it, and the expiry can stay short: a lock past its
//! expiry belonged to a relay that died or hung and is taken over. A lock whose owner is a
//! process of this machine that no longer runs is taken over at once, so a relay killed
//! mid-order and restarted orders again without waiting for the expiry.
//!
//! In the file backend every change to an existing lock file (renewal, take-over, release)
//! happens under a short-lived `{name}.lock.mutex` file created with `O_EXCL`, and the lock file
//! is replaced by a rename, never removed and re-created: two relays can never both take over
//! one stale lock, and a renewal cannot overwrite a take-over.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;

use crate::storage::redis::Taken;
use crate::storage::shared::Shared;
use serde::{Deserialize, Serialize};

/// What a lock says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockRecord {
    /// `{machine}/{pid}/{random}`: unique per relay process and task.
    pub owner: String,
    /// What the owner does while holding it (for operators reading the file).
    pub purpose: String,
    #[serde(with = "humantime_serde")]
    pub expires: SystemTime,
    /// When the owner process started (clock ticks since boot), so a reused pid is not taken
    /// for the owner still running.
    #[serde(default)]
    pub started: Option<u64>,
}

/// The outcome of one try.
#[derive(Debug)]
pub enum Acquire {
    Held,
    /// Someone else holds it until `expires`.
    Busy {
        owner: String,
        expires: SystemTime,
    },
}

/// Named locks shared by the relays of one store.
pub trait Locks: Send + Sync + 'static {
    /// Tries once to take `name` for `ttl`, taking over a lock that expired or whose owner is
    /// dead. Atomic: of several relays trying at once, exactly one gets [`Acquire::Held`].
    fn try_acquire<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
        purpose: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, io::Result<Acquire>>;

    /// Extends `name` to `ttl` from now while `owner` holds it; `false` when it does not any more.
    fn renew<'a>(&'a self, name: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, io::Result<bool>>;

    /// Gives `name` up if `owner` still holds it.
    fn release<'a>(&'a self, name: &'a str, owner: &'a str) -> BoxFuture<'a, io::Result<()>>;
}

/// A held lock, renewed every third of its `ttl` until released or dropped (a dropped guard is
/// released in the background).
pub struct LockGuard {
    locks: Arc<dyn Locks>,
    name: String,
    owner: String,
    lost: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
    released: bool,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard").field("name", &self.name).field("owner", &self.owner).finish_non_exhaustive()
    }
}

/// Takes `name` once: the guard, or who holds it until when.
pub async fn acquire(
    locks: &Arc<dyn Locks>,
    name: &str,
    owner: &str,
    purpose: &str,
    ttl: Duration,
) -> io::Result<Result<LockGuard, (String, SystemTime)>> {
    match locks.try_acquire(name, owner, purpose, ttl).await? {
        Acquire::Busy { owner, expires } => Ok(Err((owner, expires))),
        Acquire::Held => {
            let lost = Arc::new(AtomicBool::new(false));
            let heartbeat = tokio::spawn(heartbeat(locks.clone(), name.into(), owner.into(), ttl, lost.clone()));
            Ok(Ok(LockGuard {
                locks: locks.clone(),
                name: name.into(),
                owner: owner.into(),
                lost,
                heartbeat,
                released: false,
            }))
        }
    }
}

async fn heartbeat(locks: Arc<dyn Locks>, name: String, owner: String, ttl: Duration, lost: Arc<AtomicBool>) {
    loop {
        tokio::time::sleep(ttl / 3).await;
        match locks.renew(&name, &owner, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(lock = %name, %owner, "lost a lock while holding it (another relay took it over)");
                lost.store(true, Ordering::Relaxed);
                return;
            }
            // Try again at the next beat; the expiry leaves two more.
            Err(e) => tracing::warn!(lock = %name, error = %e, "cannot renew a held lock"),
        }
    }
}

impl LockGuard {
    /// Whether another relay took the lock over (the holder stalled past the expiry).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Gives the lock up now.
    pub async fn release(mut self) {
        self.heartbeat.abort();
        self.released = true;
        if let Err(e) = self.locks.release(&self.name, &self.owner).await {
            tracing::warn!(lock = %self.name, error = %e, "cannot release a lock; it expires by itself");
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.heartbeat.abort();
        if self.released {
            return;
        }
        // Cancelled mid-work (a stop, a reload): release in the background.
        let (locks, name, owner) =
            (self.locks.clone(), std::mem::take(&mut self.name), std::mem::take(&mut self.owner));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = locks.release(&name, &owner).await;
            });
        }
    }
}

/// Locks in the shared store (Redis), named `{base}/{name}`: taken with an expiry, renewed and
/// released only by their owner, each in one server-side step. A holder's death is seen at
/// the expiry (90 s for an order), since its process may be on any machine.
#[derive(Debug, Clone)]
pub struct SharedLocks {
    shared: Arc<Shared>,
    base: String,
}

impl SharedLocks {
    pub fn new(shared: Arc<Shared>, base: &str) -> SharedLocks {
        SharedLocks { shared, base: base.to_string() }
    }

    fn name(&self, name: &str) -> String {
        format!("{}/{name}", self.base)
    }
}

impl Locks for SharedLocks {
    fn try_acquire<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
        _purpose: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, io::Result<Acquire>> {
        Box::pin(async move {
            match self.shared.try_lock(&self.name(name), owner, ttl).await.map_err(io::Error::other)? {
                Taken::Held => Ok(Acquire::Held),
                Taken::Busy { owner, expires } => Ok(Acquire::Busy { owner, expires }),
            }
        })
    }

    fn renew<'a>(&'a self, name: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, io::Result<bool>> {
        Box::pin(async move { self.shared.renew(&self.name(name), owner, ttl).await.map_err(io::Error::other) })
    }

    fn release<'a>(&'a self, name: &'a str, owner: &'a str) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move { self.shared.release(&self.name(name), owner).await.map(drop).map_err(io::Error::other) })
    }
}

/// How old a `.mutex` file must be to be judged left behind by a relay that died holding it
/// (it is held for a few file operations).
const MUTEX_STALE: Duration = Duration::from_secs(30);

/// Locks as files `{base}/{name}.lock`.
#[derive(Debug, Clone)]
pub struct FileLocks {
    base: PathBuf,
}

impl FileLocks {
    pub fn new(base: &Path) -> FileLocks {
        FileLocks { base: base.to_path_buf() }
    }

    /// The file of lock `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.base.join(format!("{name}.lock"))
    }

    fn acquire_now(&self, name: &str, owner: &str, purpose: &str, ttl: Duration) -> io::Result<Acquire> {
        let path = self.path(name);
        if let Some(dir) = path.parent() {
            crate::fsutil::private_dir(dir)?;
        }
        let record = || LockRecord {
            owner: owner.into(),
            purpose: purpose.into(),
            expires: SystemTime::now() + ttl,
            started: process_start(std::process::id()),
        };
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => {
                    write_record(f, &record())?;
                    return Ok(Acquire::Held);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            let Some(seen) = read(&path)? else { continue };
            let (holder, expires, dead) = judge(&path, &seen, ttl);
            if expires > SystemTime::now() && !dead {
                return Ok(Acquire::Busy { owner: holder, expires });
            }
            let replaced = with_mutex(&path, || {
                // Still the very lock judged stale: replace it with ours in one rename.
                if read(&path)?.as_deref() != Some(&seen[..]) {
                    return Ok(false);
                }
                crate::fsutil::write_private(&path, &serde_json::to_vec(&record()).map_err(io::Error::other)?)?;
                Ok(true)
            })?;
            if replaced == Some(true) {
                let why = if dead { "its owner is no longer running" } else { "it expired" };
                tracing::warn!(lock = %path.display(), previous_owner = %holder, "took over a lock: {why}");
                return Ok(Acquire::Held);
            }
            return Ok(Acquire::Busy { owner: holder, expires });
        }
        let r = read(&path)?.and_then(|b| serde_json::from_slice::<LockRecord>(&b).ok());
        Ok(Acquire::Busy {
            owner: r.as_ref().map(|r| r.owner.clone()).unwrap_or_default(),
            expires: r.map(|r| r.expires).unwrap_or_else(SystemTime::now),
        })
    }

    /// Runs `f` on the lock file of `name` if it is `owner`'s, under its mutex; `None` when
    /// another relay holds the mutex right now.
    fn if_ours<T>(&self, name: &str, owner: &str, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<Option<T>> {
        let path = self.path(name);
        with_mutex(&path, || {
            let ours = read(&path)?
                .and_then(|b| serde_json::from_slice::<LockRecord>(&b).ok())
                .is_some_and(|r| r.owner == owner);
            if ours { f(&path).map(Some) } else { Ok(None) }
        })
        .map(Option::flatten)
    }
}

impl Locks for FileLocks {
    fn try_acquire<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
        purpose: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, io::Result<Acquire>> {
        Box::pin(async move { self.acquire_now(name, owner, purpose, ttl) })
    }

    fn renew<'a>(&'a self, name: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, io::Result<bool>> {
        Box::pin(async move {
            for _ in 0..3 {
                let renewed = self.if_ours(name, owner, |path| {
                    let mut r: LockRecord = serde_json::from_slice(&std::fs::read(path)?).map_err(io::Error::other)?;
                    r.expires = SystemTime::now() + ttl;
                    crate::fsutil::write_private(path, &serde_json::to_vec(&r).map_err(io::Error::other)?)
                })?;
                if renewed.is_some() {
                    return Ok(true);
                }
                // Not ours, or the mutex is busy for a moment: look again shortly.
                let current = read(&self.path(name))?.and_then(|b| serde_json::from_slice::<LockRecord>(&b).ok());
                if current.is_none_or(|r| r.owner != owner) {
                    return Ok(false);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(true)
        })
    }

    fn release<'a>(&'a self, name: &'a str, owner: &'a str) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            for _ in 0..3 {
                if self.if_ours(name, owner, |p| std::fs::remove_file(p))?.is_some() {
                    return Ok(());
                }
                let current = read(&self.path(name))?.and_then(|b| serde_json::from_slice::<LockRecord>(&b).ok());
                if current.is_none_or(|r| r.owner != owner) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        })
    }
}

fn write_record(mut f: std::fs::File, record: &LockRecord) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(&serde_json::to_vec(record).map_err(io::Error::other)?)?;
    f.sync_all()
}

/// The lock file's bytes; `None` when there is none.
fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Who holds the lock seen as `bytes`, until when, and whether that owner is a dead process of
/// this machine.
fn judge(path: &Path, bytes: &[u8], ttl: Duration) -> (String, SystemTime, bool) {
    match serde_json::from_slice::<LockRecord>(bytes) {
        Ok(r) => {
            let dead = owner_is_dead(&r);
            (r.owner, r.expires, dead)
        }
        // Being written right now, or garbage: judged by its age.
        Err(_) => {
            let age = std::fs::metadata(path).and_then(|m| m.modified()).map(|m| m + ttl);
            ("unknown (unreadable lock file)".into(), age.unwrap_or_else(|_| SystemTime::now()), false)
        }
    }
}

/// Runs `f` while holding `{path}.mutex`; `None` when another relay holds it. A mutex older
/// than [`MUTEX_STALE`] was left by a relay that died within those few operations: removed,
/// and this try gives way.
fn with_mutex<T>(path: &Path, f: impl FnOnce() -> io::Result<T>) -> io::Result<Option<T>> {
    let mut name = path.as_os_str().to_owned();
    name.push(".mutex");
    let mutex = PathBuf::from(name);
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&mutex) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let age = std::fs::metadata(&mutex).and_then(|m| m.modified()).ok().and_then(|m| m.elapsed().ok());
            if age.is_some_and(|a| a > MUTEX_STALE) {
                let _ = std::fs::remove_file(&mutex);
            }
            return Ok(None);
        }
        Err(e) => return Err(e),
    }
    let result = f();
    let _ = std::fs::remove_file(&mutex);
    result.map(Some)
}

/// This machine's name, as lock owners name it.
fn machine() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// When process `pid` started (field 22 of `/proc/{pid}/stat`, clock ticks since boot);
/// `None` when there is no such process (or no `/proc`).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True when `r`'s owner is a process of this machine that has exited (or whose pid now
/// belongs to a process started at another time). Owners of other machines are never judged.
fn owner_is_dead(r: &LockRecord) -> bool {
    let mut parts = r.owner.splitn(3, '/');
    let (Some(m), Some(pid)) = (parts.next(), parts.next().and_then(|p| p.parse::<u32>().ok())) else {
        return false;
    };
    if m != machine() || !Path::new("/proc/self/stat").exists() {
        return false;
    }
    match (process_start(pid), r.started) {
        (None, _) => true,
        (Some(now), Some(then)) => now != then,
        (Some(_), None) => false,
    }
}

/// An owner id unique to this process and call: `{machine}/{pid}/{random}`.
pub fn new_owner() -> String {
    let mut r = [0u8; 6];
    let _ = crate::crypto::provider().secure_random.fill(&mut r);
    format!("{}/{}/{}", machine(), std::process::id(), crate::crypto::hex(&r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locks(dir: &Path) -> Arc<dyn Locks> {
        Arc::new(FileLocks::new(dir))
    }

    async fn held(locks: &Arc<dyn Locks>, owner: &str, ttl: Duration) -> LockGuard {
        match acquire(locks, "order", owner, "order", ttl).await.unwrap() {
            Ok(g) => g,
            Err((holder, _)) => panic!("busy, held by {holder}"),
        }
    }

    fn record(path: &Path) -> LockRecord {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn one_owner_at_a_time_and_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let l = locks(dir.path());
        let path = FileLocks::new(dir.path()).path("order");
        let a = held(&l, &new_owner(), Duration::from_secs(60)).await;
        let Err((holder, _)) = acquire(&l, "order", "b", "order", Duration::from_secs(60)).await.unwrap() else {
            panic!("two owners")
        };
        assert_eq!(holder, record(&path).owner);
        a.release().await;
        assert!(!path.exists());
        let b = held(&l, "b", Duration::from_secs(60)).await;
        assert_eq!(record(&path).owner, "b");
        b.release().await;
    }

    #[tokio::test]
    async fn an_expired_lock_is_taken_over_and_a_released_guard_leaves_the_new_owner_alone() {
        let dir = tempfile::tempdir().unwrap();
        let l = locks(dir.path());
        let path = FileLocks::new(dir.path()).path("order");
        let stale = LockRecord {
            owner: "elsewhere/1/00".into(),
            purpose: "order".into(),
            expires: SystemTime::now() - Duration::from_secs(1),
            started: None,
        };
        std::fs::write(&path, serde_json::to_vec(&stale).unwrap()).unwrap();
        let g = held(&l, "alive", Duration::from_secs(60)).await;
        assert_eq!(record(&path).owner, "alive");
        // Someone else took it over meanwhile: releasing ours leaves theirs in place.
        std::fs::write(&path, serde_json::to_vec(&LockRecord { owner: "other".into(), ..stale }).unwrap()).unwrap();
        g.release().await;
        assert_eq!(record(&path).owner, "other");
    }

    #[tokio::test]
    async fn a_lock_of_a_dead_process_of_this_machine_is_taken_over_before_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let l = locks(dir.path());
        let path = FileLocks::new(dir.path()).path("order");
        // A child that has exited: its pid names no running process (or a newer one).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let started = process_start(pid);
        child.wait().unwrap();
        let dead = LockRecord {
            owner: format!("{}/{pid}/00", machine()),
            purpose: "order".into(),
            expires: SystemTime::now() + Duration::from_secs(600),
            started,
        };
        std::fs::write(&path, serde_json::to_vec(&dead).unwrap()).unwrap();
        let g = held(&l, "restarted", Duration::from_secs(60)).await;
        assert_eq!(record(&path).owner, "restarted");
        g.release().await;

        // A live owner (this very process) keeps its lock until it expires.
        let alive = LockRecord { owner: new_owner(), started: process_start(std::process::id()), ..dead };
        std::fs::write(&path, serde_json::to_vec(&alive).unwrap()).unwrap();
        assert!(acquire(&l, "order", "restarted", "order", Duration::from_secs(60)).await.unwrap().is_err());
        // Another machine's owner is never judged dead from here.
        let remote = LockRecord { owner: "other-host/1/00".into(), ..alive };
        std::fs::write(&path, serde_json::to_vec(&remote).unwrap()).unwrap();
        assert!(acquire(&l, "order", "restarted", "order", Duration::from_secs(60)).await.unwrap().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_holder_renews_its_lock_while_it_works() {
        let dir = tempfile::tempdir().unwrap();
        let l = locks(dir.path());
        let path = FileLocks::new(dir.path()).path("order");
        let ttl = Duration::from_secs(30);
        let g = held(&l, "worker", ttl).await;
        let first = record(&path).expires;
        // Ten expiries later (paused clock, so no real wait) the lock is still its own.
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            // Let the heartbeat's file work finish (it runs on this same thread).
            tokio::task::yield_now().await;
        }
        let r = record(&path);
        assert_eq!(r.owner, "worker");
        assert!(r.expires > first, "renewed");
        assert!(!g.lost());
        g.release().await;
    }

    #[tokio::test]
    async fn of_many_relays_taking_over_one_stale_lock_exactly_one_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = FileLocks::new(dir.path()).path("order");
        for round in 0..20 {
            let stale = LockRecord {
                owner: format!("elsewhere/1/{round}"),
                purpose: "order".into(),
                expires: SystemTime::now() - Duration::from_secs(1),
                started: None,
            };
            std::fs::write(&path, serde_json::to_vec(&stale).unwrap()).unwrap();
            let winners: usize = std::thread::scope(|s| {
                let tries: Vec<_> = (0..6)
                    .map(|i| {
                        let base = dir.path().to_path_buf();
                        s.spawn(move || {
                            let l = FileLocks::new(&base);
                            matches!(
                                l.acquire_now("order", &format!("r{i}"), "order", Duration::from_secs(60)),
                                Ok(Acquire::Held)
                            )
                        })
                    })
                    .collect();
                tries.into_iter().map(|t| usize::from(t.join().unwrap())).sum()
            });
            assert_eq!(winners, 1, "round {round}");
        }
    }
}
