//! The floor of the relay's stack: the least a server built on the same crates (tokio,
//! tokio-rustls, hyper, hyper-util's pooled client) can do for the benchmark's W1, W2 and W3.
//! One current-thread runtime, HTTP/1.1 only, no routing table, limits, deadlines, metrics or
//! logs. `scripts/bench-floor` measures it beside nginx and the relay, to tell how much of the
//! relay's CPU per request is its own and how much any server on this stack pays.
//!
//! Never a server to run: it answers every path but the two below with `200 ok`, relays no
//! header but `Host`, and has no bound on anything.
//!
//! ```text
//! cargo run --release --example floor -- CERT KEY LISTEN UPSTREAM
//! ```

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

type Body = BoxBody<Bytes, hyper::Error>;
type Upstream = Client<HttpConnector, Incoming>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cert, key, listen, upstream] = args.as_slice() else {
        eprintln!("usage: floor CERT KEY LISTEN UPSTREAM (e.g. 127.0.0.1:18446 127.0.0.1:18080)");
        std::process::exit(2);
    };
    let chain = CertificateDer::pem_file_iter(cert).and_then(|c| c.collect::<Result<Vec<_>, _>>());
    let key = PrivateKeyDer::from_pem_file(key);
    let (Ok(chain), Ok(key)) = (chain, key) else {
        eprintln!("floor: cannot read the certificate or key");
        std::process::exit(1);
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .expect("a usable certificate and key");
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(serve(Arc::new(tls), listen.clone(), upstream.clone()));
}

async fn serve(tls: Arc<rustls::ServerConfig>, listen: String, upstream: String) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let client: Upstream = Client::builder(TokioExecutor::new()).build_http();
    let upstream: Arc<str> = upstream.into();
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("the listening address is free");
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        let (acceptor, client, upstream) = (acceptor.clone(), client.clone(), upstream.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let service = service_fn(move |req| answer(req, client.clone(), upstream.clone()));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

/// W1's redirect, W3's proxied token POST, and `200 ok` for everything else (W2 and readiness).
async fn answer(req: Request<Incoming>, client: Upstream, upstream: Arc<str>) -> Result<Response<Body>, hyper::Error> {
    let path = req.uri().path();
    if path.starts_with("/v1/auth/token/") {
        let target = format!("http://{upstream}{}", req.uri().path_and_query().map_or("/", |p| p.as_str()));
        let (mut parts, body) = req.into_parts();
        parts.uri = target.parse().expect("a valid upstream URI");
        parts.headers.insert(header::HOST, upstream.parse().expect("a valid Host"));
        return Ok(match client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => resp.map(BodyExt::boxed),
            Err(_) => fixed(StatusCode::BAD_GATEWAY, None, ""),
        });
    }
    Ok(if path == "/v1/auth/callback" {
        fixed(StatusCode::FOUND, Some(format!("https://api.aurinko.io{}", req.uri())), "")
    } else {
        fixed(StatusCode::OK, None, "ok")
    })
}

fn fixed(status: StatusCode, location: Option<String>, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|n| match n {}).boxed());
    *resp.status_mut() = status;
    if let Some(l) = location.and_then(|l| l.parse().ok()) {
        resp.headers_mut().insert(header::LOCATION, l);
    }
    resp
}
