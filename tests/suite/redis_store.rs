//! The store on a real `redis-server`: values, locks that only their holder renews or
//! releases, writes fenced by the lock, the change feed, ACL users and TLS, and what `doctor`
//! learns of the server.

use std::time::Duration;

use futures_util::StreamExt;
use oauth_relay::config::{RedisStorage, Secret};
use oauth_relay::storage::redis::{RedisStore, Taken};

use crate::common::Pki;
use crate::common::redis::{Redis, RedisOptions};

fn settings(redis: &Redis) -> RedisStorage {
    RedisStorage {
        url: redis.url().parse().expect("a redis URL"),
        username: None,
        password: None,
        password_from: None,
        ca_file: redis.tls.as_ref().map(|pki| pki.ca_path.clone()),
        prefix: "oauth-relay".into(),
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
    }
}

async fn store(redis: &Redis) -> RedisStore {
    RedisStore::connect(&settings(redis)).await.expect("connect to redis")
}

#[tokio::test]
async fn values_are_stored_listed_and_removed_under_the_prefix() {
    let redis = Redis::start().await;
    let store = store(&redis).await;
    store.put("acme/pebble/auth.example.com/meta.json", b"{\"serial\":\"01\"}").await.unwrap();
    store.put("acme/pebble/auth.example.com/key-01.pem", b"KEY").await.unwrap();
    store.put("acme/pebble/other.example.com/meta.json", b"{}").await.unwrap();
    store.put("acme/pebble/auth.example.com.evil/meta.json", b"{}").await.unwrap();
    assert_eq!(
        store.get("acme/pebble/auth.example.com/meta.json").await.unwrap().as_deref(),
        Some(&b"{\"serial\":\"01\"}"[..])
    );
    assert_eq!(store.get("acme/pebble/nothing").await.unwrap(), None);
    assert_eq!(
        store.list("acme/pebble/auth.example.com/").await.unwrap(),
        ["acme/pebble/auth.example.com/key-01.pem", "acme/pebble/auth.example.com/meta.json"]
    );
    assert_eq!(redis.cli(&["GET", "oauth-relay:acme/pebble/auth.example.com/key-01.pem"]), "KEY\n");
    store.delete("acme/pebble/auth.example.com/key-01.pem").await.unwrap();
    assert_eq!(store.list("acme/pebble/auth.example.com/").await.unwrap(), ["acme/pebble/auth.example.com/meta.json"]);

    // Another prefix is another store in the same database.
    let mut other = settings(&redis);
    other.prefix = "staging".into();
    let other = RedisStore::connect(&other).await.unwrap();
    assert_eq!(other.get("acme/pebble/auth.example.com/meta.json").await.unwrap(), None);
    assert!(other.list("").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_challenge_answer_expires_on_its_own() {
    let redis = Redis::start().await;
    let store = store(&redis).await;
    store.put_for("challenge/tls-alpn-01/auth.example.com", b"answer", Duration::from_millis(300)).await.unwrap();
    assert!(store.get("challenge/tls-alpn-01/auth.example.com").await.unwrap().is_some());
    let ttl: i64 = redis.cli(&["PTTL", "oauth-relay:challenge/tls-alpn-01/auth.example.com"]).trim().parse().unwrap();
    assert!((1..=300).contains(&ttl), "{ttl}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(store.get("challenge/tls-alpn-01/auth.example.com").await.unwrap(), None);
}

#[tokio::test]
async fn a_lock_has_one_holder_and_only_its_holder_renews_or_releases_it() {
    let redis = Redis::start().await;
    let (a, b) = (store(&redis).await, store(&redis).await);
    let name = "order/auth.example.com";
    assert_eq!(a.try_lock(name, "relay-a/1/x", Duration::from_secs(30)).await.unwrap(), Taken::Held);
    match b.try_lock(name, "relay-b/2/y", Duration::from_secs(30)).await.unwrap() {
        Taken::Busy { owner, expires } => {
            assert_eq!(owner, "relay-a/1/x");
            let left = expires.duration_since(std::time::SystemTime::now()).unwrap_or_default();
            assert!(left > Duration::from_secs(25), "{left:?}");
        }
        held => panic!("two holders: {held:?}"),
    }
    assert_eq!(a.try_lock(name, "relay-a/1/x", Duration::from_secs(30)).await.unwrap(), Taken::Held, "its owner again");
    assert!(a.renew(name, "relay-a/1/x", Duration::from_secs(60)).await.unwrap());
    let pttl: i64 = redis.cli(&["PTTL", "oauth-relay:lock:order/auth.example.com"]).trim().parse().unwrap();
    assert!(pttl > 59_000, "renewed to its full ttl: {pttl}");

    // Another owner can neither renew, write under nor release it.
    assert!(!b.renew(name, "relay-b/2/y", Duration::from_secs(30)).await.unwrap());
    assert!(!b.put_fenced(name, "relay-b/2/y", &[("acme/x/meta.json", b"forged")]).await.unwrap());
    assert!(!b.release(name, "relay-b/2/y").await.unwrap());
    assert_eq!(b.get("acme/x/meta.json").await.unwrap(), None);
    assert!(a.release(name, "relay-a/1/x").await.unwrap());
    assert!(!a.release(name, "relay-a/1/x").await.unwrap(), "released once");
    assert_eq!(b.try_lock(name, "relay-b/2/y", Duration::from_secs(30)).await.unwrap(), Taken::Held, "free again");
}

#[tokio::test]
async fn a_holder_whose_lock_expired_can_no_longer_write_or_release() {
    // The fencing case: a replica paused past its lock wakes up and tries to commit the
    // certificate it ordered, after another replica took the lock and committed a newer one.
    let redis = Redis::start().await;
    let (paused, next) = (store(&redis).await, store(&redis).await);
    let name = "order/auth.example.com";
    assert_eq!(paused.try_lock(name, "paused", Duration::from_millis(200)).await.unwrap(), Taken::Held);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(next.try_lock(name, "next", Duration::from_secs(30)).await.unwrap(), Taken::Held, "expired, free");
    let meta = "acme/pebble/auth.example.com/meta.json";
    let key = "acme/pebble/auth.example.com/key-02.pem";
    assert!(next.put_fenced(name, "next", &[(meta, b"serial 02"), (key, b"KEY 02")]).await.unwrap());

    assert!(!paused.put_fenced(name, "paused", &[(meta, b"serial 01"), (key, b"KEY 01")]).await.unwrap());
    assert!(!paused.renew(name, "paused", Duration::from_secs(30)).await.unwrap());
    assert!(!paused.release(name, "paused").await.unwrap());
    assert_eq!(next.get(meta).await.unwrap().as_deref(), Some(&b"serial 02"[..]));
    assert_eq!(next.get(key).await.unwrap().as_deref(), Some(&b"KEY 02"[..]));
    assert!(next.renew(name, "next", Duration::from_secs(30)).await.unwrap(), "the new holder's lock is untouched");
}

#[tokio::test]
async fn every_write_is_announced_to_other_replicas() {
    let redis = Redis::start().await;
    let (writer, reader) = (store(&redis).await, store(&redis).await);
    let mut changes = Box::pin(reader.changes().await.unwrap());
    let lock = "order/auth.example.com";
    assert_eq!(writer.try_lock(lock, "w", Duration::from_secs(30)).await.unwrap(), Taken::Held);
    let meta = "acme/pebble/auth.example.com/meta.json";
    let chain = "acme/pebble/auth.example.com/chain-02.pem";
    assert!(writer.put_fenced(lock, "w", &[(chain, b"CHAIN"), (meta, b"META")]).await.unwrap());
    writer.put("acme/pebble/auth.example.com/status.json", b"{}").await.unwrap();
    let within = Duration::from_secs(5);
    let first = tokio::time::timeout(within, changes.next()).await.expect("in time");
    assert_eq!(first, Some(vec![chain.to_string(), meta.to_string()]));
    let second = tokio::time::timeout(within, changes.next()).await.expect("in time");
    assert_eq!(second, Some(vec!["acme/pebble/auth.example.com/status.json".to_string()]));
}

#[tokio::test]
async fn an_acl_user_with_its_password_works_and_a_wrong_password_says_so_without_echoing_it() {
    let user = ("relay".to_string(), "correct-horse-battery".to_string());
    let redis = Redis::start_with(RedisOptions { user: Some(user), ..Default::default() }).await;
    let mut s = settings(&redis);
    s.username = Some("relay".into());
    s.password = Some(Secret("correct-horse-battery".into()));
    let store = RedisStore::connect(&s).await.expect("the ACL user connects");
    let lock = "order/auth.example.com";
    assert_eq!(store.try_lock(lock, "me", Duration::from_secs(5)).await.unwrap(), Taken::Held);
    assert!(store.put_fenced(lock, "me", &[("acme/x/meta.json", b"m")]).await.unwrap(), "scripts are allowed");
    assert_eq!(store.list("acme/").await.unwrap(), ["acme/x/meta.json"]);
    let facts = store.facts().await.expect("INFO is allowed");
    assert_eq!(facts.rdb_save, None, "CONFIG is not: the schedule is unknown");

    s.password = Some(Secret("wrong-guess-123".into()));
    let e = RedisStore::connect(&s).await.err().expect("refused").to_string();
    assert!(e.starts_with(&format!("redis://127.0.0.1:{}: cannot connect: ", redis.port)), "{e}");
    assert!(e.contains("WRONGPASS") || e.contains("AuthenticationFailed"), "{e}");
    assert!(!e.contains("wrong-guess") && !e.contains("correct-horse"), "{e}");
}

#[tokio::test]
async fn rediss_with_a_private_ca_is_verified() {
    let redis = Redis::start_with(RedisOptions { tls: Some(Pki::new()), ..Default::default() }).await;
    let store = store(&redis).await;
    store.put("acme/x/meta.json", b"over TLS").await.unwrap();
    assert_eq!(store.get("acme/x/meta.json").await.unwrap().as_deref(), Some(&b"over TLS"[..]));

    // Another CA: the handshake fails and nothing is sent.
    let mut untrusted = settings(&redis);
    let other = Pki::new();
    untrusted.ca_file = Some(other.ca_path.clone());
    let e = RedisStore::connect(&untrusted).await.err().expect("refused").to_string();
    assert!(e.starts_with(&format!("rediss://localhost:{}: cannot connect: ", redis.port)), "{e}");
}

#[tokio::test]
async fn doctor_learns_the_version_eviction_policy_and_persistence() {
    let redis = Redis::start().await;
    let facts = store(&redis).await.facts().await.unwrap();
    assert!(facts.version.starts_with(|c: char| c.is_ascii_digit()), "{facts:?}");
    assert_eq!(facts.maxmemory_policy, "noeviction");
    assert!(!facts.aof_enabled);
    assert_eq!(facts.rdb_save.as_deref(), Some(""), "started with --save \"\"");
}

#[tokio::test]
async fn a_server_that_is_down_is_a_clear_error_within_the_connect_timeout() {
    let mut redis = Redis::start().await;
    redis.kill();
    let mut s = settings(&redis);
    s.connect_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let e = RedisStore::connect(&s).await.err().expect("refused").to_string();
    assert!(e.starts_with(&format!("redis://127.0.0.1:{}: cannot connect: ", redis.port)), "{e}");
    assert!(started.elapsed() < Duration::from_secs(20), "bounded: {:?}", started.elapsed());
}

/// A configuration whose store is `storage`, with these `[redis]` and extra `[server]` lines.
fn redis_config(storage: &str, server: &str, redis: &str) -> String {
    format!(
        "[server]\nhttps = [\"127.0.0.1:8443\"]\nstorage = \"{storage}\"\n{server}\n\n[redis]\n{redis}\n\n\
         [[site]]\nhostnames = [\"auth.example.test\"]\n"
    )
}

/// Every problem of a refused configuration, rendered.
fn refused(text: &str) -> Vec<String> {
    match oauth_relay::Config::parse("relay.toml", text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(oauth_relay::config::ConfigError::Invalid(p)) => p.iter().map(ToString::to_string).collect(),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn private_file(dir: &std::path::Path, name: &str, text: &str, mode: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.display().to_string()
}

#[test]
fn a_redis_store_is_configured_with_a_password_from_a_file_that_check_never_shows() {
    let dir = tempfile::tempdir().unwrap();
    let password = private_file(dir.path(), "redis-password", "hunter2-but-longer\n", 0o600);
    let key = private_file(dir.path(), "storage.key", &format!("{}\n", "A".repeat(43) + "="), 0o600);
    let text = redis_config(
        "rediss://redis.internal:6380/2",
        &format!("storage_key_file = \"{key}\""),
        &format!(
            "username = \"relay\"\npassword_file = \"{password}\"\nprefix = \"prod\"\ncache = \"/var/lib/oauth-relay\""
        ),
    );
    let config = oauth_relay::Config::parse("relay.toml", &text).expect("accepted");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let shared = config.server.shared.as_ref().expect("a shared store");
    assert_eq!(shared.url.as_str(), "rediss://redis.internal:6380/2");
    assert_eq!(shared.username.as_deref(), Some("relay"));
    assert_eq!(shared.password, Some(Secret("hunter2-but-longer".into())), "the trailing newline is not part of it");
    assert_eq!(shared.prefix, "prod");
    assert_eq!(config.server.storage, std::path::PathBuf::from("/var/lib/oauth-relay"), "the local cache");

    let report = oauth_relay::config::report(&config);
    let line = report.lines().find(|l| l.contains("certificate store")).unwrap();
    assert_eq!(
        line,
        format!(
            "  certificate store   rediss://redis.internal:6380/2 (prefix prod, user relay, password from \
             password_file {password}; keys sealed with {key}; cache /var/lib/oauth-relay)"
        )
    );
    assert!(!format!("{report}{config:?}").contains("hunter2"), "neither check nor Debug shows the password");
}

#[test]
fn a_password_in_the_url_is_refused_and_never_echoed() {
    let text = redis_config("redis://relay:hunter2@127.0.0.1:6379/0", "", "");
    let problems = refused(&text);
    assert_eq!(
        problems,
        ["relay.toml:3: server.storage: holds a password, which would show wherever the URL does; put it in \
             [redis] password_file or password_env"]
    );
}

#[test]
fn redis_settings_that_cannot_work_are_refused_with_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let exposed = private_file(dir.path(), "storage.key", &format!("{}\n", "A".repeat(43) + "="), 0o644);
    let text = redis_config(
        "redis://user-in-url@127.0.0.1:6379/x",
        &format!("storage_key_file = \"{exposed}\""),
        "username = \"relay\"\npassword_env = \"OAUTH_RELAY_TEST_NEVER_SET\"\nprefix = \"a b\"\ncommand_timeout = \"0s\"",
    );
    let problems = refused(&text);
    let expect = [
        "relay.toml:3: server.storage: `/x` is not a database number such as /0".to_string(),
        format!(
            "relay.toml:4: server.storage_key_file: {exposed}: readable or writable by every user of the host \
             (mode 644); `chmod 600` it (in Kubernetes, mount the Secret with defaultMode 0440 and an fsGroup)"
        ),
        "relay.toml:7: redis.username: the URL names a user too; name it in one place".to_string(),
        "relay.toml:8: redis.password_env: the environment variable OAUTH_RELAY_TEST_NEVER_SET is not set".to_string(),
        "relay.toml:9: redis.prefix: must be 1 to 64 characters of letters, digits and - _ . : /".to_string(),
        "relay.toml:10: redis.command_timeout: `0s` is out of range: use 100ms to 5m".to_string(),
    ];
    assert_eq!(problems, expect);
    let problems = refused(&redis_config("memcached://127.0.0.1:11211", "", ""));
    assert_eq!(
        problems,
        [
            "relay.toml:3: server.storage: `memcached://` is not a store; use a folder path, or a redis:// or rediss:// URL"
        ]
    );
}

#[test]
fn keys_in_clear_in_redis_and_across_the_network_are_a_warning() {
    let text = redis_config("redis://redis.internal:6379/0", "", "password_env = \"PATH\"\nca_file = \"/ca.pem\"");
    let config = oauth_relay::Config::parse("relay.toml", &text).expect("accepted");
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "relay.toml:3: server.storage: private keys would be stored in Redis in clear, and cross the network in \
             clear (redis://); set server.storage_key_file to seal them",
            "relay.toml:8: redis.ca_file: is used only with rediss:// (TLS); the URL is redis://",
        ]
    );
    let folder = redis_config("/var/lib/oauth-relay", "", "prefix = \"x\"");
    let config = oauth_relay::Config::parse("relay.toml", &folder).expect("accepted");
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings, ["relay.toml:6: redis: is read only when server.storage is a redis:// or rediss:// URL"]);
}

/// What `doctor` says of the Redis `settings` name, as "level: message" lines.
async fn doctor(settings: &RedisStorage) -> Vec<String> {
    let findings = oauth_relay::doctor::redis::check(settings, Duration::from_secs(5)).await;
    findings.iter().map(|f| format!("{}: {}", f.level, f.message)).collect()
}

#[tokio::test]
async fn doctor_says_what_would_lose_certificates_and_who_may_not_write() {
    let redis = Redis::start().await;
    let s = settings(&redis);
    let found = doctor(&s).await;
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    assert_eq!(found[0], format!("ok: {url} answers (prefix oauth-relay)"));
    assert_eq!(found[1], "ok: this user can write, take locks and run the relay's scripts");
    assert!(found[2].starts_with("ok: server version 7."), "{found:?}");
    assert_eq!(found[3], "ok: maxmemory-policy noeviction: nothing is evicted");
    assert!(found[4].starts_with("warning: no persistence"), "{found:?}");
    assert_eq!(redis.cli(&["KEYS", "*"]).trim(), "", "the probe left nothing behind");

    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    redis.cli(&["CONFIG", "SET", "appendonly", "yes"]);
    let found = doctor(&s).await;
    assert_eq!(
        found[3],
        "error: maxmemory-policy allkeys-lru: Redis may evict certificates and keys when memory runs short"
    );
    assert!(found[4].starts_with("ok: append-only file on"), "{found:?}");

    let mut wrong = s.clone();
    wrong.username = Some("nobody-here".into());
    wrong.password = Some(Secret("guess".into()));
    let found = doctor(&wrong).await;
    assert_eq!(found.len(), 1);
    let server = format!("redis://127.0.0.1:{}", redis.port);
    assert!(found[0].starts_with(&format!("error: {server}: cannot connect: ")), "{found:?}");
    assert!(!found[0].contains("guess"), "{found:?}");
}
