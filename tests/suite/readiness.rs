//! `/readyz` beyond "a certificate is loaded": it follows a real upstream going away and coming
//! back (background probes with a short interval and window), refuses a certificate that
//! expires within the margin while nothing renews it (`files`, and `acme` whose renewal keeps
//! failing), and reports clock skew from the upstream's `Date` header.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{Pki, RelayUnderTest, Upstream, UpstreamBehaviour};
use http::Response;
use http_body_util::Full;
use oauth_relay::acme::{AcmeStore, CertMeta, HostStatus};

const HOST: &str = "auth.example.test";
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A relay for `auth.example.test` with an admin listener; `site` and `health` are extra lines.
fn config(pki: &Pki, tls: &str, site: &str, health: &str) -> String {
    format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\nstorage = \"{storage}\"\n\n\
         [health]\n{health}\n\n[[site]]\nname = \"auth\"\nhostnames = [\"{HOST}\"]\n{site}\n\n[site.tls]\n{tls}\n",
        storage = pki.dir.path().join("certs").display(),
    )
}

/// `source = "files"` with a leaf for `auth.example.test` valid from an hour ago for `left`.
fn files(pki: &Pki, left: Duration) -> String {
    let now = SystemTime::now();
    let leaf = pki.leaf_with_validity("relay", &[HOST], now - Duration::from_secs(3600), now + left);
    format!("source = \"files\"\ncert = \"{}\"\nkey = \"{}\"", leaf.cert_path.display(), leaf.key_path.display())
}

/// A TLS upstream on 127.0.0.1 (its certificate from `pki`) answering as `behaviour`.
async fn tls_upstream(pki: &Pki, at: SocketAddr, behaviour: UpstreamBehaviour) -> Upstream {
    let leaf = pki.leaf("upstream", &["127.0.0.1"]);
    Upstream::start_at(at, Some(pki.server_config(&leaf, &[b"http/1.1"])), behaviour).await
}

fn upstream_lines(pki: &Pki, addr: SocketAddr) -> String {
    format!("upstream = \"https://{addr}\"\nupstream_ca_file = \"{}\"", pki.ca_path.display())
}

/// How long a test waits for `/readyz` to change.
const WITHIN: Duration = Duration::from_secs(10);

const FAST_PROBES: &str = "upstream_probe_interval = \"50ms\"\nupstream_probe_timeout = \"1s\"\n\
                           upstream_unreachable_window = \"300ms\"";

