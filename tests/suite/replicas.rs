//! Replicas that share no disk, only a Redis store: real relays, a real Pebble and a real
//! `redis-server`. One account and one order per hostname across them, every replica serving
//! the same certificate, a renewal reaching every replica within seconds, keys sealed in Redis,
//! and serving (and starting) while Redis is away.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::acme::{HOST, VaPorts, acme_config, bind_ports, cli, logs, served_chain};
use crate::common::RelayUnderTest;
use crate::common::pebble::{Pebble, PebbleOptions};
use crate::common::redis::Redis;

/// A relay config for the ACME site of [`acme_config`] on the shared store at `redis`, with
/// `cache` as its own folder and private keys sealed with `key_file`.
fn replica_config(pebble: &Pebble, redis: &Redis, cache: &Path, key_file: &Path) -> String {
    replica_config_at(&pebble.directory_url(), pebble, redis, cache, key_file)
}

/// [`replica_config`] with the ACME directory at `directory` (a front of Pebble).
fn replica_config_at(directory: &str, pebble: &Pebble, redis: &Redis, cache: &Path, key_file: &Path) -> String {
    let toml = acme_config(cache, directory, pebble.ca_path(), "tls-alpn-01", "", "");
    let shared = format!("storage = \"{}\"\nstorage_key_file = \"{}\"", redis.url(), key_file.display());
    let toml = toml.replace(&format!("storage = \"{}\"", cache.display()), &shared);
    format!("{toml}\n[redis]\ncache = \"{}\"\n", cache.display())
}

