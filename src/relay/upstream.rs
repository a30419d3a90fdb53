//! The client toward the upstream broker: hyper's `client::conn` over TLS with the web PKI roots
//! plus an optional extra CA, HTTP/2 when the upstream offers it by ALPN, a connect timeout, an
//! outbound proxy where one is configured ([`connect`](super::connect)), and an idle list of
//! connections per origin ([`pool`](super::pool)). One per site, since sites may trust different
//! CAs. Each request is sent once; an answer that breaks HTTP is refused rather than forwarded.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio_rustls::TlsConnector;

use super::connect::Connector;
use super::pool::{Conn, Origin, Pool, ReqBody, Reuse, UpstreamBody};
use crate::config::{Limits, Site};
use crate::egress::{BoxError, Egress, TrustError, upstream_tls};

/// Why an upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("{url}: an upstream URL needs a host")]
    Base { url: String },
}

/// Why a request to the upstream brought no answer to forward.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No TCP connection, directly or through the outbound proxy.
    #[error("no connection to the upstream")]
    Connect(#[source] BoxError),
    #[error("TLS handshake with the upstream failed")]
    Tls(#[source] std::io::Error),
    #[error("HTTP handshake with the upstream failed")]
    Handshake(#[source] hyper::Error),
    /// The connection broke, or hyper could not read the answer (a head over the bound, a
    /// status that is not three digits, conflicting lengths).
    #[error("the exchange with the upstream failed")]
    Exchange(#[source] hyper::Error),
    #[error("the upstream's answer breaks HTTP")]
    Invalid(#[source] Invalid),
    #[error("the request has no upstream origin")]
    NoOrigin,
}

impl SendError {
    /// Whether no connection was made (the `connect` error kind, unless TLS or the proxy failed).
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_) | SendError::Tls(_) | SendError::Handshake(_))
    }

    /// Whether the upstream answered something that is not a valid HTTP answer.
    pub fn is_invalid(&self) -> bool {
        match self {
            SendError::Invalid(_) => true,
            SendError::Exchange(e) => e.is_parse(),
            _ => false,
        }
    }
}

/// An answer the relay refuses to forward (nginx answers these with 502 too).
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    /// `101 Switching Protocols`: the relay never asks for an upgrade.
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    Upgrade,
    /// A final status outside 200-599 (1xx answers before the final one are read and dropped).
    #[error("final status {0} is outside 200-599")]
    Status(u16),
    /// Both `Content-Length` and `Transfer-Encoding` (RFC 9112 section 6.3): the framing is
    /// ambiguous, the mark of response splitting, so the answer and its connection are dropped.
    #[error("Content-Length together with Transfer-Encoding")]
    LengthAndEncoding,
}

/// An upstream base URL (`upstream` of a route) taken apart once, so a forwarded request's URI
/// is put together from parts instead of formatted and parsed again on every request.
#[derive(Debug)]
pub struct UpstreamBase {
    /// `scheme://host[:port]`, what upstream `Location`s are recognised by.
    pub origin: String,
    scheme: Scheme,
    authority: Authority,
    /// The base's path without its trailing `/` (usually empty).
    prefix: String,
}

impl UpstreamBase {
    /// Takes `url` apart; `None` if it has no host (config validation refuses those, and
    /// credentials, queries and fragments in it).
    pub fn new(url: &url::Url) -> Option<UpstreamBase> {
        let scheme = Scheme::try_from(url.scheme()).ok()?;
        let host = url.host_str()?;
        let authority = match url.port() {
            Some(port) => Authority::try_from(format!("{host}:{port}")).ok()?,
            None => Authority::try_from(host).ok()?,
        };
        let prefix = url.path().trim_end_matches('/').to_string();
        Some(UpstreamBase { origin: url.origin().ascii_serialization(), scheme, authority, prefix })
    }

    /// The base's path without its trailing `/` (usually empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The upstream URI for a request's path and query: the base's path, then the request's
    /// bytes as received.
    pub fn uri(&self, pq: Option<PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = pq.unwrap_or_else(|| PathAndQuery::from_static("/"));
        let pq = if self.prefix.is_empty() { pq } else { PathAndQuery::try_from(format!("{}{pq}", self.prefix))? };
        Uri::builder().scheme(self.scheme.clone()).authority(self.authority.clone()).path_and_query(pq).build()
    }
}

