//! Secrets never reach the logs. The real binary serves a full OAuth flow over TLS (authorize,
//! callback by GET and by form_post, token exchange against a real upstream) in both log
//! formats, with `RUST_LOG=debug` (hyper, h2, rustls and hyper-util included) and with the
//! default filter; then everything it printed is searched for every secret of the flow.

use crate::common;

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::process::RelayProcess;
use common::proxy::Proxy;
use common::{Pki, TlsClient, Upstream, UpstreamBehaviour};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

const HOST: &str = "auth.example.test";

const STATE: &str = "STATE-SECRET-123";
const CODE: &str = "CODE-SECRET-456";
const CLIENT_SECRET: &str = "CLIENT-SECRET-789";
const COOKIE: &str = "COOKIE-SECRET";
const TOKEN: &str = "TOKEN-SECRET-000";
const UPSTREAM_COOKIE: &str = "UPSTREAM-COOKIE-SECRET";
/// The password of the outbound proxy (`[outbound] proxy = "http://relay:...@..."`).
const PROXY_PASSWORD: &str = "PROXY-SECRET-111";

/// `client:CLIENT-SECRET-789` as the application sends it.
fn basic_credentials() -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("client:{CLIENT_SECRET}"))
}

/// Every string that must never appear in a log line.
fn secrets() -> Vec<String> {
    let mut s: Vec<String> =
        [STATE, CODE, CLIENT_SECRET, COOKIE, TOKEN, UPSTREAM_COOKIE, PROXY_PASSWORD].map(String::from).to_vec();
    s.push(basic_credentials());
    // The Proxy-Authorization the relay sends on CONNECT.
    s.push(base64::engine::general_purpose::STANDARD.encode(format!("relay:{PROXY_PASSWORD}")));
    s
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Pretty,
}

/// One way to run the relay and its client for a full flow.
#[derive(Clone, Copy, Debug)]
struct Case {
    format: Format,
    /// `RUST_LOG`; `None` runs with the variable unset (the built-in default filter).
    rust_log: Option<&'static str>,
    /// Callback and authorize mode: "redirect" answers from the relay, "proxy" goes upstream.
    mode: &'static str,
    /// Whether the client speaks HTTP/2 (h2's frame logs) or HTTP/1.1.
    h2: bool,
    /// `[log] redact`.
    redact: bool,
    /// Whether upstream connections go through an outbound proxy that asks for credentials.
    proxy: bool,
}

/// Starts the relay binary on `config` with the log format and `RUST_LOG` of `case`.
fn spawn(config: &std::path::Path, case: Case) -> RelayProcess {
    let format = if case.format == Format::Json { "json" } else { "pretty" };
    RelayProcess::serve(config, &["--log-format", format], |cmd| {
        if let Some(filter) = case.rust_log {
            cmd.env("RUST_LOG", filter);
        }
    })
}

/// SIGTERM, then at most 30 s for the exit; returns the exit code and all output.
async fn stop(mut relay: RelayProcess) -> (Option<i32>, String, String) {
    let (status, stderr) = relay.stop().await;
    (status.code(), relay.stdout(), stderr)
}

/// A response's status, headers and body.
struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

/// One request on a new TLS connection, over HTTP/2 or HTTP/1.1.
async fn send(
    client: &TlsClient,
    h2: bool,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Reply {
    let tls = client.connect(HOST).await.expect("handshake");
    let mut req = Request::builder().method(method);
    req = if h2 { req.uri(format!("https://{HOST}{target}")) } else { req.uri(target).header("host", HOST) };
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).expect("request");
    let resp: Response<hyper::body::Incoming> = if h2 {
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.expect("h2");
        tokio::spawn(conn);
        tokio::time::timeout(Duration::from_secs(20), s.send_request(req)).await.expect("in time").expect("response")
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("h1");
        tokio::spawn(conn);
        tokio::time::timeout(Duration::from_secs(20), s.send_request(req)).await.expect("in time").expect("response")
    };
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(20), body.collect()).await.expect("in time").expect("body");
    Reply { status: parts.status.as_u16(), headers: parts.headers, body: body.to_bytes() }
}

