//! A workout for a built relay: the binary started as a child process, every route over
//! HTTP/1.1 and HTTP/2, then the benchmark's workloads (keep-alive redirects, proxied token
//! POSTs, HTTP/2 streams, a full TLS 1.3 handshake per request, 200 connections at once), every
//! answer checked. Twice: once as deployed (JSON access lines), once as benchmarked (none).
//!
//! `scripts/build-pgo` runs it against the instrumented release build, so the profile the
//! optional profile-optimised build is made with comes from this repository alone:
//!
//! ```text
//! RELAY_BIN=target/pgo/generate/release/oauth-relay EXERCISE_SECONDS=2 cargo test --test exercise
//! ```
//!
//! In `cargo test` it runs the debug build for a moment per workload: the same paths under
//! concurrency, each answer's status checked.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::client::plain_get;
use common::pki::Leaf;
use common::process::RelayProcess;
use common::{Pki, Recorded, TlsClient, Upstream, UpstreamBehaviour};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinSet;

const CALLBACK: &str = "/v1/auth/callback?state=S&code=C&scope=X";
/// The harness's W3 body (../shared/bench/scripts/wrk.lua).
const TOKEN_BODY: &str = "grant_type=authorization_code&client_id=bench&client_secret=s3cr3t";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_built_relay_answers_every_route_and_workload_as_configured() {
    let seconds = std::env::var("EXERCISE_SECONDS")
        .map(|s| s.parse::<f64>().expect("EXERCISE_SECONDS: seconds per workload"))
        .unwrap_or(0.25);
    let bin = std::env::var_os("RELAY_BIN").map_or_else(|| env!("CARGO_BIN_EXE_oauth-relay").into(), PathBuf::from);
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &["relay.test", "proxied.test"]);
    let upstream = Upstream::start(None, UpstreamBehaviour::respond(broker)).await;

    for access in [true, false] {
        let relay = Relay::start(&bin, &pki, &leaf, upstream.addr, access).await;
        relay.routes().await;
        relay.workloads(Duration::from_secs_f64(seconds)).await;
        relay.stop().await;
    }
}

