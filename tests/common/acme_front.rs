//! A fault-injecting front of Pebble, for what Pebble 2.4 cannot do: ACME renewal information
//! (ARI, RFC 9773), a CA that refuses `replaces` with `alreadyReplaced`, and `rateLimited` with
//! `Retry-After`. Every other request is passed to Pebble unchanged, with its `Host`, so the
//! URLs Pebble hands out name the front and the whole conversation goes through it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::pebble::Pebble;

/// The faults the front injects.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// The directory offers ARI: the first certificate asked about is due now (its window has
    /// passed), every later one in a year. Answers carry `explanationURL` and no `Retry-After`
    /// (RFC 9773 asks for one, some CAs leave it out; instant-acme alone would drop the answer).
    pub ari: bool,
    /// A `newOrder` naming a certificate in `replaces` gets 409 `alreadyReplaced`.
    pub refuse_replaces: bool,
    /// The first `n` `newOrder` requests get 429 `rateLimited` with `Retry-After: secs`.
    pub rate_limit: Option<(u32, u64)>,
    /// A challenge's "ready" POST waits until [`AcmeFront::open_gate`]: an order held in
    /// flight for as long as the test needs.
    pub hold_challenges: bool,
}

/// What went through the front.
#[derive(Debug, Default)]
pub struct FrontLog {
    /// One entry per `newOrder` request: whether it carried `replaces`.
    pub new_orders: Vec<bool>,
    /// The certificate identifiers ARI was asked about, in order.
    pub ari_ids: Vec<String>,
    /// Challenge POSTs that arrived (held or not).
    pub challenges: usize,
    new_order_path: String,
}

