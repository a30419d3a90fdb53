//! Metrics and flow ids as an operator meets them.
//!
//! - A scripted flow through a relay in-process (real TLS, real upstreams: one answering, one
//!   closed port, one with an untrusted certificate, one silent), then `/metrics` scraped over
//!   HTTP on the admin listener and matched line by line against the exact expected series.
//!   The registry is process-wide, so this binary runs only one relay in-process.
//! - Counting a request allocates nothing (checked with a counting allocator, not a timer).
//! - The real binary with a captured JSON log: one sign-in carries one `flow` on its authorize,
//!   callback and token lines, two sign-ins differ, and replicas sharing `[log] flow_key` agree.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::client::plain_get;
use common::process::RelayProcess;
use common::{Pki, RelayUnderTest, TlsClient, Upstream, UpstreamBehaviour};
use http::{Response, StatusCode};
use http_body_util::Full;
use oauth_relay::metrics::Metrics;
use oauth_relay::response::RouteName;
use tokio::io::AsyncReadExt;

// ---------------------------------------------------------------------------------------------
// A counting allocator: how many allocations the current thread made.
// ---------------------------------------------------------------------------------------------

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a
// const-initialised thread-local without destructor, so touching it never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

#[test]
fn counting_a_request_allocates_nothing() {
    let m = Metrics::new();
    let before = allocations();
    for i in 0..1000u64 {
        m.request(RouteName::Callback, StatusCode::FOUND, Duration::from_micros(20 + i));
        m.request(RouteName::Token, StatusCode::OK, Duration::from_millis(3));
        m.request(RouteName::None, StatusCode::NOT_FOUND, Duration::from_micros(5));
        m.handshake_ok();
        drop(m.connection_opened(oauth_relay::metrics::Listener::Https));
    }
    assert_eq!(allocations() - before, 0, "the per-request metric path allocated");
    // The counter does see this thread's allocations.
    let seen = allocations();
    drop(std::hint::black_box(vec![0u8; 64]));
    assert_eq!(allocations(), seen + 1);
    let text = m.render([]);
    for line in [
        "oauth_relay_requests_total{route=\"callback\",status=\"302\"} 1000",
        "oauth_relay_requests_total{route=\"token\",status=\"200\"} 1000",
        "oauth_relay_requests_total{route=\"none\",status=\"404\"} 1000",
        "oauth_relay_request_duration_seconds_bucket{route=\"token\",le=\"0.0025\"} 0",
        "oauth_relay_request_duration_seconds_bucket{route=\"token\",le=\"0.005\"} 1000",
        "oauth_relay_request_duration_seconds_count{route=\"callback\"} 1000",
        "oauth_relay_tls_handshakes_total 1000",
        "oauth_relay_open_connections{listener=\"https\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "`{line}` not in:\n{text}");
    }
    // A status outside the lock-free set is still counted, through the family.
    m.request(RouteName::Token, StatusCode::IM_A_TEAPOT, Duration::from_millis(1));
    assert!(m.render([]).lines().any(|l| l == "oauth_relay_requests_total{route=\"token\",status=\"418\"} 1"));
}

// ---------------------------------------------------------------------------------------------
// The scripted flow, scraped.
// ---------------------------------------------------------------------------------------------

const OK: &str = "ok.example.test";
const CLOSED: &str = "closed.example.test";
const BADTLS: &str = "badtls.example.test";
const SILENT: &str = "silent.example.test";

/// A site with its own upstream, all served with one certificate.
fn site(name: &str, upstream: &str, extra: &str, leaf: &common::pki::Leaf) -> String {
    format!(
        "[[site]]\nname = \"{name}\"\nhostnames = [\"{name}.example.test\"]\nupstream = \"{upstream}\"\n{extra}\n\
         [site.tls]\nsource = \"files\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n",
        cert = leaf.cert_path.display(),
        key = leaf.key_path.display(),
    )
}

/// A loopback port that refuses connections: bound but not listening, so no other server (of a
/// test running beside this one) can take it while the socket is held.
fn refusing_port() -> tokio::net::TcpSocket {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(([127, 0, 0, 1], 0).into()).expect("bind");
    s
}