/// The upstream broker: tokens, a proxied authorize that sends the browser on to its own
/// callback (a route the relay proxies, so the `Location` is rewritten onto the relay) with a
/// cookie, a proxied callback that sends it back to the application.
fn broker(req: &Recorded) -> Response<Full<Bytes>> {
    let host = req.headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or_default();
    let path = req.target.split('?').next().unwrap_or_default();
    let r = Response::builder();
    let r = match path {
        p if p.starts_with("/v1/auth/token/") => {
            return r
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(br#"{"accountId":1,"accessToken":"tok"}"#)))
                .unwrap();
        }
        "/v1/auth/authorize" => r
            .status(302)
            .header("location", format!("http://{host}/v1/auth/callback?code=C&state=S"))
            .header("set-cookie", "sid=1; Domain=127.0.0.1; Path=/; HttpOnly"),
        "/v1/auth/callback" => r.status(302).header("location", "https://app.example.test/done"),
        _ => r.status(404),
    };
    r.body(Full::new(Bytes::new())).unwrap()
}

/// The relay binary on three ephemeral loopback ports, and clients for it.
struct Relay {
    process: RelayProcess,
    https: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    /// HTTP/1.1 and HTTP/2 clients; `fresh` offers what the harness's handshake loop offers
    /// (X25519, AES-128-GCM, TLS 1.3, no resumption); `tls12` speaks only TLS 1.2.
    h1: TlsClient,
    h2: TlsClient,
    fresh: TlsClient,
    tls12: TlsClient,
    /// Holds the configuration file and the store.
    _dir: tempfile::TempDir,
}

impl Relay {
    async fn start(bin: &std::path::Path, pki: &Pki, leaf: &Leaf, upstream: SocketAddr, access: bool) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let files = format!(
            "[site.tls]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n",
            leaf.cert_path.display(),
            leaf.key_path.display()
        );
        let config = format!(
            "[server]\nhttps = [\"127.0.0.1:0\"]\nhttp = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\nstorage = \"{store}\"\n\n\
             [log]\naccess = {access}\n\n\
             [[site]]\nname = \"broker\"\nhostnames = [\"relay.test\"]\ndefault = true\n\
             upstream = \"http://{upstream}\"\n{files}\n\
             [[site]]\nname = \"proxied\"\nhostnames = [\"proxied.test\"]\nupstream = \"http://{upstream}\"\n{files}\n\
             [site.callback]\nmode = \"proxy\"\n\n[site.authorize]\nmode = \"proxy\"\n",
            store = dir.path().join("store").display(),
        );
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, config).unwrap();
        let mut process = RelayProcess::serve_bin(bin, &path, &["--log-format", "json"], |_| {});
        let (https, http, admin) = (process.https_addr().await, process.http_addr().await, process.admin_addr().await);
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
        provider.cipher_suites = vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
        let mut fresh = (*pki.client_config_with(provider.into(), &[&rustls::version::TLS13], &[b"http/1.1"])).clone();
        fresh.resumption = rustls::client::Resumption::disabled();
        Relay {
            process,
            https,
            http,
            admin,
            h1: TlsClient::new(https, pki.client_config(&[b"http/1.1"])),
            h2: TlsClient::new(https, pki.client_config(&[b"h2"])),
            fresh: TlsClient::new(https, Arc::new(fresh)),
            tls12: TlsClient::new(https, pki.client_config_for(&[&rustls::version::TLS12], &[b"http/1.1"])),
            _dir: dir,
        }
    }

    /// Each route once over HTTP/1.1 and once over HTTP/2, then the plain-HTTP and admin
    /// listeners and a TLS 1.2 client.
    async fn routes(&self) {
        let form = [("content-type", "application/x-www-form-urlencoded")];
        let basic = [("authorization", "Basic dXNlcjpzZWNyZXQ="), form[0]];
        let long = format!("/v1/auth/callback?state={}", "x".repeat(9000));
        let cases: [Case; 13] = [
            ("relay.test", "GET", "/healthz", &[], "", 200),
            ("relay.test", "GET", "/readyz", &[], "", 200),
            ("relay.test", "GET", CALLBACK, &[], "", 302),
            ("relay.test", "GET", "/v1/auth/callback", &[], "", 200),
            ("relay.test", "POST", "/v1/auth/callback", &form, "code=C&state=S", 307),
            ("relay.test", "POST", "/v1/auth/callback", &[("content-type", "application/json")], "{}", 415),
            ("relay.test", "GET", "/v1/auth/authorize?clientId=c&serviceType=Office365", &[], "", 302),
            ("relay.test", "POST", "/v1/auth/token/abc", &basic, TOKEN_BODY, 200),
            ("relay.test", "GET", "/nowhere", &[], "", 404),
            ("relay.test", "DELETE", CALLBACK, &[], "", 405),
            ("relay.test", "GET", &long, &[], "", 414),
            ("proxied.test", "GET", "/v1/auth/authorize?clientId=c", &[], "", 302),
            ("proxied.test", "GET", CALLBACK, &[], "", 302),
        ];
        for (host, method, target, headers, body, want) in cases {
            let one = self.h1.send(host, method, target, headers, body).await;
            let two = self.h2.send_h2(host, method, target, headers, body).await;
            for (reply, version) in [(one, "HTTP/1.1"), (two, "HTTP/2")] {
                assert_eq!(reply.status, want, "{method} {host}{target} over {version}: {:?}", reply.headers);
            }
        }
        let proxied = self.h1.get("proxied.test", "/v1/auth/authorize?clientId=c").await;
        let callback = format!("https://proxied.test:{}/v1/auth/callback?code=C&state=S", self.https.port());
        assert_eq!(proxied.header("location"), callback);
        let foreign = self.h1.send("relay.test", "GET", CALLBACK, &[("host", "other.test")], "").await;
        assert_eq!(foreign.status, 421);
        assert_eq!(self.tls12.get("relay.test", CALLBACK).await.status, 302);
        assert_eq!(plain_get(self.http, "relay.test", CALLBACK).await.status, 308);
        assert_eq!(plain_get(self.admin, "localhost", "/readyz").await.status, 200);
        assert_eq!(plain_get(self.admin, "localhost", "/metrics").await.status, 200);
    }

    /// The benchmark's workloads, `each` long (every connection sends at least one request).
    async fn workloads(&self, each: Duration) {
        let w1 = Work { host: "relay.test", method: "GET", target: CALLBACK, body: "", want: 302 };
        let w3 = Work { method: "POST", target: "/v1/auth/token/abc123", body: TOKEN_BODY, want: 200, ..w1 };
        keep_alive(&self.h1, 8, 1, each, w1).await;
        keep_alive(&self.h1, 8, 1, each, w3).await;
        keep_alive(&self.h2, 2, 8, each, w1).await;
        keep_alive(&self.h2, 2, 8, each, w3).await;
        handshakes(&self.fresh, 4, each, w1).await;
        keep_alive(&self.h1, 200, 1, each, w1).await;
    }

    /// SIGTERM, and a clean exit within 30 s (an instrumented build writes its profile then).
    async fn stop(mut self) {
        let (status, log) = self.process.stop().await;
        assert!(status.success(), "the relay exits 0 on SIGTERM, not {status}: {log}");
    }
}

