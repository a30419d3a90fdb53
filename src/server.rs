//! Listeners and connections: accept loops that never die on an accept error, a cap on
//! concurrent connections, the TLS handshake deadline, HTTP/1.1 or HTTP/2 by ALPN, idle and
//! header-read deadlines per connection, and a bounded drain on shutdown.

mod activity;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use activity::{Activity, ActivityIo, TrackedBody};

use crate::config::{Config, Limits};
use crate::relay::{ConnInfo, Relay};
use crate::tls::{self, CertStore};

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}{hint}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub what: &'static str,
    #[source]
    pub source: io::Error,
    hint: &'static str,
}

/// The sockets the relay serves, bound by the caller (tests bind port 0).
pub struct Listeners {
    pub https: Vec<TcpListener>,
    pub http: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds every address of the configuration.
    pub async fn bind(config: &Config) -> Result<Listeners, BindError> {
        let s = &config.server;
        let mut https = Vec::new();
        for a in &s.https {
            https.push(bind(*a, "https").await?);
        }
        let mut http = Vec::new();
        for a in &s.http {
            http.push(bind(*a, "http").await?);
        }
        let admin = match s.admin {
            Some(a) => Some(bind(a, "admin").await?),
            None => None,
        };
        Ok(Listeners { https, http, admin })
    }
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| {
        let hint = if source.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        } else {
            ""
        };
        BindError { addr, what, source, hint }
    })
}

/// What every connection task shares.
pub struct Shared {
    pub relay: Arc<Relay>,
    pub store: Arc<CertStore>,
    pub tls: Arc<ServerConfig>,
    pub limits: Limits,
}

/// Which kind of listener a connection came in on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Https,
    Http,
    Admin,
}

/// Serves every listener until `stop` is cancelled, then drains for at most the configured
/// grace period.
pub async fn serve(shared: Arc<Shared>, listeners: Listeners, stop: CancellationToken) {
    let graceful = Arc::new(GracefulShutdown::new());
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
    // Fired when the grace period is over: every connection still open is dropped (closed).
    let force = CancellationToken::new();
    let mut loops = tokio::task::JoinSet::new();
    let all = listeners
        .https
        .into_iter()
        .map(|l| (l, Kind::Https))
        .chain(listeners.http.into_iter().map(|l| (l, Kind::Http)))
        .chain(listeners.admin.into_iter().map(|l| (l, Kind::Admin)));
    for (listener, kind) in all {
        let (shared, permits, graceful) = (shared.clone(), permits.clone(), graceful.clone());
        let (stop, force) = (stop.clone(), force.clone());
        loops.spawn(accept_loop(listener, kind, shared, permits, graceful, stop, force));
    }
    // The loops return once `stop` fires; then in-flight requests get the grace period.
    while loops.join_next().await.is_some() {}
    let grace = shared.limits.shutdown_grace;
    if let Ok(graceful) = Arc::try_unwrap(graceful) {
        tracing::info!(connections = graceful.count(), "stopped accepting; draining for at most {grace:?}");
        if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
            tracing::warn!("grace period over; closing the remaining connections");
        }
    }
    force.cancel();
}

async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    graceful: Arc<GracefulShutdown>,
    stop: CancellationToken,
    force: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (tcp, remote) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (shared, watcher, force) = (shared.clone(), graceful.watcher(), force.clone());
        tokio::spawn(async move {
            // Dropping the connection future closes its socket, even mid-request.
            tokio::select! {
                _ = connection(tcp, remote, kind, &shared, watcher) => {}
                _ = force.cancelled() => {}
            }
            drop(permit);
        });
    }
}

/// An accept error ends one connection, never the loop; running out of descriptors backs off.
async fn accept_error(e: io::Error) {
    // EMFILE (24) and ENFILE (23): the process or the system is out of descriptors.
    let exhausted = matches!(e.raw_os_error(), Some(24 | 23));
    if exhausted {
        tracing::warn!(error = %e, "out of file descriptors; pausing accept for 100 ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        tracing::debug!(error = %e, "accept failed");
    }
}

async fn connection(tcp: TcpStream, remote: SocketAddr, kind: Kind, shared: &Arc<Shared>, watcher: Watcher) {
    let limits = &shared.limits;
    if kind != Kind::Https {
        let info = ConnInfo { remote, https: false, sni_site: None };
        return serve_http(tcp, info, kind == Kind::Admin, shared, watcher).await;
    }
    let hs = match tls::accept(tcp, &shared.store, &shared.tls, limits.handshake_timeout).await {
        Ok(hs) => hs,
        Err(e) => {
            tracing::debug!(%remote, reason = e.reason(), error = %e, "TLS handshake failed");
            return;
        }
    };
    let info = ConnInfo { remote, https: true, sni_site: hs.sni.then_some(hs.site) };
    let activity = if hs.h2 { Activity::new_h2() } else { Activity::new() };
    let io = TokioIo::new(ActivityIo::new(hs.stream, activity.clone()));
    let svc = service(shared.relay.clone(), info, activity.clone(), false);
    if hs.h2 {
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes as u32);
        activity.drive(watcher.watch(b.serve_connection(io, svc)), limits).await;
    } else {
        activity.drive(watcher.watch(http1_builder(limits).serve_connection(io, svc)), limits).await;
    }
}

fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    // TLS wants one flat write per response; the deadlines live in `activity`, not in hyper.
    b.max_buf_size(limits.max_header_bytes).writev(false).half_close(false);
    b
}

async fn serve_http(tcp: TcpStream, info: ConnInfo, admin: bool, shared: &Arc<Shared>, watcher: Watcher) {
    let activity = Activity::new();
    let io = TokioIo::new(ActivityIo::new(tcp, activity.clone()));
    let svc = service(shared.relay.clone(), info, activity.clone(), admin);
    let conn = http1_builder(&shared.limits).serve_connection(io, svc);
    activity.drive(watcher.watch(conn), &shared.limits).await;
}

/// The per-connection service: marks the connection busy for as long as a response is in
/// flight, then hands the request to the relay.
fn service(
    relay: Arc<Relay>,
    info: ConnInfo,
    activity: Arc<Activity>,
    admin: bool,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<TrackedBody>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<http::Response<TrackedBody>, std::convert::Infallible>> + Send,
> + Clone {
    service_fn(move |req| {
        let guard = activity.begin();
        let relay = relay.clone();
        async move {
            let resp = if admin { relay.handle_admin(req, &info) } else { relay.handle(req, &info).await };
            Ok(resp.map(|body| TrackedBody::new(body, guard)))
        }
    })
}
