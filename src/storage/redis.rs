//! The store on Redis (6.2 and later, Valkey too), for replicas that share no disk: values by
//! name, locks with fencing, and a change feed, through the `redis` crate's connection manager
//! (reconnects on its own) over TCP or TLS.
//!
//! Every key is `{prefix}:{name}`. A lock is `{prefix}:lock:{name}` holding its owner's token,
//! set with an expiry, so it ends on its own when its holder dies or is cut off. Taking,
//! renewing, releasing and writing under a lock each run as one Lua script that first checks
//! the owner: a holder whose lock expired (paused, partitioned) can neither release it nor
//! overwrite what the next holder wrote. Every write publishes the names it changed on
//! `{prefix}:changes`, so other replicas reload within moments; they also poll, in case a
//! message is lost while they reconnect.
//!
//! Redis is never asked anything while a handshake or a request is served: the callers load
//! what they need into memory and serve from there.

use std::time::{Duration, SystemTime};

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Client, ConnectionInfo, IntoConnectionInfo, Script};

use crate::config::RedisStorage;

/// What went wrong with Redis. Names the server (never a password) and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    #[error("{url}: {what}: {source}")]
    Redis {
        url: String,
        what: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("{path}: cannot read the Redis CA file: {source}")]
    Ca {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The outcome of one try to take a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    Held,
    /// Someone else holds it until `expires`.
    Busy {
        owner: String,
        expires: SystemTime,
    },
}

/// The server facts `doctor` judges.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    pub version: String,
    /// `maxmemory-policy`: anything but `noeviction` may evict certificates.
    pub maxmemory_policy: String,
    pub aof_enabled: bool,
    /// The RDB `save` schedule, when the server lets a client read it (`None`: not allowed).
    pub rdb_save: Option<String>,
}

/// A connection to the store on Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    client: Client,
    conn: ConnectionManager,
    prefix: String,
    /// The server as shown in messages: scheme, host and port only.
    shown: String,
}

/// KEYS[1] the lock, ARGV[1] the owner, ARGV[2] the ttl in ms. Takes a free lock (or renews
/// one the same owner holds, after a try whose answer was lost); else says who holds it.
const TRY_LOCK: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, '', 0}
end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, '', 0}
end
return {0, holder or '', redis.call('PTTL', KEYS[1])}";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// KEYS[1] the lock, KEYS[2..] the values' keys; ARGV[1] the owner, ARGV[2] the change channel,
/// ARGV[3] the names changed (for the message), ARGV[4..] the values, an empty one removing
/// its key. Writes all or nothing.
const FENCED_PUT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
for i = 2, #KEYS do
  if ARGV[i + 2] == '' then
    redis.call('DEL', KEYS[i])
  else
    redis.call('SET', KEYS[i], ARGV[i + 2])
  end
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1";

impl RedisStore {
    /// Connects (within `connect_timeout`) and checks the server answers a `PING`.
    pub async fn connect(settings: &RedisStorage) -> Result<RedisStore, RedisStoreError> {
        let shown = shown(&settings.url);
        let err = |what| {
            let url = shown.clone();
            move |source| RedisStoreError::Redis { url, what, source }
        };
        let mut info: ConnectionInfo = settings.url.as_str().into_connection_info().map_err(err("its URL"))?;
        let mut redis = info.redis_settings().clone();
        if let Some(user) = &settings.username {
            redis = redis.set_username(user);
        }
        if let Some(password) = &settings.password {
            redis = redis.set_password(&password.0);
        }
        info = info.set_redis_settings(redis.set_lib_name("oauth-relay", env!("CARGO_PKG_VERSION")));
        crate::crypto::provider();
        let client = match &settings.ca_file {
            Some(path) => {
                let pem = crate::fsutil::read_regular(path)
                    .map_err(|source| RedisStoreError::Ca { path: path.display().to_string(), source })?;
                let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
                Client::build_with_tls(info, certs).map_err(err("its TLS settings"))?
            }
            None => Client::open(info).map_err(err("its URL"))?,
        };
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = client.get_connection_manager_with_config(config).await.map_err(err("cannot connect"))?;
        let store = RedisStore { client, conn, prefix: settings.prefix.clone(), shown };
        let _: String = redis::cmd("PING").query_async(&mut store.conn.clone()).await.map_err(store.err("PING"))?;
        Ok(store)
    }

    fn err(&self, what: &'static str) -> impl FnOnce(redis::RedisError) -> RedisStoreError + use<> {
        let url = self.shown.clone();
        move |source| RedisStoreError::Redis { url, what, source }
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// The channel every write is announced on.
    pub fn channel(&self) -> String {
        self.key("changes")
    }

    /// The value stored under `name`.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, RedisStoreError> {
        self.conn.clone().get(self.key(name)).await.map_err(self.err("GET"))
    }