/// A route check: host, method, target, headers, body, and the status it must get.
type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], &'a str, u16);

/// One request shape and the status every answer to it must have.
#[derive(Clone, Copy)]
struct Work {
    host: &'static str,
    method: &'static str,
    target: &'static str,
    body: &'static str,
    want: u16,
}

impl Work {
    fn request(&self, h2: bool) -> Request<Full<Bytes>> {
        let req = Request::builder().method(self.method);
        let req = if h2 {
            req.uri(format!("https://{}{}", self.host, self.target))
        } else {
            req.uri(self.target).header("host", self.host)
        };
        let req = if self.body.is_empty() {
            req
        } else {
            req.header("content-type", "application/x-www-form-urlencoded")
                .header("authorization", "Basic YmVuY2g6czNjcjN0")
        };
        req.body(Full::new(Bytes::from_static(self.body.as_bytes()))).unwrap()
    }

    /// Sends one request and reads the whole answer, which must have the wanted status.
    async fn send(&self, sender: &mut Sender, h2: bool) {
        let resp = tokio::time::timeout(Duration::from_secs(20), sender.send(self.request(h2)))
            .await
            .expect("an answer within 20 s")
            .expect("an answer");
        assert_eq!(resp.status().as_u16(), self.want, "{} {}{}", self.method, self.host, self.target);
        resp.into_body().collect().await.expect("the whole body");
    }
}

/// Either kind of hyper client connection.
enum Sender {
    One(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Two(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<hyper::body::Incoming>> {
        match self {
            Sender::One(s) => s.send_request(req).await,
            Sender::Two(s) => s.send_request(req).await,
        }
    }
}

/// `conns` connections with `streams` requests in flight on each (HTTP/2 when the client
/// offers it), each sending `work` until `each` has passed.
async fn keep_alive(client: &TlsClient, conns: usize, streams: usize, each: Duration, work: Work) {
    let deadline = Instant::now() + each;
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        let tls = client.connect(work.host).await.expect("handshake");
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let senders = if h2 {
            let (s, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            (0..streams).map(|_| Sender::Two(s.clone())).collect()
        } else {
            assert_eq!(streams, 1, "HTTP/1.1 takes one request at a time");
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            vec![Sender::One(s)]
        };
        for mut sender in senders {
            tasks.spawn(async move {
                loop {
                    work.send(&mut sender, h2).await;
                    if Instant::now() >= deadline {
                        break;
                    }
                }
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a connection's requests");
    }
}

/// `loops` clients each making a fresh connection per request until `each` has passed.
async fn handshakes(client: &TlsClient, loops: usize, each: Duration, work: Work) {
    let deadline = Instant::now() + each;
    let mut tasks = JoinSet::new();
    for _ in 0..loops {
        let client = client.clone();
        tasks.spawn(async move {
            loop {
                let reply = client.get(work.host, work.target).await;
                assert_eq!(reply.status, work.want);
                if Instant::now() >= deadline {
                    break;
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a handshake loop");
    }
}
