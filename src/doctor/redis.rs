//! The shared store on Redis: reachable, the password and TLS accepted, a version that runs
//! the relay's scripts, this user allowed to write, take locks and run scripts, and a server
//! that keeps what it is given: an eviction policy other than `noeviction` can drop a
//! certificate under memory pressure, and without persistence a restart of Redis empties it.

use std::time::Duration;

use super::Finding;
use crate::config::RedisStorage;
use crate::storage::redis::{RedisStore, Taken};

const CHECK: &str = "redis";

/// The oldest Redis the relay supports.
const MIN_VERSION: (u32, u32) = (6, 2);

/// Every Redis finding for `shared`, each network step bounded by `timeout`.
pub async fn check(shared: &RedisStorage, timeout: Duration) -> Vec<Finding> {
    let url = shared.url.as_str().trim_end_matches('/').to_string();
    let mut settings = shared.clone();
    settings.connect_timeout = settings.connect_timeout.min(timeout);
    settings.command_timeout = settings.command_timeout.min(timeout);
    let store = match tokio::time::timeout(timeout * 2, RedisStore::connect(&settings)).await {
        Ok(Ok(store)) => store,
        Ok(Err(e)) => {
            return vec![Finding::error(
                CHECK,
                format!("{e}"),
                "check the URL, [redis] username and password, and for rediss:// the CA (`ca_file`)",
            )];
        }
        Err(_) => {
            return vec![Finding::error(
                CHECK,
                format!("{url}: no answer within {}s", (timeout * 2).as_secs()),
                "check that Redis runs and that this host may reach it (firewall, security group)",
            )];
        }
    };
    let mut out = vec![Finding::ok(CHECK, format!("{url} answers (prefix {})", shared.prefix))];
    out.push(writable(&store).await);
    match store.facts().await {
        Ok(facts) => {
            out.push(version(&facts.version));
            out.push(eviction(&facts.maxmemory_policy));
            out.push(persistence(facts.aof_enabled, facts.rdb_save.as_deref()));
        }
        Err(e) => out.push(Finding::warning(
            CHECK,
            format!("{e}"),
            "allow the relay's user the INFO command, so doctor can check eviction and persistence",
        )),
    }
    out
}

/// Takes a lock, writes under it, removes and releases a probe key, as the relay does for every
/// certificate.
async fn writable(store: &RedisStore) -> Finding {
    let name = format!("doctor-probe-{}", std::process::id());
    let owner = format!("doctor/{}", std::process::id());
    let probe = async {
        let written = match store.try_lock(&name, &owner, Duration::from_secs(10)).await? {
            Taken::Held => store.put_fenced(&name, &owner, &[(&name, b"probe")]).await?,
            Taken::Busy { .. } => false,
        };
        store.delete(&name).await?;
        store.release(&name, &owner).await?;
        Ok::<bool, crate::storage::redis::RedisStoreError>(written)
    };
    match probe.await {
        Ok(true) => Finding::ok(CHECK, "this user can write, take locks and run the relay's scripts"),
        Ok(false) => Finding::error(
            CHECK,
            "a write under a fresh lock was refused",
            "another process is using the same keys: give this relay its own [redis] prefix",
        ),
        Err(e) => Finding::error(
            CHECK,
            format!("{e}"),
            "grant the relay's ACL user its keys and channel (~PREFIX:* &PREFIX:*) and +@read +@write +@scripting +@pubsub",
        ),
    }
}

fn version(found: &str) -> Finding {
    let mut parts = found.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= MIN_VERSION {
        Finding::ok(CHECK, format!("server version {found}"))
    } else {
        Finding::error(
            CHECK,
            format!("server version {found}; the relay needs Redis {}.{} or later", MIN_VERSION.0, MIN_VERSION.1),
            "upgrade Redis (or use Valkey)",
        )
    }
}

fn eviction(policy: &str) -> Finding {
    match policy {
        "noeviction" => Finding::ok(CHECK, "maxmemory-policy noeviction: nothing is evicted"),
        "" => Finding::warning(
            CHECK,
            "the eviction policy is not known (INFO does not show maxmemory_policy)",
            "make sure maxmemory-policy is noeviction",
        ),
        other => Finding::error(
            CHECK,
            format!("maxmemory-policy {other}: Redis may evict certificates and keys when memory runs short"),
            "set maxmemory-policy noeviction (a managed Redis: in its parameter group)",
        ),
    }
}

fn persistence(aof: bool, rdb_save: Option<&str>) -> Finding {
    match (aof, rdb_save) {
        (true, _) => Finding::ok(CHECK, "append-only file on: what the relay writes survives a Redis restart"),
        (false, Some(save)) if !save.trim().is_empty() => {
            Finding::ok(CHECK, format!("RDB snapshots ({save}): the store survives a Redis restart"))
        }
        (false, Some(_)) => Finding::warning(
            CHECK,
            "no persistence (no append-only file, no RDB snapshots): a Redis restart empties the store, and every \
             replica orders again",
            "enable appendonly yes or RDB snapshots (`save`)",
        ),
        (false, None) => Finding::ok(
            CHECK,
            "no append-only file; whether RDB snapshots run is not visible to this user (CONFIG is not allowed): \
             make sure the service persists its data",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    #[test]
    fn versions_policies_and_persistence_are_judged() {
        assert_eq!(version("7.0.15").level, Level::Ok);
        assert_eq!(version("6.2.0").level, Level::Ok);
        assert_eq!(version("6.0.9").level, Level::Error);
        assert_eq!(eviction("noeviction").level, Level::Ok);
        let e = eviction("allkeys-lru");
        assert_eq!(
            (e.level, e.message.as_str()),
            (
                Level::Error,
                "maxmemory-policy allkeys-lru: Redis may evict certificates and keys when memory runs short"
            )
        );
        assert_eq!(persistence(true, None).level, Level::Ok);
        assert_eq!(persistence(false, Some("3600 1 300 100")).level, Level::Ok);
        assert_eq!(persistence(false, Some("")).level, Level::Warning);
        assert_eq!(persistence(false, None).level, Level::Ok);
    }
}
