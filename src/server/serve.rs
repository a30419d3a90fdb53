//! Serving an accepted connection: HTTP/1.1 or HTTP/2 (by ALPN) over hyper, with the
//! connection's deadlines watched by `activity`, and the service that hands each request to
//! the relay in force.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::activity::{Activity, ActivityIo, Shutdown, TrackedBody};
use super::gather::{Gather, LastAnswer};
use super::{Kind, Live, Shared};
use crate::config::Limits;
use crate::relay::{ConnInfo, Reply};
use crate::tls;

/// The serving half of an HTTPS connection, as a box of its own (see `connection` in
/// `server.rs`).
pub(super) fn serve_tls<'a>(
    hs: tls::Handshake<Gather>,
    remote: SocketAddr,
    kind: Kind,
    shared: &Arc<Shared>,
    live: &Live,
    limits: &'a Limits,
    shutdown: &'a Arc<Shutdown>,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    let tls::Handshake { mut stream, site, server_name: sni, h2 } = hs;
    stream.get_mut().0.handshake_done();
    let info = ConnInfo::new(remote, true, sni.is_some().then_some(site));
    // HTTP/2 ends a connection with GOAWAY, not with the end of an answer.
    let last = (!h2).then(|| stream.get_ref().0.last_answer());
    let conn = Arc::new(Conn { shared: shared.clone(), info, generation: live.id, sni, kind, last });
    if !h2 {
        return serve_h1(stream, conn, limits, shutdown);
    }
    let activity = Activity::new_h2();
    let io = TokioIo::new(ActivityIo::new(stream, activity.clone()));
    let svc = service(conn, activity.clone());
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes as u32);
    Box::pin(activity.drive(b.serve_connection(io, svc), limits, shutdown))
}

/// A plain-HTTP connection (the port-80 listener, the admin listener), as a box of its own.
pub(super) fn serve_plain<'a>(
    tcp: TcpStream,
    remote: SocketAddr,
    kind: Kind,
    shared: &Arc<Shared>,
    live: &Live,
    limits: &'a Limits,
    shutdown: &'a Arc<Shutdown>,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    let info = ConnInfo::new(remote, false, None);
    let conn = Arc::new(Conn { shared: shared.clone(), info, generation: live.id, sni: None, kind, last: None });
    serve_h1(tcp, conn, limits, shutdown)
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
    /// Where an HTTP/1 TLS connection learns that an answer is its last (see `gather`).
    last: Option<LastAnswer>,
}

impl Conn {
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

fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    // TLS wants one flat write per response; the deadlines live in `activity`, not in hyper.
    b.max_buf_size(limits.max_header_bytes).writev(false).half_close(false);
    b
}

/// An HTTP/1.1 connection (plain, or TLS after the handshake) served in a box of its own (see
/// `connection` in `server.rs`).
fn serve_h1<'a, IO>(
    io: IO,
    conn: Arc<Conn>,
    limits: &'a Limits,
    shutdown: &'a Arc<Shutdown>,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let io = TokioIo::new(ActivityIo::new(io, activity.clone()));
    let svc = service(conn, activity.clone());
    Box::pin(activity.drive(http1_builder(limits).serve_connection(io, svc), limits, shutdown))
}

/// Whether hyper closes an HTTP/1 connection after answering `req` (RFC 9112 section 9.3).
fn ends_connection<B>(req: &http::Request<B>) -> bool {
    let mut tokens = crate::relay::connection_tokens(req.headers());
    match req.version() {
        http::Version::HTTP_11 => tokens.any(|t| t.eq_ignore_ascii_case("close")),
        http::Version::HTTP_10 => !tokens.any(|t| t.eq_ignore_ascii_case("keep-alive")),
        _ => false,
    }
}

/// The per-connection service: marks the connection busy for as long as a response is in
/// flight, then hands the request to the relay in force (one `ArcSwap` load per request).
fn service(
    conn: Arc<Conn>,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<TrackedBody>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<http::Response<TrackedBody>, std::convert::Infallible>> + Send,
> + Clone {
    service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let guard = activity.begin();
        // Only a connection's first answer may be held for close_notify (see `gather`).
        let last = conn.last.as_ref().filter(|l| l.is_first()).map(|l| (l, ends_connection(&req)));
        let live = conn.shared.current();
        let info = conn.info_for(&live);
        // Answered here, in hyper's call rather than in the future it polls later (see
        // `Relay::handle`): a redirect never keeps the request past this call.
        let reply = match conn.kind {
            Kind::Admin if req.uri().path() == "/reload" => {
                let (method, shared) = (req.method().clone(), conn.shared.clone());
                Reply::Later(Box::pin(async move { crate::reload::admin_endpoint(&method, &shared.reload).await }))
            }
            Kind::Admin => Reply::ready(live.relay.handle_admin(req, &info)),
            _ => live.relay.handle(req, &info),
        };
        if let Some((last, ends)) = last {
            last.decide(ends && matches!(reply, Reply::Ready(_)));
        }
        reply.map(|resp| Ok(resp.map(|body| TrackedBody::new(body, guard))))
    })
}