/// Scrapes the admin listener until every line of `want` is in the text (at most 10 s: some
/// counts land just after the client sees its connection close).
async fn scrape_until(admin: SocketAddr, want: &[String]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = plain_get(admin, "127.0.0.1", "/metrics").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), "text/plain; version=0.0.4; charset=utf-8");
        let text = r.text().to_string();
        let missing: Vec<&String> = want.iter().filter(|w| !text.lines().any(|l| l == w.as_str())).collect();
        if missing.is_empty() {
            return text;
        }
        assert!(Instant::now() < deadline, "missing {missing:#?} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The leaf's notAfter in seconds since the epoch, read from the certificate itself.
fn not_after(leaf: &common::pki::Leaf) -> i64 {
    use x509_parser::prelude::*;
    let (_, pem) = parse_x509_pem(leaf.cert_pem.as_bytes()).expect("pem");
    let (_, x) = X509Certificate::from_der(&pem.contents).expect("der");
    x.validity().not_after.timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_flow_shows_in_the_metrics_of_the_admin_listener_only() {
    let pki = Pki::new();
    let now = std::time::SystemTime::now();
    let leaf = pki.leaf_with_validity(
        "relay",
        &[OK, CLOSED, BADTLS, SILENT],
        now - Duration::from_secs(3600),
        now + Duration::from_secs(30 * 86400),
    );
    let ok = Upstream::start(
        None,
        UpstreamBehaviour::respond(|req| {
            let status = if req.target.ends_with("/five") { 503 } else { 200 };
            Response::builder().status(status).body(Full::new(Bytes::from_static(b"{}"))).expect("response")
        }),
    )
    .await;
    let upstream_leaf = pki.leaf("upstream", &["localhost"]);
    let badtls = Upstream::start(
        Some(pki.server_config(&upstream_leaf, &[b"http/1.1"])),
        UpstreamBehaviour::fixed(200, &[], ""),
    )
    .await;
    let silent = Upstream::start(None, UpstreamBehaviour::Silent).await;
    let refusing = refusing_port();
    let toml = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\nstorage = \"{store}\"\n\n\
         [limits]\nhandshake_timeout = \"1s\"\n\n{}{}{}{}",
        site("ok", &format!("http://{}", ok.addr), "", &leaf),
        site("closed", &format!("http://{}", refusing.local_addr().expect("addr")), "", &leaf),
        // No upstream_ca_file: the test CA is not trusted, so the upstream handshake fails.
        site("badtls", &format!("https://{}", badtls.addr), "", &leaf),
        site("silent", &format!("http://{}", silent.addr), "response_timeout = \"300ms\"", &leaf),
        store = pki.dir.path().join("store").display(),
    );
    let file = pki.dir.path().join("relay.toml");
    std::fs::write(&file, &toml).expect("write the config file");
    let mut relay = RelayUnderTest::load(&file).await;
    let admin = relay.admin.expect("admin listener");
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));

    for i in 0..3 {
        let r = client.get(OK, &format!("/v1/auth/callback?code=c{i}&state=s{i}")).await;
        assert_eq!(r.status, 302);
    }
    assert_eq!(client.get(OK, "/v1/auth/authorize?clientId=a&state=s0").await.status, 302);
    let token = |host: &'static str, code: &'static str| {
        let client = client.clone();
        async move { client.send(host, "POST", &format!("/v1/auth/token/{code}"), &[], "").await.status }
    };
    assert_eq!(token(OK, "good").await, 200);
    assert_eq!(token(OK, "five").await, 503);
    assert_eq!(token(CLOSED, "x").await, 502);
    assert_eq!(token(BADTLS, "x").await, 502);
    assert_eq!(token(SILENT, "x").await, 504);
    assert_eq!(client.get(OK, "/no/such/route").await.status, 404);
    let public = client.get(OK, "/metrics").await;
    assert_eq!(public.status, 404, "metrics must not be served on the public listener");
    assert!(!public.text().contains("oauth_relay_"), "{}", public.text());
    assert!(client.connect("unknown.example.test").await.is_err(), "unknown SNI is refused");
    // A client that never starts its handshake is cut off after handshake_timeout.
    let mut idle = tokio::net::TcpStream::connect(relay.https).await.expect("connect");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await.expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    let expiry = not_after(&leaf);
    assert!(expiry > 0);
    let mut want: Vec<String> = [
        r#"oauth_relay_requests_total{route="callback",status="302"} 3"#,
        r#"oauth_relay_requests_total{route="authorize",status="302"} 1"#,
        r#"oauth_relay_requests_total{route="token",status="200"} 1"#,
        r#"oauth_relay_requests_total{route="token",status="503"} 1"#,
        r#"oauth_relay_requests_total{route="token",status="502"} 2"#,
        r#"oauth_relay_requests_total{route="token",status="504"} 1"#,
        r#"oauth_relay_requests_total{route="none",status="404"} 2"#,
        r#"oauth_relay_request_duration_seconds_count{route="callback"} 3"#,
        r#"oauth_relay_request_duration_seconds_bucket{route="callback",le="+Inf"} 3"#,
        r#"oauth_relay_request_duration_seconds_count{route="token"} 5"#,
        r#"oauth_relay_upstream_duration_seconds_count{route="token"} 5"#,
        r#"oauth_relay_upstream_errors_total{kind="connect"} 1"#,
        r#"oauth_relay_upstream_errors_total{kind="tls"} 1"#,
        r#"oauth_relay_upstream_errors_total{kind="timeout"} 1"#,
        r#"oauth_relay_upstream_errors_total{kind="status_5xx"} 1"#,
        r#"oauth_relay_upstream_errors_total{kind="request"} 0"#,
        r#"oauth_relay_upstream_errors_total{kind="proxy"} 0"#,
        // Three callbacks, one authorize, five tokens, the 404 and /metrics: one connection each.
        "oauth_relay_tls_handshakes_total 11",
        r#"oauth_relay_tls_handshake_failures_total{reason="unknown_sni"} 1"#,
        r#"oauth_relay_tls_handshake_failures_total{reason="timeout"} 1"#,
        r#"oauth_relay_tls_handshake_failures_total{reason="no_sni"} 0"#,
        r#"oauth_relay_open_connections{listener="https"} 0"#,
        r#"oauth_relay_open_connections{listener="admin"} 1"#,
        r#"oauth_relay_config_reloads_total{outcome="ok"} 0"#,
        r#"oauth_relay_config_reloads_total{outcome="error"} 0"#,
        "oauth_relay_config_last_reload_successful 1",
        r#"oauth_relay_build_info{version="0.1.0"} 1"#,
        "# TYPE oauth_relay_certificate_not_after_seconds gauge",
        "# TYPE oauth_relay_request_duration_seconds histogram",
    ]
    .map(String::from)
    .to_vec();
    for host in [OK, CLOSED, BADTLS, SILENT] {
        want.push(format!("oauth_relay_certificate_not_after_seconds{{hostname=\"{host}\"}} {expiry}"));
    }
    let text = scrape_until(admin, &want).await;
    // Nothing else was counted: no other route, status or upstream.
    let requests: Vec<&str> = text.lines().filter(|l| l.starts_with("oauth_relay_requests_total{")).collect();
    assert_eq!(requests.len(), 7, "{requests:#?}");
    assert!(!text.contains("route=\"healthz\""), "{text}");
    assert!(text.contains("\n# HELP oauth_relay_requests_total Requests answered, by route and status.\n"), "{text}");

    // One reload is counted once.
    relay.reload.reload().await.expect("the same file reloads");
    let reloaded = [
        r#"oauth_relay_config_reloads_total{outcome="ok"} 1"#,
        r#"oauth_relay_config_reloads_total{outcome="error"} 0"#,
    ];
    scrape_until(admin, &reloaded.map(String::from)).await;
    relay.stop().await;
    drop(refusing);
}