#[tokio::test]
async fn readiness_follows_the_upstream_going_away_and_coming_back() {
    let pki = Pki::new();
    let behaviour = UpstreamBehaviour::fixed(404, &[], "no such page");
    let upstream = tls_upstream(&pki, "127.0.0.1:0".parse().unwrap(), behaviour.clone()).await;
    let addr = upstream.addr;
    let relay =
        RelayUnderTest::start(&config(&pki, &files(&pki, 90 * DAY), &upstream_lines(&pki, addr), FAST_PROBES)).await;

    // The probe is a real request: the configured path, a recognisable User-Agent; a 404
    // counts as reachable.
    let until = Instant::now() + Duration::from_secs(10);
    while upstream.hits() == 0 {
        assert!(Instant::now() < until, "no probe reached the upstream within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let probe = upstream.last();
    assert_eq!((probe.method.as_str(), probe.target.as_str()), ("GET", "/"));
    assert!(probe.headers["user-agent"].to_str().unwrap().ends_with("(readiness probe)"));
    assert_eq!(relay.readyz().await, (200, "ready\n".to_string()));

    drop(upstream);
    let (_, body) = relay.wait_readyz("upstream stopped", WITHIN, |s, _| s == 503).await;
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines[0], "not ready");
    assert_eq!(lines.len(), 2, "{body}");
    let want = format!("upstream https://{addr} unreachable for ");
    assert!(lines[1].starts_with(&want), "{body}");
    assert!(lines[1].contains("(longer than upstream_unreachable_window 300ms); last error: connect: "), "{body}");
    // The public listeners answer the same.
    let client = common::TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    assert_eq!(client.get(HOST, "/readyz").await.status, 503);

    let _upstream = tls_upstream(&pki, addr, behaviour).await;
    relay.wait_readyz("upstream restarted", WITHIN, |s, b| s == 200 && b == "ready\n").await;
}

#[tokio::test]
async fn an_upstream_with_an_untrusted_certificate_is_unreachable() {
    let pki = Pki::new();
    let other = Pki::new();
    let upstream = tls_upstream(&other, "127.0.0.1:0".parse().unwrap(), UpstreamBehaviour::fixed(200, &[], "")).await;
    let health = "upstream_probe_interval = \"50ms\"\nupstream_unreachable_window = \"0s\"";
    let relay =
        RelayUnderTest::start(&config(&pki, &files(&pki, 90 * DAY), &upstream_lines(&pki, upstream.addr), health))
            .await;
    let (_, body) = relay.wait_readyz("untrusted upstream", WITHIN, |s, _| s == 503).await;
    assert!(body.contains(&format!("upstream https://{} unreachable for ", upstream.addr)), "{body}");
    assert!(body.contains("last error: TLS handshake: invalid peer certificate"), "{body}");
    assert_eq!(upstream.hits(), 0, "no request is sent over a connection that failed its handshake");
}

#[tokio::test]
async fn a_files_certificate_within_the_expiry_margin_is_not_ready() {
    let pki = Pki::new();
    let tls = files(&pki, 2 * DAY);
    let relay = RelayUnderTest::start(&config(&pki, &tls, "", "upstream_probe_interval = \"0s\"")).await;
    let (status, body) = relay.readyz().await;
    assert_eq!(status, 503, "{body}");
    let want = format!("not ready\n{HOST}: certificate expires at ");
    assert!(body.starts_with(&want), "{body}");
    assert!(body.contains("within cert_expiry_margin 7days); source \"files\" is not renewed by the relay"), "{body}");
    assert_eq!(body.lines().count(), 2, "{body}");

    // A smaller margin: the same certificate is fine.
    let relay =
        RelayUnderTest::start(&config(&pki, &tls, "", "upstream_probe_interval = \"0s\"\ncert_expiry_margin = \"1d\""))
            .await;
    assert_eq!(relay.readyz().await, (200, "ready\n".to_string()));
}

/// Puts a certificate for `HOST` valid for `left` into the ACME store of `directory`, as the
/// ACME task would have, with `failures` failed renewals recorded.
fn seed_acme_store(pki: &Pki, directory: &str, left: Duration, failures: u32) {
    let now = SystemTime::now();
    let leaf = pki.leaf_with_validity("acme", &[HOST], now - DAY, now + left);
    let store = AcmeStore::new(&pki.dir.path().join("certs"), &directory.parse().unwrap());
    let meta = CertMeta {
        hostname: HOST.into(),
        directory: directory.into(),
        chain_file: format!("chain-{}.pem", leaf.serial),
        key_file: format!("key-{}.pem", leaf.serial),
        serial: leaf.serial.clone(),
        issuer: "CN=oauth-relay test CA".into(),
        not_before: now - DAY,
        not_after: now + left,
        issued_at: now - DAY,
        // Not due: the relay only serves it and never calls the (absent) CA to order.
        renew_at: now + left,
        order_url: None,
    };
    store.save_cert(HOST, &leaf.cert_pem, &leaf.key_pem, &meta).expect("seed the store");
    let status = HostStatus {
        last_error: (failures > 0).then(|| "newOrder: the CA is unreachable".to_string()),
        last_error_at: (failures > 0).then_some(now),
        failures,
        next_attempt: None,
        ..HostStatus::default()
    };
    store.save_status(HOST, &status).expect("seed the status");
}

#[tokio::test]
async fn an_acme_certificate_within_the_margin_is_not_ready_only_while_renewal_fails() {
    // A CA address nothing listens on: the relay serves the stored certificate regardless.
    let directory = "https://127.0.0.1:1/dir";
    let tls =
        format!("source = \"acme\"\ndirectory = \"{directory}\"\nterms_agreed = true\nreload_interval = \"50ms\"");
    let health = "upstream_probe_interval = \"0s\"";

    let pki = Pki::new();
    seed_acme_store(&pki, directory, 2 * DAY, 0);
    let relay = RelayUnderTest::start(&config(&pki, &tls, "", health)).await;
    relay.wait_readyz("stored certificate served", WITHIN, |s, b| s == 200 && b == "ready\n").await;

    let pki = Pki::new();
    seed_acme_store(&pki, directory, 2 * DAY, 3);
    let relay = RelayUnderTest::start(&config(&pki, &tls, "", health)).await;
    let (_, body) = relay.wait_readyz("failing renewal", WITHIN, |s, _| s == 503).await;
    let want = format!("not ready\n{HOST}: certificate expires at ");
    assert!(body.starts_with(&want), "{body}");
    assert!(
        body.contains("its renewal keeps failing (3 failure(s) in a row; last: newOrder: the CA is unreachable)"),
        "{body}"
    );
}

/// An upstream whose `Date` header is `offset` behind the real time.
fn dated(offset: Duration) -> UpstreamBehaviour {
    UpstreamBehaviour::respond(move |_| {
        let date = httpdate::fmt_http_date(SystemTime::now() - offset);
        Response::builder().status(200).header("date", date).body(Full::new(Bytes::new())).unwrap()
    })
}

#[tokio::test]
async fn clock_skew_is_reported_and_fails_above_its_limit() {
    let pki = Pki::new();
    let upstream = tls_upstream(&pki, "127.0.0.1:0".parse().unwrap(), dated(Duration::from_secs(90))).await;
    let relay =
        RelayUnderTest::start(&config(&pki, &files(&pki, 90 * DAY), &upstream_lines(&pki, upstream.addr), FAST_PROBES))
            .await;
    let (status, body) = relay.wait_readyz("skew reported", WITHIN, |_, b| b.contains("clock skew")).await;
    // 90 s: above clock_skew_warn (30 s), below clock_skew_fail (5 m): a warning, still ready.
    assert_eq!(status, 200, "{body}");
    let want = format!("ready\nwarning: clock skew: upstream https://{} says it is 1m 3", upstream.addr);
    assert!(body.starts_with(&want), "{body}");
    assert!(
        body.ends_with(
            "behind this machine's clock (reported above clock_skew_warn 30s, not ready above clock_skew_fail 5m)\n"
        ),
        "{body}"
    );

    let upstream = tls_upstream(&pki, "127.0.0.1:0".parse().unwrap(), dated(10 * DAY)).await;
    let relay =
        RelayUnderTest::start(&config(&pki, &files(&pki, 90 * DAY), &upstream_lines(&pki, upstream.addr), FAST_PROBES))
            .await;
    let (_, body) = relay.wait_readyz("skew over the limit", WITHIN, |s, _| s == 503).await;
    let want = format!("not ready\nclock skew: upstream https://{} says it is 10days ", upstream.addr);
    assert!(body.starts_with(&want), "{body}");
}

#[tokio::test]
async fn a_reload_keeps_the_probe_results() {
    let pki = Pki::new();
    let upstream = tls_upstream(&pki, "127.0.0.1:0".parse().unwrap(), UpstreamBehaviour::fixed(200, &[], "")).await;
    let addr = upstream.addr;
    drop(upstream);
    let path = pki.dir.path().join("relay.toml");
    let base = config(&pki, &files(&pki, 90 * DAY), &upstream_lines(&pki, addr), FAST_PROBES);
    std::fs::write(&path, format!("{base}\n[site.callback]\nstatus = 302\n")).unwrap();
    let mut relay = RelayUnderTest::load(&path).await;
    relay.wait_readyz("the stopped upstream made the relay unready", WITHIN, |s, _| s == 503).await;
    // Still down after a reload: unready at once, not only after another window.
    std::fs::write(&path, format!("{base}\n[site.callback]\nstatus = 303\n")).unwrap();
    relay.reload.reload().await.expect("reload");
    let (status, body) = relay.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&format!("upstream https://{addr} unreachable for ")), "{body}");
    relay.stop().await;
}

#[tokio::test]
async fn an_upstream_that_answers_with_connection_close_passes_every_probe() {
    let up = Upstream::start(None, UpstreamBehaviour::fixed(200, &[("connection", "close")], "ok")).await;
    let toml = format!("[[site]]\nhostnames = [\"auth.example.test\"]\nupstream = \"http://{}\"\n", up.addr);
    let config = oauth_relay::Config::parse("probe.toml", &toml).expect("config");
    let target = oauth_relay::health::probe::targets(&config).pop().expect("one target");
    for i in 0..20 {
        let seen = target.probe("/").await.unwrap_or_else(|e| panic!("probe {i}: {e}"));
        assert_eq!(seen.status, 200, "probe {i}");
    }
}