/// A pooled HTTP(S) client for one site's upstreams.
#[derive(Clone)]
pub struct UpstreamClient {
    connector: Connector,
    pool: Pool,
    pub(super) response_timeout: Duration,
    /// How long a pooled connection may take to turn ready before a new one is made instead.
    connect_timeout: Duration,
    /// Whether an HTTP/1.1 connection goes back to the pool after a clean answer (the site's
    /// `upstream_keepalive`); otherwise it carries one exchange and closes.
    keepalive: bool,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient").field("response_timeout", &self.response_timeout).finish_non_exhaustive()
    }
}

impl UpstreamClient {
    /// Builds the client for `site`: its CA file, connect and response timeouts, reached as
    /// `egress` says (directly or through a proxy), answers' heads bounded by
    /// `limits.max_header_bytes` like requests' heads.
    pub fn new(site: &Site, egress: &Egress, limits: &Limits) -> Result<UpstreamClient, UpstreamError> {
        let tls = upstream_tls(site.upstream_ca_file.as_deref(), &[b"h2", b"http/1.1"])?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(site.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = Connector {
            egress: egress.connector(http, site.connect_timeout),
            tls: TlsConnector::from(Arc::new(tls)),
            http1: Connector::http1(limits.max_header_bytes),
            http2: Connector::http2(limits.max_header_bytes),
        };
        Ok(UpstreamClient {
            connector,
            pool: Pool::default(),
            response_timeout: site.response_timeout,
            connect_timeout: site.connect_timeout,
            keepalive: site.upstream_keepalive,
        })
    }

    /// Sends `req` (its URI absolute, from [`UpstreamBase::uri`]) and returns the answer's head.
    /// The request is written at most once: only a request hyper hands back unsent, from a
    /// pooled connection that closed as it was taken, goes again on a new connection.
    pub(super) async fn send(&self, req: Request<ReqBody>) -> Result<Response<UpstreamBody>, SendError> {
        let uri = req.uri().clone();
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(SendError::NoOrigin);
        };
        let origin = Origin { scheme: scheme.clone(), authority: authority.clone() };
        let (conn, reused) = match self.pool.checkout(&origin, self.connect_timeout).await {
            Some(conn) => (conn, true),
            None => (self.connect(&origin, &uri).await?, false),
        };
        match self.exchange(conn, &origin, &uri, req).await {
            Err(Failed::NotSent(req, _)) if reused => {
                let conn = self.connect(&origin, &uri).await?;
                self.exchange(conn, &origin, &uri, *req).await.map_err(Failed::into_error)
            }
            done => done.map_err(Failed::into_error),
        }
    }

    /// A new connection, shared at once if it speaks HTTP/2. Boxed: making a connection (TCP,
    /// TLS, handshake) is a future of several kilobytes that most requests, served from the
    /// pool, never run, and inline it would be copied with every request's future.
    async fn connect(&self, origin: &Origin, uri: &Uri) -> Result<Conn, SendError> {
        let conn = Box::pin(self.connector.connect(uri)).await?;
        if let Conn::Http2(sender) = &conn {
            self.pool.share(origin, sender);
        }
        Ok(conn)
    }

