//! Making a connection to an upstream: TCP as `egress` routes it (directly or through an HTTP
//! proxy's `CONNECT` tunnel), TLS with the site's trust and ALPN for `https`, then hyper's
//! `client::conn` handshake, HTTP/2 when the upstream picked it and HTTP/1.1 otherwise.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::Uri;
use http::uri::Scheme;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tower_service::Service;

use super::pool::{Conn, Probe, ReqBody};
use super::upstream::SendError;
use crate::egress::EgressConnector;

/// Everything one site needs to open connections to its upstreams.
#[derive(Clone)]
pub(super) struct Connector {
    pub egress: EgressConnector,
    /// The site's trust, offering `h2` and `http/1.1`.
    pub tls: TlsConnector,
    pub http1: http1::Builder,
    pub http2: http2::Builder<TokioExecutor>,
}

impl Connector {
    /// HTTP/1.1 as the relay speaks it upstream: each request head and body in one write (one
    /// send(2) rather than a writev(2), cheaper for a token request's few hundred bytes), and an
    /// answer's head no larger than `max_header_bytes` (hyper's default would take 400 kB).
    pub fn http1(max_header_bytes: usize) -> http1::Builder {
        let mut b = http1::Builder::new();
        // Twice the head bound: a head that never ends stops there, a complete one is measured
        // against the bound itself; hyper wants at least 8 KiB.
        b.writev(false).max_header_size(max_header_bytes).max_buf_size((2 * max_header_bytes).max(8192));
        b
    }

    /// HTTP/2 with the same bound on an answer's headers.
    pub fn http2(max_header_bytes: usize) -> http2::Builder<TokioExecutor> {
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new()).max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
        b
    }

    /// A new connection to `uri`'s origin; its task runs until hyper or the pool closes it.
    pub async fn connect(&self, uri: &Uri) -> Result<Conn, SendError> {
        let mut egress = self.egress.clone();
        std::future::poll_fn(|cx| egress.poll_ready(cx)).await.map_err(SendError::Connect)?;
        let tcp = Arc::new(egress.call(uri.clone()).await.map_err(SendError::Connect)?.into_inner());
        let probe = Probe::new(&tcp);
        let tcp = SharedTcp(tcp);
        if uri.scheme() != Some(&Scheme::HTTPS) {
            return self.handshake_http1(TokioIo::new(tcp), probe).await;
        }
        let tls = self.tls.connect(server_name(uri)?, tcp).await.map_err(SendError::Tls)?;
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, conn) = self.http2.handshake(TokioIo::new(tls)).await.map_err(SendError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            return Ok(Conn::Http2(sender));
        }
        self.handshake_http1(TokioIo::new(tls), probe).await
    }

    async fn handshake_http1<T>(&self, io: T, probe: Probe) -> Result<Conn, SendError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, conn) = self.http1.handshake::<T, ReqBody>(io).await.map_err(SendError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(Conn::Http1 { sender, probe })
    }
}

/// The name the upstream's certificate must carry: `uri`'s host, an IP address without its
/// brackets.
fn server_name(uri: &Uri) -> Result<ServerName<'static>, SendError> {
    let host = uri.host().unwrap_or_default();
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|e| SendError::Connect(e.into()))
}

/// A TCP stream shared between its connection, which reads and writes it, and the pool's
/// [`Probe`], which looks at the socket while the connection is idle. Reads and writes are
/// tokio's own non-blocking calls on the shared stream.
struct SharedTcp(Arc<TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done.map(drop)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}
