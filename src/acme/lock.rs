//! The lock that lets several relays share one store (a shared volume behind a load balancer)
//! with exactly one of them ordering a given hostname, or creating the account, at a time.
//!
//! A lock is a file created with `O_EXCL` that names its owner and an expiry. A lock past its
//! expiry belonged to a relay that died or hung; it is taken over (renamed away, checked to be
//! the one seen expired, then removed). Plain files work on every shared volume, including
//! NFS, where `flock` semantics vary.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// What the lock file says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockRecord {
    /// `{machine}/{pid}/{random}`: unique per relay task.
    pub owner: String,
    /// What the owner does while holding it (for operators reading the file).
    pub purpose: String,
    #[serde(with = "humantime_serde")]
    pub expires: SystemTime,
}

/// The outcome of one try.
#[derive(Debug)]
pub enum Acquire {
    Held(LockGuard),
    /// Someone else holds it until `expires`.
    Busy {
        owner: String,
        expires: SystemTime,
    },
}

/// A held lock; removed on drop if still ours.
#[derive(Debug)]
pub struct LockGuard {
    path: PathBuf,
    owner: String,
}

impl LockGuard {
    /// Gives the lock up now.
    pub fn release(self) {}
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if read_record(&self.path).is_some_and(|r| r.owner == self.owner) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn read_record(path: &Path) -> Option<LockRecord> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Tries once to take the lock at `path` for `ttl`, taking over an expired one.
pub fn try_acquire(path: &Path, owner: &str, purpose: &str, ttl: Duration) -> std::io::Result<Acquire> {
    if let Some(dir) = path.parent() {
        crate::fsutil::private_dir(dir)?;
    }
    for _ in 0..2 {
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(mut f) => {
                let record =
                    LockRecord { owner: owner.into(), purpose: purpose.into(), expires: SystemTime::now() + ttl };
                let bytes = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                return Ok(Acquire::Held(LockGuard { path: path.to_path_buf(), owner: owner.into() }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let seen = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let now = SystemTime::now();
        let record: Option<LockRecord> = serde_json::from_slice(&seen).ok();
        let expires = match &record {
            Some(r) => r.expires,
            // Being written right now, or garbage: judge it by its age.
            None => std::fs::metadata(path).and_then(|m| m.modified()).map(|m| m + ttl).unwrap_or(now),
        };
        let owner_seen = record.map(|r| r.owner).unwrap_or_else(|| "unknown (unreadable lock file)".into());
        if expires > now {
            return Ok(Acquire::Busy { owner: owner_seen, expires });
        }
        if !take_over(path, owner, &seen)? {
            return Ok(Acquire::Busy { owner: owner_seen, expires });
        }
        tracing::warn!(lock = %path.display(), previous_owner = %owner_seen, "took over an expired lock (its owner died or hung)");
    }
    let r = read_record(path);
    Ok(Acquire::Busy {
        owner: r.as_ref().map(|r| r.owner.clone()).unwrap_or_default(),
        expires: r.map(|r| r.expires).unwrap_or_else(SystemTime::now),
    })
}

/// Moves an expired lock out of the way. When the moved file turns out not to be the one seen
/// expired (another relay replaced it meanwhile), it is put back and `false` returned.
fn take_over(path: &Path, owner: &str, seen: &[u8]) -> std::io::Result<bool> {
    let aside = path.with_extension(format!("stale-{}", owner.replace('/', "_")));
    match std::fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    }
    let moved = std::fs::read(&aside).unwrap_or_default();
    if moved != seen {
        // `hard_link` never replaces an existing file: a newer lock stays where it is.
        let _ = std::fs::hard_link(&aside, path);
        let _ = std::fs::remove_file(&aside);
        return Ok(false);
    }
    std::fs::remove_file(&aside)?;
    Ok(true)
}

/// An owner id unique to this process and call: `{machine}/{pid}/{random}`.
pub fn new_owner() -> String {
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let mut r = [0u8; 6];
    let _ = crate::crypto::provider().secure_random.fill(&mut r);
    let r: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!("{machine}/{}/{r}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(a: Acquire) -> LockGuard {
        match a {
            Acquire::Held(g) => g,
            Acquire::Busy { owner, .. } => panic!("busy, held by {owner}"),
        }
    }

    #[test]
    fn one_owner_at_a_time_and_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("order.lock");
        let a = held(try_acquire(&path, "a", "order", Duration::from_secs(60)).unwrap());
        match try_acquire(&path, "b", "order", Duration::from_secs(60)).unwrap() {
            Acquire::Busy { owner, .. } => assert_eq!(owner, "a"),
            Acquire::Held(_) => panic!("two owners"),
        }
        a.release();
        assert!(!path.exists());
        let b = held(try_acquire(&path, "b", "order", Duration::from_secs(60)).unwrap());
        assert_eq!(read_record(&path).unwrap().owner, "b");
        drop(b);
    }

    #[test]
    fn an_expired_lock_of_a_dead_owner_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("order.lock");
        let stale = LockRecord {
            owner: "dead/1/00".into(),
            purpose: "order".into(),
            expires: SystemTime::now() - Duration::from_secs(1),
        };
        std::fs::write(&path, serde_json::to_vec(&stale).unwrap()).unwrap();
        let g = held(try_acquire(&path, "alive", "order", Duration::from_secs(60)).unwrap());
        assert_eq!(read_record(&path).unwrap().owner, "alive");
        // Releasing a lock someone else took over leaves theirs in place.
        std::fs::write(&path, serde_json::to_vec(&LockRecord { owner: "other".into(), ..stale }).unwrap()).unwrap();
        drop(g);
        assert_eq!(read_record(&path).unwrap().owner, "other");
    }

    #[test]
    fn take_over_puts_back_a_lock_that_changed_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("order.lock");
        std::fs::write(&path, b"fresh").unwrap();
        assert!(!take_over(&path, "me", b"old").unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"fresh");
    }
}