    /// Stores `value` under `name` (with no lock: a record every replica may write, such as a
    /// renewal status) and announces it.
    pub async fn put(&self, name: &str, value: &[u8]) -> Result<(), RedisStoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic().set(self.key(name), value).ignore().publish(self.channel(), name).ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await.map_err(self.err("SET"))
    }

    /// Removes `name` and announces it.
    pub async fn remove(&self, name: &str) -> Result<(), RedisStoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic().del(self.key(name)).ignore().publish(self.channel(), name).ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await.map_err(self.err("DEL"))
    }

    /// Stores `value` under `name` for `ttl` (challenge answers: they must outlive a
    /// validation, not a crash of the replica that ordered).
    pub async fn put_for(&self, name: &str, value: &[u8], ttl: Duration) -> Result<(), RedisStoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic().pset_ex(self.key(name), value, millis(ttl)).ignore().publish(self.channel(), name).ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await.map_err(self.err("SET PX"))
    }

    /// Removes `name`.
    pub async fn delete(&self, name: &str) -> Result<(), RedisStoreError> {
        self.conn.clone().del(self.key(name)).await.map_err(self.err("DEL"))
    }

    /// The names under `folder` (`acme/dir/`), by `SCAN`: never blocks the server, and the
    /// number of rounds is bounded by what the database holds.
    pub async fn list(&self, folder: &str) -> Result<Vec<String>, RedisStoreError> {
        let pattern = format!("{}*", glob_escape(&self.key(folder)));
        let strip = self.prefix.len() + 1;
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut names = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(self.err("SCAN"))?;
            names.extend(keys.into_iter().filter_map(|k| k.get(strip..).map(str::to_string)));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn lock_key(&self, name: &str) -> String {
        self.key(&format!("lock:{name}"))
    }

    /// Tries once to take the lock `name` for `owner` (a token unique to the holder) for `ttl`.
    /// It ends by itself at its expiry, so a holder that died or was cut off loses it.
    pub async fn try_lock(&self, name: &str, owner: &str, ttl: Duration) -> Result<Taken, RedisStoreError> {
        let (held, holder, pttl): (i64, String, i64) = Script::new(TRY_LOCK)
            .key(self.lock_key(name))
            .arg(owner)
            .arg(millis(ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(self.err("taking a lock"))?;
        Ok(match held {
            1 => Taken::Held,
            _ => Taken::Busy { owner: holder, expires: SystemTime::now() + Duration::from_millis(pttl.max(0) as u64) },
        })
    }

    /// Extends the lock `name` to `ttl` from now while `owner` holds it; false when it does not
    /// (expired, taken over).
    pub async fn renew(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, RedisStoreError> {
        let done: i64 = Script::new(RENEW)
            .key(self.lock_key(name))
            .arg(owner)
            .arg(millis(ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(self.err("renewing a lock"))?;
        Ok(done == 1)
    }

    /// Gives the lock `name` up if `owner` holds it; false when it did not (nothing removed).
    pub async fn release(&self, name: &str, owner: &str) -> Result<bool, RedisStoreError> {
        let done: i64 = Script::new(RELEASE)
            .key(self.lock_key(name))
            .arg(owner)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(self.err("releasing a lock"))?;
        Ok(done == 1)
    }

    /// Writes every `(name, value)` at once (an empty value removes the name), only while
    /// `owner` holds the lock `lock`, and announces them; false (nothing written) when the lock expired or another holder took
    /// it: a holder paused past its expiry can never overwrite what the next one wrote.
    pub async fn put_fenced(&self, lock: &str, owner: &str, values: &[(&str, &[u8])]) -> Result<bool, RedisStoreError> {
        let names: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
        let script = Script::new(FENCED_PUT);
        let mut call = script.key(self.lock_key(lock));
        for (name, _) in values {
            call.key(self.key(name));
        }
        call.arg(owner).arg(self.channel()).arg(names.join("\n"));
        for (_, value) in values {
            call.arg(*value);
        }
        let done: i64 = call.invoke_async(&mut self.conn.clone()).await.map_err(self.err("writing under a lock"))?;
        Ok(done == 1)
    }

    /// The names each write changes, as other replicas announce them. The stream ends when the
    /// subscription's connection breaks; the caller subscribes again (and polls meanwhile).
    pub async fn changes(&self) -> Result<impl futures_util::Stream<Item = Vec<String>> + use<>, RedisStoreError> {
        use futures_util::StreamExt;
        let mut pubsub = self.client.get_async_pubsub().await.map_err(self.err("SUBSCRIBE"))?;
        pubsub.subscribe(self.channel()).await.map_err(self.err("SUBSCRIBE"))?;
        Ok(pubsub.into_on_message().map(|msg| {
            let text = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
            text.lines().map(str::to_string).collect()
        }))
    }

    /// The server's version, eviction policy and persistence, for `doctor`.
    pub async fn facts(&self) -> Result<ServerFacts, RedisStoreError> {
        let mut conn = self.conn.clone();
        // The default sections: server, memory and persistence among them.
        let info: String = redis::cmd("INFO").query_async(&mut conn).await.map_err(self.err("INFO"))?;
        let field = |name: &str| {
            info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).unwrap_or_default().trim().to_string()
        };
        // Managed services often refuse CONFIG; that only hides the RDB schedule.
        let save: Option<Vec<String>> = redis::cmd("CONFIG").arg("GET").arg("save").query_async(&mut conn).await.ok();
        Ok(ServerFacts {
            version: field("redis_version"),
            maxmemory_policy: field("maxmemory_policy"),
            aof_enabled: field("aof_enabled") == "1",
            rdb_save: save.and_then(|v| v.get(1).cloned()),
        })
    }
}

/// `scheme://host:port`: what messages show of a Redis URL.
fn shown(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    }
}

/// `text` with the characters `SCAN MATCH` gives meaning to escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A duration in whole milliseconds, at least 1 (Redis refuses a zero expiry).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_patterns_escape_what_scan_would_read_as_a_glob() {
        assert_eq!(glob_escape("relay[1]:acme/*?\\"), "relay\\[1\\]:acme/\\*\\?\\\\");
    }
}
