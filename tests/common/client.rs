//! Real TLS clients: HTTP/1.1 and HTTP/2 requests over rustls with the test CA, and raw TLS
//! connections for handshake-level checks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A response as the client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// A header's value as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

/// A client trusting only the test CA, aimed at one relay address.
#[derive(Clone)]
pub struct TlsClient {
    pub addr: SocketAddr,
    pub config: Arc<rustls::ClientConfig>,
    /// Bytes written before the handshake, as a load balancer's PROXY header; each part is
    /// written on its own, 50 ms after the one before.
    pub preamble: Vec<Vec<u8>>,
    /// The local address to connect from (a second loopback address, say); `None`: the system's.
    pub source: Option<std::net::IpAddr>,
    /// The socket's send buffer size; `None`: the system's (on loopback, megabytes, which hide
    /// how a server closes while a client on a real network is still sending).
    pub send_buffer: Option<u32>,
}

impl TlsClient {
    pub fn new(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Self {
        TlsClient { addr, config, preamble: Vec::new(), source: None, send_buffer: None }
    }

    /// The same client, writing `parts` on every new connection before its handshake.
    pub fn with_preamble(&self, parts: &[&[u8]]) -> Self {
        TlsClient { preamble: parts.iter().map(|p| p.to_vec()).collect(), ..self.clone() }
    }

    /// The same client, with a send buffer of `bytes` on every new connection.
    pub fn with_send_buffer(&self, bytes: u32) -> Self {
        TlsClient { send_buffer: Some(bytes), ..self.clone() }
    }

    /// The same client, connecting from `source`.
    pub fn with_source(&self, source: std::net::IpAddr) -> Self {
        TlsClient { source: Some(source), ..self.clone() }
    }

    /// A TLS connection with SNI `sni` (an IP literal sends no SNI).
    pub async fn connect(&self, sni: &str) -> std::io::Result<TlsStream<TcpStream>> {
        let mut tcp = match (self.source, self.send_buffer) {
            (None, None) => TcpStream::connect(self.addr).await?,
            (source, send_buffer) => {
                let v4 = source.map_or(self.addr.is_ipv4(), |ip| ip.is_ipv4());
                let socket = if v4 { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
                if let Some(ip) = source {
                    socket.bind(SocketAddr::new(ip, 0))?;
                }
                if let Some(bytes) = send_buffer {
                    socket.set_send_buffer_size(bytes)?;
                }
                socket.connect(self.addr).await?
            }
        };
        for (i, part) in self.preamble.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::io::AsyncWriteExt::write_all(&mut tcp, part).await?;
        }
        let name = ServerName::try_from(sni.to_string()).expect("server name");
        tokio::time::timeout(Duration::from_secs(10), TlsConnector::from(self.config.clone()).connect(name, tcp))
            .await
            .expect("handshake within 10 s")
    }

    /// Hex serial of the certificate the relay serves for `sni`.
    pub async fn peer_serial(&self, sni: &str) -> String {
        let tls = self.connect(sni).await.expect("handshake");
        let cert = tls.get_ref().1.peer_certificates().expect("peer certs")[0].clone();
        use x509_parser::prelude::*;
        let (_, x) = X509Certificate::from_der(cert.as_ref()).expect("parse");
        x.raw_serial_as_string().replace(':', "")
    }

    /// One HTTP/1.1 request on a new connection; `Host` is `sni` unless given in `headers`.
    pub async fn send(&self, sni: &str, method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let tls = self.connect(sni).await.expect("handshake");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("h1");
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(target);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req = req.header("host", sni);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
            .await
            .expect("response within 20 s")
            .expect("response");
        collect(resp).await
    }

    /// `GET target` over HTTP/1.1.
    pub async fn get(&self, sni: &str, target: &str) -> Reply {
        self.send(sni, "GET", target, &[], "").await
    }

    /// One HTTP/2 request to `https://{sni}{target}` (the client config must offer `h2`); the
    /// `headers` go as sent (a `host` among them as well as `:authority`).
    pub async fn send_h2(&self, sni: &str, method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let tls = self.connect(sni).await.expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN picked h2");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.expect("h2");
        tokio::spawn(conn);
        let uri = format!("https://{sni}{target}");
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let resp = sender.send_request(req).await.expect("response");
        collect(resp).await
    }
}

async fn collect(resp: http::Response<hyper::body::Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(20), body.collect())
        .await
        .expect("body within 20 s")
        .expect("body")
        .to_bytes();
    Reply { status: parts.status.as_u16(), headers: parts.headers, body }
}

/// The samples of one counter with one label (`metric{label="value"} n`), scraped from the admin
/// listener at `admin`, by label value.
pub async fn scrape(admin: SocketAddr, metric: &str, label: &str) -> std::collections::BTreeMap<String, u64> {
    let reply = plain_get(admin, "localhost", "/metrics").await;
    assert_eq!(reply.status, 200);
    let prefix = format!("{metric}{{{label}=\"");
    reply
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|rest| {
            let (value, n) = rest.split_once("\"} ").expect("a labelled sample");
            (value.to_string(), n.parse().expect("a count"))
        })
        .collect()
}

/// One plain-HTTP/1.1 request (for the HTTP and admin listeners).
pub async fn plain_get(addr: SocketAddr, host: &str, target: &str) -> Reply {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("h1");
    tokio::spawn(conn);
    let req = Request::builder().uri(target).header("host", host).body(Full::new(Bytes::new())).unwrap();
    collect(sender.send_request(req).await.expect("response")).await
}