    /// One request on `conn`, its answer checked; an HTTP/1.1 connection rides along in the
    /// answer's body and returns to the pool when that body ends cleanly.
    async fn exchange(
        &self,
        conn: Conn,
        origin: &Origin,
        uri: &Uri,
        mut req: Request<ReqBody>,
    ) -> Result<Response<UpstreamBody>, Failed> {
        match conn {
            Conn::Http1 { mut sender, probe } => {
                if !req.headers().contains_key(header::HOST) {
                    let host = HeaderValue::from_str(origin.authority.as_str()).map_err(|_| SendError::NoOrigin)?;
                    req.headers_mut().insert(header::HOST, host);
                }
                if !self.keepalive {
                    // Tells the upstream the connection ends with this answer, so it closes
                    // its side too instead of waiting for its own idle timeout.
                    req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                // Origin form: `POST /v1/auth/token/... HTTP/1.1`.
                *req.uri_mut() = uri.path_and_query().cloned().map_or_else(Uri::default, Uri::from);
                let resp = sender.try_send_request(req).await.map_err(Failed::from)?;
                check(&resp)?;
                let reuse =
                    self.keepalive.then(|| Reuse { pool: self.pool.clone(), origin: origin.clone(), sender, probe });
                Ok(resp.map(|body| UpstreamBody::new(body, reuse)))
            }
            Conn::Http2(mut sender) => {
                *req.uri_mut() = uri.clone();
                let resp = sender.try_send_request(req).await.map_err(Failed::from)?;
                check(&resp)?;
                Ok(resp.map(|body| UpstreamBody::new(body, None)))
            }
        }
    }
}

/// How an exchange failed: before the request was written (hyper hands it back), or after.
enum Failed {
    NotSent(Box<Request<ReqBody>>, hyper::Error),
    Error(SendError),
}

impl Failed {
    fn into_error(self) -> SendError {
        match self {
            Failed::NotSent(_, e) => SendError::Exchange(e),
            Failed::Error(e) => e,
        }
    }
}

impl From<hyper::client::conn::TrySendError<Request<ReqBody>>> for Failed {
    fn from(mut e: hyper::client::conn::TrySendError<Request<ReqBody>>) -> Failed {
        match e.take_message() {
            Some(req) => Failed::NotSent(Box::new(req), e.into_error()),
            None => Failed::Error(SendError::Exchange(e.into_error())),
        }
    }
}

impl From<SendError> for Failed {
    fn from(e: SendError) -> Failed {
        Failed::Error(e)
    }
}

impl From<Invalid> for Failed {
    fn from(e: Invalid) -> Failed {
        Failed::Error(SendError::Invalid(e))
    }
}

/// Refuses an answer the relay must not forward (see [`Invalid`]). hyper has already read past
/// any 1xx interim answers (RFC 9110 section 15.2 lets a client drop them; the relay cannot
/// pass them on) and refused a status that is not three digits or a head over the bound.
fn check<B>(resp: &Response<B>) -> Result<(), Invalid> {
    match resp.status().as_u16() {
        101 => return Err(Invalid::Upgrade),
        200..=599 => {}
        other => return Err(Invalid::Status(other)),
    }
    let h = resp.headers();
    if h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::TRANSFER_ENCODING) {
        return Err(Invalid::LengthAndEncoding);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(base: &str, pq: &str) -> String {
        let base = UpstreamBase::new(&url::Url::parse(base).unwrap()).unwrap();
        base.uri(Some(PathAndQuery::try_from(pq).unwrap())).unwrap().to_string()
    }

    #[test]
    fn the_request_bytes_follow_the_base_path() {
        assert_eq!(
            uri("https://api.aurinko.io", "/v1/auth/token/c%2Bd?x=a+b"),
            "https://api.aurinko.io/v1/auth/token/c%2Bd?x=a+b"
        );
        assert_eq!(
            uri("http://127.0.0.1:8080/broker/", "/v1/auth/token/c"),
            "http://127.0.0.1:8080/broker/v1/auth/token/c"
        );
        assert_eq!(uri("http://[::1]:8080/b", "/t?q"), "http://[::1]:8080/b/t?q");
        let base = UpstreamBase::new(&url::Url::parse("https://h:8443/").unwrap()).unwrap();
        assert_eq!(base.origin, "https://h:8443");
    }

    #[test]
    fn answers_that_break_http_are_refused() {
        let resp = |status: u16, headers: &[(&str, &str)]| {
            let mut r = Response::builder().status(status);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.body(()).unwrap()
        };
        assert!(matches!(check(&resp(101, &[])), Err(Invalid::Upgrade)));
        assert!(matches!(check(&resp(600, &[])), Err(Invalid::Status(600))));
        assert!(matches!(check(&resp(199, &[])), Err(Invalid::Status(199))), "1xx is never final");
        let both = [("content-length", "5"), ("transfer-encoding", "chunked")];
        assert!(matches!(check(&resp(200, &both)), Err(Invalid::LengthAndEncoding)));
        assert!(check(&resp(200, &both[..1])).is_ok());
        assert!(check(&resp(599, &both[1..])).is_ok());
    }
}