// ---------------------------------------------------------------------------------------------
// Flow ids on the access lines of the real binary.
// ---------------------------------------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_oauth-relay");
const HOST: &str = "auth.example.test";
const FLOW_KEY: &str = "5c0f6ad1e2b3a4958677e8f9a0b1c2d3e4f5061728394a5b6c7d8e9fa0b1c2d3";

/// Writes a relay config (on an ephemeral port) in front of `upstream`; returns its path.
fn relay_config(pki: &Pki, leaf: &common::pki::Leaf, upstream: SocketAddr, name: &str) -> String {
    let path = pki.dir.path().join(format!("{name}.toml"));
    let toml = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nstorage = \"{store}\"\n\n[log]\nflow_key = \"{FLOW_KEY}\"\n\n\
         [[site]]\nhostnames = [\"{HOST}\"]\nupstream = \"http://{upstream}\"\n\n\
         [site.tls]\nsource = \"files\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
        store = pki.dir.path().join("store").display(),
        cert = leaf.cert_path.display(),
        key = leaf.key_path.display(),
    );
    std::fs::write(&path, toml).expect("write config");
    path.display().to_string()
}

/// A client of the relay, once it serves `/healthz`.
async fn client_of(relay: &mut RelayProcess, pki: &Pki) -> TlsClient {
    let client = TlsClient::new(relay.https_addr().await, pki.client_config(&[b"http/1.1"]));
    assert_eq!(client.get(HOST, "/healthz").await.status, 200);
    client
}