/// A storage key file (0600) in `dir`.
fn key_file(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("storage.key");
    std::fs::write(&path, "ZmFrZS1idXQtMzItYnl0ZXMtbG9uZy1zdG9yYWdlLWs=\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// What every test here stands on: Redis, Pebble validating against `ports` (replica A's), a
/// folder for the replicas' caches and their storage key.
struct Lab {
    redis: Redis,
    pebble: Pebble,
    dir: tempfile::TempDir,
    key: std::path::PathBuf,
}

impl Lab {
    async fn start(ports: &oauth_relay::Listeners) -> Lab {
        logs();
        let redis = Redis::start().await;
        let pebble = Pebble::start(PebbleOptions::new(ports.http_port(), ports.https_port())).await;
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path());
        Lab { redis, pebble, dir, key }
    }

    /// The config of replica `name` (its cache is the folder `name`).
    fn config(&self, name: &str) -> String {
        replica_config(&self.pebble, &self.redis, &self.dir.path().join(name), &self.key)
    }
}

/// Waits (at most `within`) until `relay` serves the certificate with `serial`.
async fn serves(relay: &RelayUnderTest, client: &std::sync::Arc<rustls::ClientConfig>, serial: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (now, _) = served_chain(relay.https, client).await;
        if now == serial {
            return;
        }
        assert!(Instant::now() < deadline, "{} still serves {now}, not {serial}", relay.https);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_redis_make_one_account_one_order_and_serve_one_certificate() {
    let ports_a = bind_ports().await;
    // Pebble validates against replica A only: whichever replica orders, A answers.
    let lab = Lab::start(&ports_a).await;
    let (redis, pebble) = (&lab.redis, &lab.pebble);
    let a = RelayUnderTest::on(&lab.config("cache-0"), ports_a);
    let b = RelayUnderTest::on(&lab.config("cache-1"), bind_ports().await);
    let c = RelayUnderTest::on(&lab.config("cache-2"), bind_ports().await);
    for r in [&a, &b, &c] {
        r.wait_ready().await;
    }
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let (serial, _) = served_chain(a.https, &client).await;
    for r in [&b, &c] {
        assert_eq!(served_chain(r.https, &client).await.0, serial);
    }
    assert_eq!((pebble.orders(), pebble.accounts()), (1, 1), "one order and one account for three replicas");

    // In Redis: the certificate, and its key and the account key sealed.
    let folder = oauth_relay::acme::store::folder_name(&url::Url::parse(&pebble.directory_url()).unwrap());
    let stored = |name: &str| redis.cli(&["GET", &format!("oauth-relay:acme/{folder}/{name}")]);
    assert!(stored(&format!("{HOST}/chain-{serial}.pem")).starts_with("-----BEGIN CERTIFICATE-----"));
    for secret in [format!("{HOST}/key-{serial}.pem"), "account.json".to_string()] {
        let value = stored(&secret);
        assert!(value.starts_with("oauth-relay-sealed:v1:"), "{secret}: {value}");
        assert!(!value.contains("PRIVATE KEY") && !value.contains("\"d\""), "{secret} in clear");
    }
    assert_eq!(redis.cli(&["KEYS", "oauth-relay:lock:*"]).trim(), "", "every lock released");

    // Serving asks Redis nothing: 60 handshakes and requests, and the only commands Redis
    // counts meanwhile are the two INFO calls that read the count.
    let processed = || -> u64 {
        let info = redis.cli(&["INFO", "stats"]);
        info.lines().find_map(|l| l.strip_prefix("total_commands_processed:")).unwrap().trim().parse().unwrap()
    };
    let before = processed();
    for r in [&a, &b, &c].repeat(20) {
        assert_eq!(served_chain(r.https, &client).await.0, serial);
    }
    assert_eq!(processed() - before, 1, "Redis calls per handshake: none");

    // `cert renew` from a fourth process with a folder of its own: every replica serves the
    // new certificate within seconds, and none orders another.
    let config_path = lab.dir.path().join("renew.toml");
    std::fs::write(&config_path, lab.config("cache-3")).unwrap();
    // Load on all three meanwhile: a request on a fresh connection to each, over and over.
    let stop_load = tokio_util::sync::CancellationToken::new();
    let load = {
        let (stop, client, addrs) = (stop_load.clone(), client.clone(), [a.https, b.https, c.https]);
        tokio::spawn(async move {
            let (mut done, mut failed) = (0u32, Vec::new());
            while !stop.is_cancelled() {
                for addr in addrs {
                    let reply = crate::common::TlsClient::new(addr, client.clone())
                        .send(HOST, "GET", "/healthz", &[], "")
                        .await;
                    if reply.status == 200 { done += 1 } else { failed.push(reply.status) }
                }
            }
            (done, failed)
        })
    };
    let out = cli(&["cert", "renew"], &config_path, &[HOST]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "cert renew: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let renewed = stdout.split("serial ").nth(1).and_then(|s| s.split(',').next()).expect("a serial").to_string();
    assert_ne!(renewed, serial);
    for r in [&a, &b, &c] {
        serves(r, &client, &renewed, Duration::from_secs(10)).await;
    }
    stop_load.cancel();
    let (done, failed) = load.await.unwrap();
    assert!(done >= 3 && failed.is_empty(), "{done} answered, failed: {failed:?}");
    assert_eq!((pebble.orders(), pebble.accounts()), (2, 1), "only the CLI's order");

    // `cert status` reads the shared store, from any folder.
    let out = cli(&["cert", "status"], &config_path, &[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&format!("  serial         {renewed}\n")), "{text}");
    for mut r in [a, b, c] {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_serving_without_redis_and_one_started_meanwhile_serves_its_cache() {
    let ports_a = bind_ports().await;
    let mut lab = Lab::start(&ports_a).await;
    let a = RelayUnderTest::on(&lab.config("a"), ports_a);
    let mut b = RelayUnderTest::on(&lab.config("b"), bind_ports().await);
    a.wait_ready().await;
    b.wait_ready().await;
    let client = lab.pebble.client_config(&[b"http/1.1"]).await;
    let (serial, _) = served_chain(a.https, &client).await;

    // Redis goes away: both keep serving and stay ready, saying why in a warning.
    lab.redis.kill();
    let (status, body) = a
        .wait_readyz("a note about the shared store", Duration::from_secs(90), |_, body| body.contains("shared store"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ready\nwarning: shared store unreachable since "), "{body}");
    assert_eq!(served_chain(b.https, &client).await.0, serial);

    // A replica restarted meanwhile serves what its folder holds.
    b.stop().await;
    let b2 = RelayUnderTest::on(&lab.config("b"), bind_ports().await);
    b2.wait_ready().await;
    assert_eq!(served_chain(b2.https, &client).await.0, serial);

    // Redis comes back empty. A new replica with an empty folder orders exactly once, and the
    // others take its certificate from the change feed.
    lab.redis.restart_empty().await;
    let c = RelayUnderTest::on(&lab.config("c"), bind_ports().await);
    c.wait_ready().await;
    let (fresh, _) = served_chain(c.https, &client).await;
    assert_ne!(fresh, serial);
    for r in [&a, &b2] {
        serves(r, &client, &fresh, Duration::from_secs(90)).await;
        let (status, body) = r.wait_readyz("no note", Duration::from_secs(60), |_, b| !b.contains("warning")).await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));
    }
    assert_eq!(lab.pebble.orders(), 2, "one order at first, one after Redis lost everything");
    for mut r in [a, b2, c] {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_storage_key_refuses_the_stored_keys_and_orders_nothing() {
    let ports_a = bind_ports().await;
    let lab = Lab::start(&ports_a).await;
    let (redis, pebble, dir) = (&lab.redis, &lab.pebble, lab.dir.path());
    let a = RelayUnderTest::on(&lab.config("a"), ports_a);
    a.wait_ready().await;
    assert_eq!(pebble.orders(), 1);

    // Another key file (a new first line: the key that sealed everything is gone).
    let other = dir.join("other.key");
    std::fs::write(&other, "b3RoZXItYnV0LTMyLWJ5dGVzLWxvbmctc3RvcmFnZSE=\n").unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let b = RelayUnderTest::on(&replica_config(pebble, redis, &dir.join("b"), &other), bind_ports().await);
    let (status, body) = b
        .wait_readyz("a reason naming the key", Duration::from_secs(20), |s, body| s == 503 && body.contains("key"))
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("which the storage key file does not hold"), "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pebble.orders(), 1, "never a silently new certificate");
    for mut r in [a, b] {
        r.stop().await;
    }
}

/// Runs `oauth-relay store copy --config CONFIG FROM TO`: exit status and output.
async fn store_copy(config: &Path, from: &str, to: &str) -> (i32, String) {
    let out = cli(&["store", "copy"], config, &[from, to]).await;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_a_folder_store_to_redis_and_back_without_ordering() {
    let ports = bind_ports().await;
    let lab = Lab::start(&ports).await;
    let (redis, pebble, dir) = (&lab.redis, &lab.pebble, lab.dir.path());
    let folder = dir.join("folder-store");

    // A relay on a folder gets its certificate.
    let folder_toml = acme_config(&folder, &pebble.directory_url(), pebble.ca_path(), "tls-alpn-01", "", "");
    let mut solo = RelayUnderTest::on(&folder_toml, ports);
    solo.wait_ready().await;
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let (serial, _) = served_chain(solo.https, &client).await;
    solo.stop().await;

    // Folder to Redis; a replica on Redis with an empty folder serves that certificate.
    let ports = bind_ports().await;
    let redis_toml = dir.join("redis.toml");
    std::fs::write(&redis_toml, lab.config("cache")).unwrap();
    let url = redis.url();
    let (code, text) = store_copy(&redis_toml, &folder.display().to_string(), &url).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("copied ") && text.contains(&format!(" names from {} to {url}", folder.display())),
        "{text}"
    );
    let (code, text) = store_copy(&redis_toml, &folder.display().to_string(), &url).await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("already holds a store"), "{text}");
    let replica = RelayUnderTest::on(&std::fs::read_to_string(&redis_toml).unwrap(), ports);
    replica.wait_ready().await;
    assert_eq!(served_chain(replica.https, &client).await.0, serial);

    // Redis back to a new folder: the same account, certificate and key.
    let back = dir.join("back");
    let (code, text) = store_copy(&redis_toml, &url, &back.display().to_string()).await;
    assert_eq!(code, 0, "{text}");
    let original = crate::acme::host_dir(&folder, pebble);
    let copied = crate::acme::host_dir(&back, pebble);
    for file in ["meta.json".to_string(), format!("key-{serial}.pem"), format!("chain-{serial}.pem")] {
        assert_eq!(std::fs::read(copied.join(&file)).unwrap(), std::fs::read(original.join(&file)).unwrap(), "{file}");
    }
    assert_eq!(
        std::fs::read(copied.parent().unwrap().join("account.json")).unwrap(),
        std::fs::read(original.parent().unwrap().join("account.json")).unwrap()
    );
    assert_eq!((pebble.orders(), pebble.accounts()), (1, 1), "no order, no account: the store moved");
    let mut replica = replica;
    replica.stop().await;
}

/// The relay binary the measurement runs: `OAUTH_RELAY_BENCH_BIN` (`bench/replicas` sets a
/// release build), else the test build.
fn bench_bin() -> std::path::PathBuf {
    std::env::var_os("OAUTH_RELAY_BENCH_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_oauth-relay").into())
}

/// `VmRSS` of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

/// Not a test: the figures `bench/replicas` prints. Three replica processes on one Redis:
/// the time from a renewal's commit (`cert renew` returning) to every replica serving it, over
/// 20 renewals; then the memory of a replica with 100 hostnames, for the one that ordered them
/// and for one that only took them from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by bench/replicas"]
async fn measure_renewal_propagation_and_memory() {
    use crate::common::process::RelayProcess;
    let bin = bench_bin();
    let redis = Redis::start().await;
    let (http, https) = (crate::common::pebble::free_port(), crate::common::pebble::free_port());
    let pebble = Pebble::start(PebbleOptions::new(http, https)).await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let config = |name: &str, hosts: &[String], https_port: u16| {
        let cache = dir.path().join(name);
        let toml = replica_config(&pebble, &redis, &cache, &key)
            .replace("https = [\"127.0.0.1:0\"]", &format!("https = [\"127.0.0.1:{https_port}\"]"))
            .replace(&format!("hostnames = [\"{HOST}\"]"), &format!("hostnames = {hosts:?}"));
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        path
    };
    let one = vec![HOST.to_string()];
    let mut replicas = Vec::new();
    for (i, port) in [https, 0, 0].into_iter().enumerate() {
        let mut p = RelayProcess::serve_bin(&bin, &config(&format!("r{i}"), &one, port), &[], |_| {});
        let addr = p.https_addr().await;
        replicas.push((p, addr));
    }
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let mut first = String::new();
    for (_, addr) in &replicas {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(tls) = crate::common::TlsClient::new(*addr, client.clone()).connect(HOST).await {
                drop(tls);
                first = served_chain(*addr, &client).await.0;
                break;
            }
            assert!(Instant::now() < deadline, "no certificate on {addr}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let renew_config = config("renewer", &one, 0);
    let mut waits = Vec::new();
    let mut serial = first;
    for _ in 0..20 {
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["cert", "renew", "--config"]).arg(&renew_config).arg(HOST).env("RUST_LOG", "warn");
        let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
        let committed = Instant::now();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let new = stdout.split("serial ").nth(1).and_then(|s| s.split(',').next()).unwrap().to_string();
        assert_ne!(new, serial);
        for (_, addr) in &replicas {
            while served_chain(*addr, &client).await.0 != new {
                assert!(committed.elapsed() < Duration::from_secs(30), "{addr} never served {new}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        waits.push(committed.elapsed());
        serial = new;
    }
    waits.sort();
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    println!(
        "renewal to every replica serving it, 20 renewals, 3 replicas: median {} ms, p99 {} ms, min {} ms",
        ms(waits[waits.len() / 2]),
        ms(waits[waits.len() - 1]),
        ms(waits[0])
    );
    let idle = rss_kib(replicas[1].0.pid());
    println!("replica RSS with 1 hostname: {idle} KiB");
    drop(replicas);

    // 100 hostnames: one replica orders them all, a second only takes them from Redis.
    let hosts: Vec<String> = (0..100).map(|i| format!("h{i}.{HOST}")).collect();
    /// Waits (at most 5 minutes) until `p` has logged `needle` 100 times.
    async fn hundred(p: &RelayProcess, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while p.log().matches(needle).count() < 100 {
            assert!(Instant::now() < deadline, "fewer than 100 `{needle}`:\n{}", p.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut orderer = RelayProcess::serve_bin(&bin, &config("many-a", &hosts, https), &[], |_| {});
    orderer.https_addr().await;
    hundred(&orderer, "new certificate in use").await;
    let mut follower = RelayProcess::serve_bin(&bin, &config("many-b", &hosts, 0), &[], |_| {});
    follower.https_addr().await;
    hundred(&follower, "certificate loaded from the store").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "replica RSS with 100 hostnames: {} KiB (the one that ordered), {} KiB (one that took them from Redis); Pebble orders {}",
        rss_kib(orderer.pid()),
        rss_kib(follower.pid()),
        pebble.orders()
    );
}

/// A TLS 1.3 connection to `relay` for `HOST` with `client` (which keeps its sessions), one
/// request answered on it; whether the handshake resumed a session.
async fn resumed(relay: &RelayUnderTest, client: &std::sync::Arc<rustls::ClientConfig>) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = crate::common::TlsClient::new(relay.https, client.clone()).connect(HOST).await.expect("handshake");
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    // A request and its answer: the session ticket comes before the answer.
    tls.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    resumed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_resumes_its_tls_session_on_another_replica() {
    let ports_a = bind_ports().await;
    let lab = Lab::start(&ports_a).await;
    let (redis, pebble) = (&lab.redis, &lab.pebble);
    let a = RelayUnderTest::on(&lab.config("a"), ports_a);
    let b = RelayUnderTest::on(&lab.config("b"), bind_ports().await);
    a.wait_ready().await;
    b.wait_ready().await;
    // The ticket keys are in Redis, sealed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis.cli(&["GET", "oauth-relay:tls/tickets.json"]).starts_with("oauth-relay-sealed:v1:") {
        assert!(Instant::now() < deadline, "no ticket keys in Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A session from A resumes on B (once B holds the keys, within moments).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A browser keeps its sessions (the tests' usual client resumes none).
        let mut config = (*pebble.client_config(&[b"http/1.1"]).await).clone();
        config.resumption = rustls::client::Resumption::default();
        let browser = std::sync::Arc::new(config);
        assert!(!resumed(&a, &browser).await, "a first visit is a full handshake");
        if resumed(&b, &browser).await {
            break;
        }
        assert!(Instant::now() < deadline, "B never resumed A's session");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for mut r in [a, b] {
        r.stop().await;
    }
}

/// Replica A, a process of its own, holding the order lock with its order held at the
/// challenge by a front of Pebble; Pebble validates against `ports_b`, which replica B gets.
struct HeldOrder {
    redis: Redis,
    pebble: Pebble,
    front: crate::common::acme_front::AcmeFront,
    dir: tempfile::TempDir,
    key: std::path::PathBuf,
    ports_b: Option<oauth_relay::Listeners>,
    a: crate::common::process::RelayProcess,
}

impl HeldOrder {
    async fn start() -> HeldOrder {
        use crate::common::acme_front::{AcmeFront, Faults};
        logs();
        let redis = Redis::start().await;
        let ports_b = bind_ports().await;
        let pebble = Pebble::start(PebbleOptions::new(ports_b.http_port(), ports_b.https_port())).await;
        let front = AcmeFront::start(&pebble, Faults { hold_challenges: true, ..Faults::default() }).await;
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path());
        let a_path = dir.path().join("a.toml");
        std::fs::write(
            &a_path,
            replica_config_at(&front.directory_url(), &pebble, &redis, &dir.path().join("a"), &key),
        )
        .unwrap();
        let a = crate::common::process::RelayProcess::serve(&a_path, &[], |_| {});
        let deadline = Instant::now() + Duration::from_secs(30);
        while front.challenges() == 0 {
            assert!(Instant::now() < deadline, "A placed no order:\n{}", a.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        HeldOrder { redis, pebble, front, dir, key, ports_b: Some(ports_b), a }
    }

    /// Replica B, in this process, on the ports Pebble validates against.
    fn start_b(&mut self) -> RelayUnderTest {
        let toml = replica_config_at(
            &self.front.directory_url(),
            &self.pebble,
            &self.redis,
            &self.dir.path().join("b"),
            &self.key,
        );
        RelayUnderTest::on(&toml, self.ports_b.take().expect("one replica B"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_order_is_taken_over_once_its_lock_expires() {
    let mut held = HeldOrder::start().await;
    // Killed: its lock stays in Redis until it expires (90 s after its last renewal).
    held.a.signal("KILL");
    let killed = Instant::now();
    held.front.open_gate();
    let b = held.start_b();
    let (status, body) = b.wait_readyz("ready", Duration::from_secs(150), |s, _| s == 200).await;
    assert_eq!(status, 200, "{body}");
    let waited = killed.elapsed();
    assert!(waited >= Duration::from_secs(55), "B ordered while A's lock was still live: after {waited:?}");
    let client = held.pebble.client_config(&[b"http/1.1"]).await;
    served_chain(b.https, &client).await;
    assert_eq!(held.pebble.orders(), 2, "A's abandoned order and B's");
    let mut b = b;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lock_serves_the_newer_certificate_and_leaves_it_in_redis() {
    let mut held = HeldOrder::start().await;
    let a_https = held.a.https_addr().await;
    held.a.signal("STOP");
    held.front.open_gate();

    // B takes the lock once A's expires, orders and commits its certificate.
    let b = held.start_b();
    b.wait_readyz("ready", Duration::from_secs(150), |s, _| s == 200).await;
    let client = held.pebble.client_config(&[b"http/1.1"]).await;
    let (newer, _) = served_chain(b.https, &client).await;

    // A wakes up mid-order and learns its lock is gone. Whatever its order comes to (here its
    // timers, run late, end it; a commit would be refused by the fencing script, see
    // `redis_store::a_holder_whose_lock_expired_can_no_longer_write_or_release`), Redis keeps
    // B's certificate and A serves it.
    held.a.signal("CONT");
    held.a.wait_line("the lost lock", Duration::from_secs(60), |l| l.contains("lost a lock while holding it")).await;
    let folder = oauth_relay::acme::store::folder_name(&url::Url::parse(&held.front.directory_url()).unwrap());
    let meta = held.redis.cli(&["GET", &format!("oauth-relay:acme/{folder}/{HOST}/meta.json")]);
    assert!(meta.contains(&format!("\"serial\": \"{newer}\"")), "Redis keeps B's certificate: {meta}");
    // (A may have no certificate to serve for a moment: it refuses handshakes until then.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = crate::common::TlsClient::new(a_https, client.clone()).connect(HOST).await.is_ok();
        if up && served_chain(a_https, &client).await.0 == newer {
            break;
        }
        assert!(Instant::now() < deadline, "A does not serve B's certificate:\n{}", held.a.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held.pebble.orders(), 2, "A's order and B's, no third");
    let mut b = b;
    b.stop().await;
}
