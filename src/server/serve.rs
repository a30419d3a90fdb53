//! Serving an accepted connection: HTTP/1.1 or HTTP/2 (by ALPN) over hyper, under the
//! connection's deadlines, with the service that hands each request to the configuration in
//! force: the admin surface on the admin listener, the relay's routes everywhere else.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::budget::Registered;
use super::deadline::{self, Drain, TrackedBody, Watch, WatchedIo};
use super::{Kind, Shared};
use crate::app::Live;
use crate::config::Limits;
use crate::relay::ConnInfo;
use crate::response::{Reply, plain};
use crate::tls;

/// A connection's serving future, boxed (see `connection` in `server/mod.rs`).
type Serving<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The serving half of an HTTPS connection.
pub(super) fn serve_tls<'a>(
    hs: tls::Handshake,
    remote: SocketAddr,
    kind: Kind,
    shared: &Arc<Shared>,
    live: &Live,
    limits: &Limits,
    drain: &'a Drain,
) -> Serving<'a> {
    let tls::Handshake { stream, site, server_name: sni, h2 } = hs;
    let info = ConnInfo::new(remote, true, sni.is_some().then_some(site));
    let conn = Conn { shared: shared.clone(), info, generation: live.id, sni, kind, listed: None };
    if !h2 {
        return serve_h1(stream, conn, limits, drain);
    }
    let watch = Watch::http2(limits);
    let conn = conn.register(&watch);
    let io = TokioIo::new(WatchedIo::new(stream, watch.clone()));
    let svc = service(conn, watch.clone());
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new()).max_header_list_size(h2_header_list_bound(limits.max_header_bytes));
    Box::pin(deadline::drive(Box::pin(b.serve_connection(io, svc)), watch, drain))
}

/// A plain-HTTP connection (the port-80 listener, the admin listener).
pub(super) fn serve_plain<'a>(
    tcp: TcpStream,
    remote: SocketAddr,
    kind: Kind,
    shared: &Arc<Shared>,
    live: &Live,
    limits: &Limits,
    drain: &'a Drain,
) -> Serving<'a> {
    let info = ConnInfo::new(remote, false, None);
    let conn = Conn { shared: shared.clone(), info, generation: live.id, sni: None, kind, listed: None };
    serve_h1(tcp, conn, limits, drain)
}

/// What a request needs to know about its connection (one `Arc` per connection, so a request
/// costs one reference count for it).
struct Conn {
    shared: Arc<Shared>,
    /// As of configuration `generation`.
    info: ConnInfo,
    generation: u64,
    /// The SNI hostname the client sent, to find its site again after a reload.
    sni: Option<Arc<str>>,
    kind: Kind,
    /// Listed for reclaiming (see `budget`) for as long as the connection is served.
    listed: Option<Registered>,
}

impl Conn {
    /// The connection as its service holds it, listed for reclaiming when the relay runs
    /// short of slots (the admin listener's are not).
    fn register(mut self, watch: &Arc<Watch>) -> Arc<Conn> {
        if self.kind != Kind::Admin {
            self.listed = Some(self.shared.budget.register(watch));
        }
        Arc::new(self)
    }

    /// The connection facts in terms of `live`: after a reload, the SNI site is looked up again
    /// (sites may have moved or gone; a name no longer served matches no site, so its requests
    /// get 421 like any foreign Host).
    fn info_for(&self, live: &Live) -> Cow<'_, ConnInfo> {
        if live.id == self.generation || self.info.sni_site.is_none() {
            return Cow::Borrowed(&self.info);
        }
        let site = self.sni.as_deref().and_then(|n| live.store.lookup(Some(n))).map_or(usize::MAX, |s| s.site);
        Cow::Owned(ConnInfo { sni_site: Some(site), ..self.info.clone() })
    }
}

/// An HTTP/1.1 connection (plain, or TLS after the handshake).
fn serve_h1<'a, IO>(io: IO, conn: Conn, limits: &Limits, drain: &'a Drain) -> Serving<'a>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let watch = Watch::http1(limits);
    let conn = conn.register(&watch);
    let io = TokioIo::new(WatchedIo::new(io, watch.clone()));
    let svc = service(conn, watch.clone());
    let mut b = http1::Builder::new();
    // One flat write per response (a TLS record, not a record per slice); the deadlines are
    // `deadline`'s, not hyper's.
    b.max_buf_size(limits.max_header_bytes).writev(false).half_close(false);
    Box::pin(deadline::drive(Box::pin(b.serve_connection(io, svc)), watch, drain))
}

/// The header list HTTP/2 itself refuses (with a 431 and a reset stream that clients retry):
/// four times `max_header_bytes` and at least 64 KiB, so that a list over `max_header_bytes`
/// gets the relay's own 431 answer instead ([`header_list_size`]).
fn h2_header_list_bound(max_header_bytes: usize) -> u32 {
    u32::try_from(max_header_bytes.saturating_mul(4).max(64 * 1024)).unwrap_or(u32::MAX)
}

/// A request's header list size as HTTP/2 counts it (RFC 9113 section 6.5.2): each field's
/// name and value plus 32, the pseudo-header fields included.
fn header_list_size<B>(req: &http::Request<B>) -> usize {
    let field = |name: usize, value: usize| name + value + 32;
    let uri = req.uri();
    let pseudo = field(7, req.method().as_str().len())
        + field(7, uri.scheme_str().map_or(0, str::len))
        + field(10, uri.authority().map_or(0, |a| a.as_str().len()))
        + field(5, uri.path_and_query().map_or(0, |p| p.as_str().len()));
    pseudo + req.headers().iter().map(|(n, v)| field(n.as_str().len(), v.len())).sum::<usize>()
}

/// The per-connection service: keeps a request in flight until its response body is done, and
/// hands it to the configuration in force (one `ArcSwap` load per request).
fn service(
    conn: Arc<Conn>,
    watch: Arc<Watch>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<TrackedBody>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<http::Response<TrackedBody>, std::convert::Infallible>> + Send,
> + Clone {
    service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let in_flight = watch.begin();
        let live = conn.shared.current();
        // Answered here, in hyper's call rather than in the future it polls later (see
        // `Relay::handle`): a redirect never keeps the request past this call.
        let reply = if req.version() == http::Version::HTTP_2 && header_list_size(&req) > live.limits().max_header_bytes
        {
            Reply::ready(plain(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request header fields too large\n"))
        } else {
            match conn.kind {
                Kind::Admin => crate::admin::handle(req, &live, &conn.shared.reload),
                _ => live.relay.handle(req, &conn.info_for(&live)),
            }
        };
        reply.map(|resp| Ok(TrackedBody::response(resp, in_flight)))
    })
}