/// `(route, flow)` of every access line but health probes, in order.
fn flows(log: &str) -> Vec<(String, Option<String>)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access" && v["route"] != "healthz")
        .map(|v| (v["route"].as_str().expect("route").to_string(), v["flow"].as_str().map(String::from)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sign_in_has_one_flow_id_and_replicas_with_one_key_agree() {
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &[HOST]);
    let up = Upstream::start(None, UpstreamBehaviour::fixed(200, &[("content-type", "application/json")], "{}")).await;
    let config_a = relay_config(&pki, &leaf, up.addr, "a");
    let config_b = relay_config(&pki, &leaf, up.addr, "b");
    let mut relay_a = RelayProcess::serve(Path::new(&config_a), &["--log-format", "json"], |_| {});
    let mut relay_b = RelayProcess::serve(Path::new(&config_b), &["--log-format", "json"], |_| {});
    let a = client_of(&mut relay_a, &pki).await;
    let b = client_of(&mut relay_b, &pki).await;

    // Two sign-ins on replica A, interleaved; the state of the first needs decoding.
    let sign_ins = [("STATE+one%2F1", "CODE-ONE"), ("STATE-two", "CODE-TWO")];
    for (state, _) in sign_ins {
        assert_eq!(a.get(HOST, &format!("/v1/auth/authorize?clientId=app&state={state}")).await.status, 302);
    }
    for (state, code) in sign_ins {
        assert_eq!(a.get(HOST, &format!("/v1/auth/callback?code={code}&state={state}")).await.status, 302);
    }
    for (_, code) in sign_ins.iter().rev() {
        assert_eq!(a.send(HOST, "POST", &format!("/v1/auth/token/{code}"), &[], "").await.status, 200);
    }
    assert_eq!(a.send(HOST, "POST", "/v1/auth/token/NEVER-SEEN", &[], "").await.status, 200);
    // Replica B sees only the authorize of the first sign-in (the same state, encoded otherwise).
    assert_eq!(b.get(HOST, "/v1/auth/authorize?state=STATE%20one%2F1").await.status, 302);

    let (_, log_a) = relay_a.stop().await;
    let (_, log_b) = relay_b.stop().await;
    let lines = flows(&log_a);
    let routes: Vec<&str> = lines.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(routes, ["authorize", "authorize", "callback", "callback", "token", "token", "token"], "{log_a}");
    let id = |i: usize| lines[i].1.clone().unwrap_or_else(|| panic!("line {i} has no flow:\n{log_a}"));
    let (one, two) = (id(0), id(1));
    assert_ne!(one, two, "two sign-ins, two flow ids");
    assert_eq!(one.len(), 16);
    assert!(one.bytes().all(|b| b.is_ascii_hexdigit()), "{one}");
    assert_eq!([id(2), id(5)], [one.clone(), one.clone()], "the first sign-in's callback and token");
    assert_eq!([id(3), id(4)], [two.clone(), two.clone()], "the second sign-in's callback and token");
    assert_eq!(lines[6].1, None, "a code no callback carried has no flow:\n{log_a}");
    assert_eq!(flows(&log_b), [("authorize".to_string(), Some(one))], "replicas with one flow_key agree");
    for secret in ["STATE+one", "STATE%20one", "STATE one", "STATE-two", "CODE-ONE", "CODE-TWO", FLOW_KEY] {
        assert!(!log_a.contains(secret) && !log_b.contains(secret), "`{secret}` was logged:\n{log_a}\n{log_b}");
    }

    // `check` validates the key and never prints it.
    let check = Command::new(BIN).args(["check", "--config", &config_a]).output().expect("check");
    let out = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(check.status.success(), "{out}");
    assert!(!out.contains(FLOW_KEY) && !out.contains(&FLOW_KEY[..16]), "{out}");
}

#[test]
fn a_flow_key_that_is_too_short_is_refused_with_its_line() {
    let text = "[log]\nflow_key = \"abcd\"\n\n[[site]]\nhostnames = [\"a.example.test\"]\n";
    let err = oauth_relay::Config::parse("t.toml", text).expect_err("refused").to_string();
    assert!(err.starts_with("t.toml:2: log.flow_key: is 2 bytes long; use at least 16"), "{err}");
    assert!(!err.contains("abcd"), "the key is not echoed: {err}");
}