/// A running front; stops when dropped.
pub struct AcmeFront {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<FrontLog>>,
    gate: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AcmeFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The explanation page every ARI answer names.
pub const EXPLANATION: &str = "https://ca.example/why-renew-now";

impl AcmeFront {
    /// Starts on a loopback port with a certificate from Pebble's listener CA (so the relay's
    /// `directory_ca_file = pebble.ca_path()` trusts it too).
    pub async fn start(pebble: &Pebble, faults: Faults) -> AcmeFront {
        let leaf = pebble.pki.leaf("acme-front", &["127.0.0.1"]);
        let tls = TlsAcceptor::from(pebble.pki.server_config(&leaf, &[b"http/1.1"]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(Arc::unwrap_or_clone(pebble.pki.client_config(&[])))
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
        let (gate, gate_rx) = tokio::sync::watch::channel(false);
        let front =
            Arc::new(Front { pebble: pebble.listen, faults, client, log: Arc::default(), me: addr, gate: gate_rx });
        let log = front.log.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (tls, front) = (tls.clone(), front.clone());
                conns.spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else { return };
                    let svc = service_fn(move |req| {
                        let front = front.clone();
                        async move { Ok::<_, Infallible>(front.answer(req).await) }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        AcmeFront { addr, log, gate, task }
    }

    /// Lets held challenge POSTs (and all later ones) through.
    pub fn open_gate(&self) {
        let _ = self.gate.send(true);
    }

    /// Challenge POSTs so far.
    pub fn challenges(&self) -> usize {
        self.log.lock().unwrap().challenges
    }

    /// The directory URL through the front.
    pub fn directory_url(&self) -> String {
        format!("https://{}/dir", self.addr)
    }

    /// Whether each `newOrder` so far carried `replaces`.
    pub fn new_orders(&self) -> Vec<bool> {
        self.log.lock().unwrap().new_orders.clone()
    }
}

type Reply = http::Response<Full<Bytes>>;

struct Front {
    pebble: SocketAddr,
    faults: Faults,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    log: Arc<Mutex<FrontLog>>,
    me: SocketAddr,
    gate: tokio::sync::watch::Receiver<bool>,
}

impl Front {
    async fn answer(&self, req: http::Request<hyper::body::Incoming>) -> Reply {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let path = parts.uri.path().to_string();
        if let Some(id) = path.strip_prefix("/renewal-info/") {
            return self.ari(id);
        }
        if parts.method == http::Method::POST && path == self.log.lock().unwrap().new_order_path {
            if let Some(reply) = self.new_order(&body) {
                return reply;
            }
        }
        // Pebble's challenge URLs: `/chalZ/{id}`.
        if parts.method == http::Method::POST && path.starts_with("/chal") {
            self.log.lock().unwrap().challenges += 1;
            if self.faults.hold_challenges {
                let mut gate = self.gate.clone();
                let _ = tokio::time::timeout(Duration::from_secs(60), gate.wait_for(|open| *open)).await;
            }
        }
        let mut reply = self.forward(parts, body).await;
        if path == "/dir" {
            reply = self.directory(reply).await;
        }
        reply
    }

    /// Records a `newOrder` and answers the injected fault, if any.
    fn new_order(&self, jws: &[u8]) -> Option<Reply> {
        let jws: serde_json::Value = serde_json::from_slice(jws).ok()?;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jws["payload"].as_str()?).ok()?;
        let payload: serde_json::Value = serde_json::from_slice(&payload).ok()?;
        let replaces = payload.get("replaces").is_some();
        let n = {
            let mut log = self.log.lock().unwrap();
            log.new_orders.push(replaces);
            log.new_orders.len() as u32
        };
        if let Some((count, secs)) = self.faults.rate_limit
            && n <= count
        {
            let detail = "too many certificates for this name; retry after the Retry-After time";
            return Some(problem(429, "rateLimited", detail, Some(secs)));
        }
        if replaces && self.faults.refuse_replaces {
            return Some(problem(
                409,
                "alreadyReplaced",
                "the certificate named in replaces was already replaced",
                None,
            ));
        }
        None
    }

    fn ari(&self, id: &str) -> Reply {
        let first = {
            let mut log = self.log.lock().unwrap();
            log.ari_ids.push(id.to_string());
            log.ari_ids[0] == id
        };
        let now = SystemTime::now();
        let (start, end) = if first {
            (now - Duration::from_secs(7200), now - Duration::from_secs(3600))
        } else {
            (now + Duration::from_secs(365 * 86400), now + Duration::from_secs(366 * 86400))
        };
        let t = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let body = serde_json::json!({
            "suggestedWindow": { "start": t(start), "end": t(end) },
            "explanationURL": EXPLANATION,
        });
        http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    /// Pebble's directory, with `renewalInfo` when ARI is on; notes the `newOrder` path.
    async fn directory(&self, reply: Reply) -> Reply {
        let (parts, body) = reply.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let mut dir: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let new_order = dir["newOrder"].as_str().and_then(|u| url::Url::parse(u).ok()).map(|u| u.path().to_string());
        self.log.lock().unwrap().new_order_path = new_order.unwrap_or_default();
        if self.faults.ari {
            dir["renewalInfo"] = format!("https://{}/renewal-info", self.me).into();
        }
        let mut reply = http::Response::from_parts(parts, Full::new(Bytes::from(dir.to_string())));
        reply.headers_mut().remove("content-length");
        reply
    }

    async fn forward(&self, parts: http::request::Parts, body: Bytes) -> Reply {
        let uri = format!("https://{}{}", self.pebble, parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
        let mut req = http::Request::builder().method(parts.method).uri(uri);
        for (k, v) in &parts.headers {
            req = req.header(k, v);
        }
        let rsp = match self.client.request(req.body(Full::new(body)).unwrap()).await {
            Ok(r) => r,
            Err(e) => {
                return http::Response::builder().status(502).body(Full::new(Bytes::from(e.to_string()))).unwrap();
            }
        };
        let (parts, body) = rsp.into_parts();
        let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        http::Response::from_parts(parts, Full::new(body))
    }
}

/// An RFC 8555 problem document with `status`, of type `urn:ietf:params:acme:error:{kind}`.
fn problem(status: u16, kind: &str, detail: &str, retry_after: Option<u64>) -> Reply {
    let body =
        serde_json::json!({ "type": format!("urn:ietf:params:acme:error:{kind}"), "detail": detail, "status": status });
    let mut b = http::Response::builder().status(status).header("content-type", "application/problem+json");
    if let Some(secs) = retry_after {
        b = b.header("retry-after", secs.to_string());
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}
