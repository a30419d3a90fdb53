//! Automatic certificates that never get stuck: an attempt cut after finalize resumes its
//! order, a CA that forgot the account gets a new one, a renewal the CA says was already
//! replaced is ordered again without `replaces`. Against Pebble, and a fault-injecting front of
//! it where Pebble cannot produce the fault.

use std::time::{Duration, Instant};

use crate::acme::{HOST, VaPorts, acme_config, bind_ports, host_dir, logs, meta, rebind, served_chain};
use crate::common;
use common::RelayUnderTest;
use common::acme_front::{AcmeFront, Faults};
use common::pebble::{Pebble, PebbleOptions, same_serial};

/// `status.json` of the hostname as JSON (`null` while there is none).
fn status(storage: &std::path::Path, pebble: &Pebble) -> serde_json::Value {
    status_in(&host_dir(storage, pebble))
}

/// The hostname's folder of the store for the directory at `url` (the front's, not Pebble's).
fn host_dir_of(storage: &std::path::Path, url: &str) -> std::path::PathBuf {
    let url = url::Url::parse(url).unwrap();
    storage.join("acme").join(oauth_relay::acme::store::folder_name(&url)).join(HOST)
}

fn status_in(dir: &std::path::Path) -> serde_json::Value {
    std::fs::read(dir.join("status.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_cut_after_finalize_resumes_its_order_instead_of_ordering_again() {
    logs();
    let ports = bind_ports().await;
    let pebble = Pebble::start(PebbleOptions::new(ports.http_port(), ports.https_port())).await;
    let storage = tempfile::tempdir().unwrap();
    // The commit of the certificate fails: a folder sits where `meta.json` goes (as a full
    // disk or a crash right after finalize would leave it: issued at the CA, not stored here).
    let dir = host_dir(storage.path(), &pebble);
    std::fs::create_dir_all(dir.join("meta.json")).unwrap();
    let toml = acme_config(storage.path(), &pebble.directory_url(), pebble.ca_path(), "tls-alpn-01", "", "");
    let mut relay = RelayUnderTest::on(&toml, ports);

    let deadline = Instant::now() + Duration::from_secs(20);
    let failed = loop {
        let s = status(storage.path(), &pebble);
        if s["failures"].as_u64().unwrap_or(0) >= 1 {
            break s;
        }
        assert!(Instant::now() < deadline, "no failed attempt recorded: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let error = failed["last_error"].as_str().unwrap();
    assert!(error.contains("meta.json"), "{error}");
    assert_eq!(pebble.issued().len(), 1, "the CA issued the certificate");
    let pending: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("pending.json")).unwrap()).unwrap();
    assert!(pending["order_url"].as_str().unwrap().starts_with(&format!("https://{}/", pebble.listen)));
    assert_eq!(crate::acme::mode(&dir.join("pending.json")), 0o600);
    let report = oauth_relay::acme::status_report(&relay.config).await.expect("cert status");
    let pending_line = format!("  pending order  {} (finalized ", pending["order_url"].as_str().unwrap());
    assert!(report.contains(&pending_line), "{report}");

    // The disk is fixed: the next attempt downloads the certificate of that same order.
    std::fs::remove_dir(dir.join("meta.json")).unwrap();
    relay.wait_ready().await;
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let (serial, _) = served_chain(relay.https, &client).await;
    let m = meta(storage.path(), &pebble);
    assert_eq!(m["serial"], serial.as_str());
    assert_eq!(m["order_url"], pending["order_url"]);
    assert_eq!(pebble.orders(), 1, "no second order");
    let issued = pebble.issued();
    assert!(issued.len() == 1 && same_serial(&issued[0], &serial), "issued {issued:?}, serving {serial}");
    assert!(!dir.join("pending.json").exists(), "the pending order is forgotten once stored");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_forgot_the_account_gets_a_new_one() {
    logs();
    let ports = bind_ports().await;
    let (https, http) = (ports.https[0].local_addr().unwrap(), ports.http[0].local_addr().unwrap());
    let opts = PebbleOptions::new(ports.http_port(), ports.https_port());
    let mut pebble = Pebble::start(opts.clone()).await;
    let storage = tempfile::tempdir().unwrap();
    let dir = pebble.directory_url();
    let toml = acme_config(storage.path(), &dir, pebble.ca_path(), "tls-alpn-01", "", "");
    let mut relay = RelayUnderTest::on(&toml, ports);
    relay.wait_ready().await;
    relay.stop().await;
    let account_path = host_dir(storage.path(), &pebble).parent().unwrap().join("account.json");
    let old: serde_json::Value = serde_json::from_slice(&std::fs::read(&account_path).unwrap()).unwrap();

    // The CA's database is reset (Pebble keeps it in memory: a restart on the same port).
    pebble.stop();
    let pki = std::mem::replace(&mut pebble.pki, common::Pki::new());
    let pebble = Pebble::start_with(pki, PebbleOptions { listen_port: Some(pebble.listen.port()), ..opts }).await;
    // Due at once, so the relay must order with the account the CA no longer knows.
    let due = acme_config(storage.path(), &dir, pebble.ca_path(), "tls-alpn-01", r#"renew_when_left = "1900d""#, "");
    let before = reregistrations();
    let mut relay = RelayUnderTest::on(&due, rebind(https, http).await);
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while pebble.issued().is_empty() {
        assert!(Instant::now() < deadline, "no certificate from the reset CA: {}", status(storage.path(), &pebble));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let issued = pebble.issued()[0].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Until the relay swaps, it serves the old certificate, from a root this client does not trust.
    while !serves(&relay, &client, &issued).await {
        assert!(Instant::now() < deadline, "the new certificate is not served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pebble.accounts(), 1, "one new account at the reset CA");
    let new: serde_json::Value = serde_json::from_slice(&std::fs::read(&account_path).unwrap()).unwrap();
    assert_ne!(new["id"], old["id"], "the new account is stored");
    assert!(reregistrations() > before, "counted in oauth_relay_acme_account_reregistrations_total");
    relay.stop().await;
}

/// `oauth_relay_acme_account_reregistrations_total` of this process.
fn reregistrations() -> u64 {
    let text = oauth_relay::metrics::global().render([]);
    let line = text.lines().find(|l| l.starts_with("oauth_relay_acme_account_reregistrations_total "));
    line.and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).expect("the counter is rendered")
}

/// Whether the relay's handshake for `HOST` verifies against `client`'s roots and shows `serial`.
async fn serves(relay: &RelayUnderTest, client: &std::sync::Arc<rustls::ClientConfig>, serial: &str) -> bool {
    match common::TlsClient::new(relay.https, client.clone()).connect(HOST).await {
        Ok(_) => same_serial(&served_chain(relay.https, client).await.0, serial),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_the_ca_says_was_already_replaced_is_ordered_again_without_replaces() {
    logs();
    let ports = bind_ports().await;
    let pebble = Pebble::start(PebbleOptions::new(ports.http_port(), ports.https_port())).await;
    // ARI says the first certificate is due at once; the CA refuses every `replaces`, as Let's
    // Encrypt does once an earlier order (cut before it was stored) replaced that certificate.
    let faults = Faults { ari: true, refuse_replaces: true, ..Faults::default() };
    let front = AcmeFront::start(&pebble, faults).await;
    let storage = tempfile::tempdir().unwrap();
    let toml = acme_config(storage.path(), &front.directory_url(), pebble.ca_path(), "tls-alpn-01", "", "");
    let mut relay = RelayUnderTest::on(&toml, ports);

    let deadline = Instant::now() + Duration::from_secs(20);
    while pebble.issued().len() < 2 {
        assert!(Instant::now() < deadline, "no renewal: orders {:?}", front.new_orders());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first order, the renewal naming the old certificate (refused), the same renewal
    // without `replaces` (issued); then nothing more: the new certificate is not due.
    assert_eq!(front.new_orders(), [false, true, false]);
    let renewed = pebble.issued()[1].clone();
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !serves(&relay, &client, &renewed).await {
        assert!(Instant::now() < deadline, "the renewed certificate is not served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = host_dir_of(storage.path(), &front.directory_url());
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
    assert!(same_serial(m["serial"].as_str().unwrap(), &renewed));
    assert_eq!(pebble.issued().len(), 2);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_order_waits_as_long_as_the_ca_says() {
    logs();
    let ports = bind_ports().await;
    let pebble = Pebble::start(PebbleOptions::new(ports.http_port(), ports.https_port())).await;
    let front = AcmeFront::start(&pebble, Faults { rate_limit: Some((1, 3600)), ..Faults::default() }).await;
    let storage = tempfile::tempdir().unwrap();
    // retry_min is 100 ms: without the CA's Retry-After the next attempt would come at once.
    let toml = acme_config(storage.path(), &front.directory_url(), pebble.ca_path(), "tls-alpn-01", "", "");
    let mut relay = RelayUnderTest::on(&toml, ports);
    let config = relay.config.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    let dir = host_dir_of(storage.path(), &front.directory_url());
    let s = loop {
        let s = status_in(&dir);
        if s["failures"].as_u64() == Some(1) {
            break s;
        }
        assert!(Instant::now() < deadline, "no failure recorded: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(s["last_error"].as_str().unwrap().contains("too many certificates for this name"), "{s}");
    let next = humantime::parse_rfc3339(s["next_attempt"].as_str().unwrap()).unwrap();
    let wait = next.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    assert!(wait > Duration::from_secs(3000), "next attempt in {wait:?}, the CA said 3600 s");
    let report = oauth_relay::acme::status_report(&config).await.expect("cert status");
    assert!(report.contains("  next attempt   "), "{report}");
    assert_eq!(front.new_orders().len(), 1);
    let (code, body) = relay.readyz().await;
    assert_eq!(code, 503);
    assert!(body.contains("too many certificates for this name"), "{body}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_order_does_not_block_ordering_after_its_restart() {
    logs();
    let ports = bind_ports().await;
    let pebble = Pebble::start(PebbleOptions::new(ports.http_port(), ports.https_port())).await;
    let storage = tempfile::tempdir().unwrap();
    // The order lock a killed relay of this machine left: valid for ten more minutes, but its
    // process is gone.
    let mut killed = std::process::Command::new("true").spawn().unwrap();
    let pid = killed.id();
    killed.wait().unwrap();
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let expires = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(600));
    let lock = host_dir(storage.path(), &pebble).join("order.lock");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let record = format!(r#"{{"owner":"{machine}/{pid}/0a0b","purpose":"order a certificate","expires":"{expires}"}}"#);
    std::fs::write(&lock, record).unwrap();

    let toml = acme_config(storage.path(), &pebble.directory_url(), pebble.ca_path(), "tls-alpn-01", "", "");
    let mut relay = RelayUnderTest::on(&toml, ports);
    relay.wait_ready().await;
    assert_eq!(pebble.orders(), 1);
    // Released just after the certificate is served: give the release a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while lock.exists() {
        assert!(std::time::Instant::now() < deadline, "taken over, then released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_an_order_keeps_it_when_the_site_did_not_change() {
    logs();
    let ports = bind_ports().await;
    let pebble = Pebble::start(PebbleOptions::new(ports.http_port(), ports.https_port())).await;
    let front = AcmeFront::start(&pebble, Faults { hold_challenges: true, ..Faults::default() }).await;
    let storage = tempfile::tempdir().unwrap();
    let toml = acme_config(storage.path(), &front.directory_url(), pebble.ca_path(), "tls-alpn-01", "", "");
    let file = storage.path().join("relay.toml");
    std::fs::write(&file, &toml).unwrap();
    let mut relay = RelayUnderTest::load_on(&file, ports);

    // The order is in flight: its challenge answered and announced, the CA not yet told.
    let deadline = Instant::now() + Duration::from_secs(20);
    while front.challenges() == 0 {
        assert!(Instant::now() < deadline, "no challenge answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A reload that leaves the ACME site as it was (another edit of the file).
    std::fs::write(&file, format!("# edited\n{toml}")).unwrap();
    relay.reload.reload().await.expect("reload");
    front.open_gate();
    relay.wait_ready().await;
    assert_eq!(front.new_orders().len(), 1, "the order in flight went on; no second order");
    assert_eq!(front.challenges(), 1);
    assert_eq!(pebble.issued().len(), 1);
    relay.stop().await;
}

/// libfaketime, which shifts the clock of the relay binary it is preloaded into (Debian's
/// `faketime` package; Pebble, a static Go binary, keeps the real clock).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_far_ahead_of_the_cas_is_a_readyz_warning_that_blames_the_clock() {
    logs();
    let (https, http, admin) =
        (common::process::free_addr(), common::process::free_addr(), common::process::free_addr());
    let mut opts = PebbleOptions::new(http.port(), https.port());
    // Three-day certificates, renewed with a day left; the relay's clock is 60 hours ahead,
    // so every certificate it gets is already due by that clock.
    opts.validity_secs = Some(3 * 86400);
    let pebble = Pebble::start(opts).await;
    let storage = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\nhttps = [\"{https}\"]\nhttp = [\"{http}\"]\nadmin = \"{admin}\"\npublic_https_port = 443\nstorage = \"{}\"\n\n\
         [[site]]\nname = \"auth\"\nhostnames = [\"{HOST}\"]\n\n[site.tls]\nsource = \"acme\"\ndirectory = \"{}\"\n\
         directory_ca_file = \"{}\"\nterms_agreed = true\nchallenge = \"tls-alpn-01\"\nretry_min = \"1s\"\nretry_max = \"1h\"\n",
        storage.path().display(),
        pebble.directory_url(),
        pebble.ca_path().display()
    );
    let config = storage.path().join("relay.toml");
    std::fs::write(&config, toml).unwrap();
    let mut relay = common::process::RelayProcess::serve(&config, &[], |cmd| {
        cmd.env("LD_PRELOAD", LIBFAKETIME).env("FAKETIME", "+60h").env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    });
    let admin = relay.admin_addr().await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let r = common::client::plain_get(admin, "localhost", "/readyz").await;
        if r.text().contains("warning: clock:") {
            assert_eq!(r.status, 200, "a wrong clock is a warning, not a reason: {}", r.text());
            break r.text().to_string();
        }
        assert!(Instant::now() < deadline, "no clock warning: {} {}\n{}", r.status, r.text(), relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains("this machine's clock ("), "{body}");
    assert!(body.contains(" ahead of the CA's (a certificate issued now starts at "), "{body}");
    let log = relay.log();
    assert!(log.contains("renewing again no sooner than"), "{log}");
    assert!(!log.contains("renew_when_left is at least its lifetime"), "the clock is blamed, not the config: {log}");
    relay.stop().await;
}
