//! Listeners and lifecycle: the plain-HTTP listener's redirects, the admin listener, graceful
//! shutdown in-process, and the real binary stopping cleanly on SIGTERM.

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::client::plain_get;
use common::process::RelayProcess;
use common::{Pki, RelayUnderTest, TlsClient, Upstream, UpstreamBehaviour};
use http::Response;
use http_body_util::Full;

/// A `files` relay for `auth.example.test`; `server` and `limits` are extra lines of those tables.
fn config(pki: &Pki, server: &str, limits: &str, site: &str) -> String {
    common::one_site_config(pki, server, limits, site)
}

#[tokio::test]
async fn plain_http_redirects_configured_hosts_to_https() {
    let pki = Pki::new();
    let relay = RelayUnderTest::start(&config(&pki, "http = [\"127.0.0.1:0\"]\npublic_https_port = 443", "", "")).await;
    let http = relay.http.expect("http listener");
    let reply = plain_get(http, "auth.example.test", "/v1/auth/callback?state=x").await;
    assert_eq!(reply.status, 308);
    assert_eq!(reply.header("location"), "https://auth.example.test/v1/auth/callback?state=x");
    // A Host with a port: the redirect names the public HTTPS port, never the HTTP one.
    let reply = plain_get(http, &format!("auth.example.test:{}", http.port()), "/a?b=c").await;
    assert_eq!((reply.status, reply.header("location")), (308, "https://auth.example.test/a?b=c"));
    let reply = plain_get(http, "evil.example.test", "/v1/auth/callback?state=x").await;
    assert_eq!(reply.status, 421);
    assert_eq!(reply.header("location"), "");
    let reply = plain_get(http, "auth.example.test", "/healthz").await;
    assert_eq!((reply.status, reply.text()), (200, "ok"));
    let reply = plain_get(http, "auth.example.test", "/.well-known/acme-challenge/x").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.header("location"), "");
}

#[tokio::test]
async fn redirect_names_a_non_default_public_port() {
    let pki = Pki::new();
    let relay =
        RelayUnderTest::start(&config(&pki, "http = [\"127.0.0.1:0\"]\npublic_https_port = 8443", "", "")).await;
    let reply = plain_get(relay.http.expect("http"), "auth.example.test", "/v1/auth/callback?state=x").await;
    assert_eq!(reply.status, 308);
    assert_eq!(reply.header("location"), "https://auth.example.test:8443/v1/auth/callback?state=x");
}

#[tokio::test]
async fn admin_listener_serves_health_only() {
    let pki = Pki::new();
    let relay = RelayUnderTest::start(&config(&pki, "admin = \"127.0.0.1:0\"", "", "")).await;
    let admin = relay.admin.expect("admin listener");
    let reply = plain_get(admin, "localhost", "/healthz").await;
    assert_eq!((reply.status, reply.text()), (200, "ok"));
    let reply = plain_get(admin, "localhost", "/readyz").await;
    assert_eq!((reply.status, reply.text()), (200, "ready\n"));
    for target in ["/v1/auth/callback?state=x", "/", "/v1/auth/token/abc"] {
        assert_eq!(plain_get(admin, "auth.example.test", target).await.status, 404, "{target}");
    }
}

/// Waits (at most 5 s) until `upstream` has received `n` requests.
async fn wait_for_hits(upstream: &Upstream, n: usize) {
    let until = Instant::now() + Duration::from_secs(5);
    while upstream.hits() < n {
        assert!(Instant::now() < until, "the upstream saw {} requests, expected {n}", upstream.hits());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight() {
    let pki = Pki::new();
    let body = r#"{"accountId":7,"accessToken":"late"}"#;
    let upstream = Upstream::start(
        None,
        UpstreamBehaviour::Delayed(
            Duration::from_secs(1),
            std::sync::Arc::new(move |_| Response::builder().status(200).body(Full::new(Bytes::from(body))).unwrap()),
        ),
    )
    .await;
    let site = format!("upstream = \"http://{}\"", upstream.addr);
    let mut relay = RelayUnderTest::start(&config(&pki, "", "", &site)).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    let in_flight =
        tokio::spawn(async move { client.send("auth.example.test", "POST", "/v1/auth/token/c1", &[], "").await });
    wait_for_hits(&upstream, 1).await;
    relay.stop().await;
    let reply = tokio::time::timeout(Duration::from_secs(5), in_flight).await.expect("answered").expect("task");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), body);
    let refused = tokio::net::TcpStream::connect(relay.https).await;
    assert_eq!(refused.err().map(|e| e.kind()), Some(std::io::ErrorKind::ConnectionRefused));
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let pki = Pki::new();
    let upstream = Upstream::start(None, UpstreamBehaviour::Silent).await;
    let site = format!("upstream = \"http://{}\"", upstream.addr);
    let mut relay = RelayUnderTest::start(&config(&pki, "", "shutdown_grace = \"200ms\"", &site)).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    let tls = client.connect("auth.example.test").await.expect("handshake");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.expect("h1");
    tokio::spawn(conn);
    let req = http::Request::post("/v1/auth/token/c2")
        .header("host", "auth.example.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let in_flight = tokio::spawn(sender.send_request(req));
    wait_for_hits(&upstream, 1).await;
    let start = Instant::now();
    relay.stop().await;
    assert!(start.elapsed() < Duration::from_secs(5), "stop took {:?}", start.elapsed());
    // The connection that outlived the grace period is closed, not left waiting on the upstream.
    let result = tokio::time::timeout(Duration::from_secs(5), in_flight).await.expect("closed within 5 s");
    assert!(result.expect("task").is_err(), "the request was cut off, not answered");
}

#[tokio::test]
async fn binary_exits_zero_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\nstorage = \"{storage}\"\n\n[[site]]\nname = \"local\"\n\
         hostnames = [\"localhost\"]\n\n[site.tls]\nsource = \"self-signed\"\n",
        storage = dir.path().join("certs").display()
    );
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, toml).expect("write config");
    let mut relay = RelayProcess::serve(&config, &[], |_| {});

    // Once the port is bound, the request waits in the backlog at worst.
    let admin = relay.admin_addr().await;
    let reply = tokio::time::timeout(Duration::from_secs(5), plain_get(admin, "localhost", "/healthz"))
        .await
        .expect("/healthz answered within 5 s");
    assert_eq!((reply.status, reply.text()), (200, "ok"));

    relay.signal("TERM");
    let exit = (relay.exit_within(Duration::from_secs(10)).await)
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM: {}", relay.log()));
    assert_eq!(exit.code(), Some(0), "exit status; stderr: {}", relay.log());
}

#[tokio::test]
async fn a_store_written_by_a_newer_release_is_refused_at_start() {
    // Rollback protection: an older binary must not misread a store a newer one migrated.
    let store = tempfile::tempdir().expect("tempdir");
    std::fs::write(store.path().join("store-version"), "9\n").expect("write version");
    let toml = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nstorage = \"{}\"\n\n[[site]]\nhostnames = [\"auth.example.test\"]\n",
        store.path().display()
    );
    let config = std::sync::Arc::new(oauth_relay::Config::parse("test.toml", &toml).expect("config"));
    let listeners = oauth_relay::Listeners::bind(&config).await.expect("bind");
    let err =
        tokio::time::timeout(Duration::from_secs(10), oauth_relay::run(config, listeners, std::future::pending()))
            .await
            .expect("run returns at once")
            .expect_err("a newer store is refused");
    let text = err.to_string();
    assert!(text.contains("store-version: the certificate store has format version 9"), "{text}");
    assert!(!store.path().join("self-signed").exists(), "nothing was written into the newer store");
}
