//! A real upstream server (plain HTTP or HTTPS with the test PKI) that records every request and
//! answers as the test says.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Path and query exactly as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// "HTTP/1.1" or "HTTP/2.0".
    pub version: http::Version,
}

type Handler = dyn Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync;

/// How the upstream answers.
#[derive(Clone)]
pub enum UpstreamBehaviour {
    /// Answer with what the closure returns.
    Respond(Arc<Handler>),
    /// Read the request, then never answer.
    Silent,
    /// Read the request, wait this long, then answer as the closure says (an in-flight request
    /// during shutdown).
    Delayed(std::time::Duration, Arc<Handler>),
}

impl UpstreamBehaviour {
    pub fn respond(f: impl Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync + 'static) -> Self {
        UpstreamBehaviour::Respond(Arc::new(f))
    }

    /// Always `status` with `body` and the given headers.
    pub fn fixed(status: u16, headers: &[(&str, &str)], body: &str) -> Self {
        let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let body = body.to_string();
        Self::respond(move |_| {
            let mut r = Response::builder().status(StatusCode::from_u16(status).unwrap());
            for (k, v) in &headers {
                r = r.header(k, v);
            }
            r.body(Full::new(Bytes::from(body.clone()))).unwrap()
        })
    }
}

/// A running upstream; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Starts on 127.0.0.1:0; with `tls`, serves HTTPS with that config (ALPN h2 + http/1.1).
    pub async fn start(tls: Option<Arc<rustls::ServerConfig>>, behaviour: UpstreamBehaviour) -> Upstream {
        Self::start_at("127.0.0.1:0".parse().unwrap(), tls, behaviour).await
    }

    /// Like [`Upstream::start`] on a given address (an upstream restarted on the port it had).
    pub async fn start_at(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        behaviour: UpstreamBehaviour,
    ) -> Upstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (tls, behaviour, recorded) = (tls.clone(), behaviour.clone(), recorded.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (behaviour, recorded) = (behaviour.clone(), recorded.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            let rec = Recorded {
                                method: parts.method,
                                target: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                                headers: parts.headers,
                                body,
                                version: parts.version,
                            };
                            recorded.lock().unwrap().push(rec.clone());
                            match behaviour {
                                UpstreamBehaviour::Respond(f) => Ok::<_, Infallible>(f(&rec)),
                                UpstreamBehaviour::Silent => std::future::pending().await,
                                UpstreamBehaviour::Delayed(wait, f) => {
                                    tokio::time::sleep(wait).await;
                                    Ok(f(&rec))
                                }
                            }
                        }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(cfg) => {
                            let Ok(stream) = TlsAcceptor::from(cfg).accept(tcp).await else {
                                return;
                            };
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        Upstream { addr, requests, task }
    }

    /// How many requests arrived.
    pub fn hits(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// The last request received.
    pub fn last(&self) -> Recorded {
        self.requests.lock().unwrap().last().cloned().expect("the upstream received a request")
    }
}