/// The upstream broker: the token exchange answers with a token, everything else with a page
/// that sets a session cookie.
async fn upstream() -> Upstream {
    Upstream::start(
        None,
        UpstreamBehaviour::respond(|req| {
            let r = Response::builder().status(200);
            let r = if req.target.starts_with("/v1/auth/token/") {
                r.header("content-type", "application/json")
                    .body(Full::new(Bytes::from(format!(r#"{{"accessToken":"{TOKEN}"}}"#))))
            } else {
                r.header("set-cookie", format!("session={UPSTREAM_COOKIE}; Path=/; Secure; HttpOnly"))
                    .body(Full::new(Bytes::from_static(b"upstream page")))
            };
            r.expect("response")
        }),
    )
    .await
}

/// Runs the flow for `case` and returns the relay's exit code, stdout and stderr.
async fn flow(case: Case) -> (Option<i32>, String, String) {
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &[HOST]);
    let up = upstream().await;
    let proxy = if case.proxy { Some(Proxy::start(Some(("relay", PROXY_PASSWORD))).await) } else { None };
    let outbound = match &proxy {
        Some(p) => format!("\n[outbound]\nproxy = \"{}\"\n", p.url(Some(("relay", PROXY_PASSWORD)))),
        None => String::new(),
    };
    let config = pki.dir.path().join("relay.toml");
    let toml = format!(
        r#"[server]
https = ["127.0.0.1:0"]
storage = "{storage}"

[log]
redact = {redact}

[[site]]
hostnames = ["{HOST}"]
upstream = "http://{up}"

[site.tls]
source = "files"
cert = "{cert}"
key = "{key}"

[site.callback]
mode = "{mode}"

[site.authorize]
mode = "{mode}"
{outbound}"#,
        storage = pki.dir.path().join("store").display(),
        redact = case.redact,
        up = up.addr,
        cert = leaf.cert_path.display(),
        key = leaf.key_path.display(),
        mode = case.mode,
    );
    std::fs::write(&config, toml).expect("write config");
    let mut relay = spawn(&config, case);
    let alpn: &[&[u8]] = if case.h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let client = TlsClient::new(relay.https_addr().await, pki.client_config(alpn));
    assert_healthy(&client, case.h2).await;

    let redirect = case.mode == "redirect";
    let proxied = |redirect_status: u16| if redirect { redirect_status } else { 200 };
    let authorize = send(
        &client,
        case.h2,
        "GET",
        &format!("/v1/auth/authorize?clientId=app&serviceType=Office365&responseType=code&state={STATE}"),
        &[],
        "",
    )
    .await;
    assert_eq!(authorize.status, proxied(302));
    let callback =
        send(&client, case.h2, "GET", &format!("/v1/auth/callback?code={CODE}&state={STATE}"), &[], "").await;
    assert_eq!(callback.status, proxied(302));
    if redirect {
        let location = callback.headers.get("location").expect("location").to_str().unwrap().to_string();
        assert_eq!(location, format!("http://{}/v1/auth/callback?code={CODE}&state={STATE}", up.addr));
    }
    let form = [("content-type", "application/x-www-form-urlencoded".to_string())];
    let posted =
        send(&client, case.h2, "POST", "/v1/auth/callback", &form, &format!("code={CODE}&state={STATE}")).await;
    assert_eq!(posted.status, proxied(307));
    let token = send(
        &client,
        case.h2,
        "POST",
        &format!("/v1/auth/token/{CODE}"),
        &[("authorization", format!("Basic {}", basic_credentials())), ("cookie", format!("sid={COOKIE}"))],
        "",
    )
    .await;
    assert_eq!(token.status, 200);
    assert_eq!(token.body, format!(r#"{{"accessToken":"{TOKEN}"}}"#));
    let seen = up.last();
    assert_eq!(seen.target, format!("/v1/auth/token/{CODE}"));
    assert_eq!(seen.headers["authorization"], format!("Basic {}", basic_credentials()));
    assert_eq!(up.hits(), if redirect { 1 } else { 4 });
    if let Some(p) = &proxy {
        assert!(!p.connects().is_empty(), "the upstream was reached through the proxy");
    }
    stop(relay).await
}

/// `/healthz` answers 200 (once the relay has bound its port, a connection waits in the backlog
/// until it serves).
async fn assert_healthy(client: &TlsClient, h2: bool) {
    assert_eq!(send(client, h2, "GET", "/healthz", &[], "").await.status, 200);
}

/// `route=... status=... upstream_status=...` of every access line (health probes left out).
fn access_lines(format: Format, logs: &str) -> Vec<(String, u64, Option<u64>, Option<String>)> {
    let mut out = Vec::new();
    for line in logs.lines() {
        let fields: serde_json::Map<String, serde_json::Value> = match format {
            Format::Json => {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                if v["target"] != "access" {
                    continue;
                }
                v.as_object().expect("object").clone()
            }
            Format::Pretty => {
                // `... INFO access: client=127.0.0.1 method=GET route=callback status=302 latency_ms=0.068`
                let Some((_, rest)) = line.split_once(" access: ") else { continue };
                rest.split_whitespace()
                    .map(|kv| kv.split_once('=').unwrap_or_else(|| panic!("`{kv}` is not key=value in: {line}")))
                    .map(|(k, v)| {
                        let json = v.parse::<u64>().map(serde_json::Value::from).unwrap_or_else(|_| v.into());
                        (k.to_string(), json)
                    })
                    .collect()
            }
        };
        assert_eq!(fields.get("client").and_then(|v| v.as_str()), Some("127.0.0.1"), "client address in: {line}");
        let route = fields["route"].as_str().expect("route").to_string();
        if route == "healthz" {
            continue;
        }
        let status = fields["status"].as_u64().expect("status");
        let upstream = fields.get("upstream_status").and_then(|v| v.as_u64());
        let uri = fields.get("uri").and_then(|v| v.as_str()).map(String::from);
        out.push((route, status, upstream, uri));
    }
    out
}

fn assert_no_secrets(case: Case, stdout: &str, stderr: &str) {
    for secret in secrets() {
        for (name, text) in [("stdout", stdout), ("stderr", stderr)] {
            assert!(!text.contains(&secret), "{case:?}: `{secret}` appears in {name}:\n{text}");
        }
    }
}

async fn redacted(case: Case) {
    let (code, stdout, stderr) = flow(case).await;
    assert_eq!(code, Some(0), "{case:?}: exit status; stderr:\n{stderr}");
    assert_no_secrets(case, &stdout, &stderr);
    let (a, c) = if case.mode == "redirect" { (302, 302) } else { (200, 200) };
    let up = |status: u64| (case.mode == "proxy").then_some(status);
    let f = if case.mode == "redirect" { 307 } else { 200 };
    assert_eq!(
        access_lines(case.format, &stderr),
        [
            ("authorize".to_string(), a, up(200), None),
            ("callback".to_string(), c, up(200), None),
            ("callback".to_string(), f, up(200), None),
            ("token".to_string(), 200, Some(200), None),
        ],
        "{case:?}:\n{stderr}"
    );
    if case.format == Format::Pretty {
        let token_line = stderr.lines().find(|l| l.contains(" route=token ")).expect("token access line");
        assert!(
            token_line.contains(" INFO access: client=127.0.0.1 method=POST route=token status=200 latency_ms="),
            "{token_line}"
        );
        assert!(token_line.contains(" upstream_status=200 upstream_ms="), "{token_line}");
    }
    if case.rust_log == Some("debug") {
        assert!(
            stderr.contains("DEBUG") || stderr.contains("\"level\":\"DEBUG\""),
            "{case:?}: no debug lines:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_debug_proxied_over_h2_logs_no_secret() {
    redacted(Case {
        format: Format::Json,
        rust_log: Some("debug"),
        mode: "proxy",
        h2: true,
        redact: true,
        proxy: true,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_debug_redirected_over_http1_logs_no_secret() {
    let case = Case {
        format: Format::Pretty,
        rust_log: Some("debug"),
        mode: "redirect",
        h2: false,
        redact: true,
        proxy: true,
    };
    redacted(case).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_default_filter_redirected_over_http1_logs_no_secret() {
    redacted(Case { format: Format::Json, rust_log: None, mode: "redirect", h2: false, redact: true, proxy: false })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_default_filter_proxied_over_h2_logs_no_secret() {
    redacted(Case { format: Format::Pretty, rust_log: None, mode: "proxy", h2: true, redact: true, proxy: false })
        .await;
}

/// `[log] redact = false` adds the raw path and query to the access line (local debugging),
/// and still never a header value or a response body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redact_false_logs_path_and_query_but_no_credentials() {
    let case = Case { format: Format::Json, rust_log: None, mode: "redirect", h2: false, redact: false, proxy: false };
    let (code, stdout, stderr) = flow(case).await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    let uri = |s: &str| Some(s.to_string());
    assert_eq!(
        access_lines(case.format, &stderr),
        [
            (
                "authorize".to_string(),
                302,
                None,
                uri(&format!("/v1/auth/authorize?clientId=app&serviceType=Office365&responseType=code&state={STATE}"))
            ),
            ("callback".to_string(), 302, None, uri(&format!("/v1/auth/callback?code={CODE}&state={STATE}"))),
            ("callback".to_string(), 307, None, uri("/v1/auth/callback")),
            ("token".to_string(), 200, Some(200), uri(&format!("/v1/auth/token/{CODE}"))),
        ]
    );
    for secret in
        [CLIENT_SECRET, COOKIE, TOKEN, UPSTREAM_COOKIE].map(String::from).into_iter().chain([basic_credentials()])
    {
        assert!(!stderr.contains(&secret) && !stdout.contains(&secret), "`{secret}` appears:\n{stderr}");
    }
}

/// Behind an HTTP proxy in `[server] trusted_proxies`, the access line's `client` is the address
/// the proxy names in `X-Forwarded-For`, not the proxy's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_access_line_names_its_client() {
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &[HOST]);
    let config = pki.dir.path().join("relay.toml");
    let toml = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nstorage = \"{storage}\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n{site}",
        storage = pki.dir.path().join("store").display(),
        site = common::files_site("auth", &[HOST], &leaf, ""),
    );
    std::fs::write(&config, toml).expect("write config");
    let case = Case { format: Format::Json, rust_log: None, mode: "redirect", h2: false, redact: true, proxy: false };
    let mut relay = spawn(&config, case);
    let client = TlsClient::new(relay.https_addr().await, pki.client_config(&[b"http/1.1"]));
    assert_healthy(&client, false).await;
    let xff = [("x-forwarded-for", "198.51.100.1, 203.0.113.7".to_string())];
    assert_eq!(send(&client, false, "GET", "/v1/auth/callback?code=c", &xff, "").await.status, 302);
    let (code, _, stderr) = stop(relay).await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    let line = stderr.lines().find(|l| l.contains(r#""route":"callback""#)).expect("callback access line");
    assert!(line.contains(r#""client":"203.0.113.7""#), "{line}");
}
