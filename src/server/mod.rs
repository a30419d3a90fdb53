//! Listeners and connections: accept loops that never die on an accept error, a cap on
//! concurrent connections, the PROXY protocol header behind a load balancer, the TLS handshake
//! deadline, HTTP/1.1 or HTTP/2 by ALPN, idle and header-read deadlines per connection, and a
//! bounded drain on shutdown.

mod budget;
mod deadline;
mod linger;
mod proxy_header;
mod serve;
mod trim;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use budget::{Budget, Handshaking};
use deadline::Drain;
use serve::{serve_plain, serve_tls};

use crate::app::Live;
use crate::config::Config;
use crate::reload::ReloadHandle;
use crate::tls;

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

impl Listeners {
    /// One line per listener (and the outbound proxy), once the relay serves.
    pub fn log(&self, config: &Config) {
        let addr = |l: &TcpListener| l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
        for l in &self.https {
            tracing::info!(addr = %addr(l), "serving HTTPS");
        }
        for l in &self.http {
            tracing::info!(addr = %addr(l), "serving plain HTTP (redirects to HTTPS)");
        }
        if let Some(l) = &self.admin {
            tracing::info!(addr = %addr(l), "serving admin (health)");
        }
        if !config.outbound.is_direct() {
            tracing::info!(proxy = %config.outbound.summary(), "outbound connections go through a proxy");
        }
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
    /// The configuration in force: loaded once per connection (handshake, deadlines) and once
    /// per request (routes), never locked.
    live: ArcSwap<Live>,
    /// Connection slots, per client address and in all (`limits.max_connections`, resized on
    /// reload).
    budget: Arc<Budget>,
    /// Where `POST /reload` on the admin listener sends its request.
    reload: ReloadHandle,
}

impl Shared {
    pub fn new(live: Live, reload: ReloadHandle) -> Shared {
        let budget = Arc::new(Budget::new(live.limits().max_connections));
        Shared { live: ArcSwap::from_pointee(live), budget, reload }
    }

    /// The configuration in force.
    pub fn current(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Puts `live` in force for the next connection and the next request.
    pub fn replace(&self, live: Live) {
        self.budget.resize(live.limits().max_connections);
        self.live.store(Arc::new(live));
    }
}

/// Which kind of listener a connection came in on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Https,
    Http,
    Admin,
}

impl Kind {
    /// The `listener` label of the open-connections gauge.
    fn metrics_label(self) -> crate::metrics::Listener {
        match self {
            Kind::Https => crate::metrics::Listener::Https,
            Kind::Http => crate::metrics::Listener::Http,
            Kind::Admin => crate::metrics::Listener::Admin,
        }
    }
}

/// Serves every listener until `stop` is cancelled, then drains for at most the configured
/// grace period.
pub async fn serve(shared: Arc<Shared>, listeners: Listeners, stop: CancellationToken) {
    let drain = Drain::default();
    let tracker = TaskTracker::new();
    let mut loops = tokio::task::JoinSet::new();
    let all = listeners
        .https
        .into_iter()
        .map(|l| (l, Kind::Https))
        .chain(listeners.http.into_iter().map(|l| (l, Kind::Http)))
        .chain(listeners.admin.into_iter().map(|l| (l, Kind::Admin)));
    for (listener, kind) in all {
        let (shared, drain, tracker) = (shared.clone(), drain.clone(), tracker.clone());
        loops.spawn(accept_loop(listener, kind, shared, drain, tracker, stop.clone()));
    }
    let trimmer = tokio::spawn(trim::after_bursts(tracker.clone(), stop.clone()));
    // The loops return once `stop` fires; then in-flight requests get the grace period.
    while loops.join_next().await.is_some() {}
    let _ = trimmer.await;
    shared.budget.permits.close();
    shared.budget.admin.close();
    tracker.close();
    let grace = shared.current().limits().shutdown_grace;
    tracing::info!(connections = tracker.len(), "stopped accepting; draining for at most {grace:?}");
    drain.graceful.cancel();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(connections = tracker.len(), "grace period over; closing the remaining connections");
        // Dropping a connection closes its socket, even mid-request.
        drain.force.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    shared: Arc<Shared>,
    drain: Drain,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let inherits_nodelay = nodelay_for_accepted(&listener);
    loop {
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
        // Taken once a client is there, so a shortage makes room only for someone who waits;
        // meanwhile this loop accepts nobody else.
        let permit = match kind {
            Kind::Admin => tokio::select! {
                _ = stop.cancelled() => return,
                p = shared.budget.admin.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            },
            _ => match slot(&shared.budget, &stop).await {
                Some(p) => p,
                None => return,
            },
        };
        if !inherits_nodelay {
            let _ = tcp.set_nodelay(true);
        }
        let (shared, drain) = (shared.clone(), drain.clone());
        tracker.spawn(async move {
            let _open = crate::metrics::global().connection_opened(kind.metrics_label());
            connection(tcp, remote, kind, &shared, &drain).await;
            drop(permit);
        });
    }
}

/// A connection slot; `None` once the relay stops. When every slot is taken, the connections
/// that serve nobody are asked to make room, again every [`RECLAIM_EVERY`] while none comes
/// free (connections busy a moment ago may be idle by then).
async fn slot(budget: &Budget, stop: &CancellationToken) -> Option<tokio::sync::OwnedSemaphorePermit> {
    loop {
        match budget.permits.clone().try_acquire_owned() {
            Ok(permit) => return Some(permit),
            Err(tokio::sync::TryAcquireError::Closed) => return None,
            Err(tokio::sync::TryAcquireError::NoPermits) => {}
        }
        let asked = budget.reclaim();
        tracing::debug!(asked, "connection slots exhausted; closing idle and stalled connections");
        tokio::select! {
            _ = stop.cancelled() => return None,
            p = budget.permits.clone().acquire_owned() => return p.ok(),
            _ = tokio::time::sleep(RECLAIM_EVERY) => {}
        }
    }
}

/// How often a shortage of connection slots looks for connections to close again.
const RECLAIM_EVERY: Duration = Duration::from_millis(250);

/// Sets `TCP_NODELAY` on the listener and says whether the connections it accepts inherit it,
/// as they do on Linux: one system call per listener instead of one per connection. (Answers
/// are whole writes; Nagle's algorithm would only hold the last packet of one back.)
fn nodelay_for_accepted(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux") && socket2::SockRef::from(listener).set_tcp_nodelay(true).is_ok()
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

async fn connection(mut tcp: TcpStream, mut remote: SocketAddr, kind: Kind, shared: &Arc<Shared>, drain: &Drain) {
    // The configuration at accept time sets this connection's handshake and deadlines.
    let live = shared.current();
    let limits = live.limits().clone();
    // Until its first request can be read, a connection is listed for a shortage of slots to
    // reclaim (see `budget`); the admin listener's never are.
    let handshaking = Handshaking::new();
    let listed = (kind != Kind::Admin).then(|| shared.budget.register(&handshaking));
    let balancers = &live.config().server.proxy_protocol_from;
    if !balancers.is_empty() && kind != Kind::Admin {
        // Boxed: only connections behind a balancer carry this wait in their task.
        let header = Box::pin(behind_balancer(&mut tcp, remote, balancers, limits.handshake_timeout));
        match unless_reclaimed(&handshaking, header).await {
            Some(Some(client)) => remote = client,
            _ => return,
        }
    }
    let _counted = match kind {
        Kind::Admin => None,
        _ => match shared.budget.admit(remote.ip(), limits.max_connections_per_ip) {
            Some(slot) => Some(slot),
            None => {
                refused(remote, &limits, live.config(), &shared.budget);
                return;
            }
        },
    };
    if kind != Kind::Https {
        drop(listed);
        let serving = serve_plain(tcp, remote, kind, shared, &live, &limits, drain);
        // Each request loads the configuration in force; the connection pins none.
        drop(live);
        return serving.await;
    }
    // The handshake and the serving are boxed: a connection task's future lives as long as the
    // connection and is sized for the largest of its states, while a box holds only the one in
    // use. (Whatever an async fn holds across an await keeps room in its future, so the
    // handshake's output is handed on at once.)
    let handshake = Box::pin(tls::accept(tcp, &live.store, &live.tls, limits.handshake_timeout));
    let Some(handshake) = unless_reclaimed(&handshaking, handshake).await else { return };
    drop(listed);
    let hs = match handshake {
        Ok(hs) => hs,
        Err(tls::HandshakeError::AcmeChallenge) => return,
        Err(e) => {
            tracing::debug!(%remote, reason = e.reason(), error = %e, "TLS handshake failed");
            crate::metrics::global().handshake_failed(e.reason());
            return;
        }
    };
    crate::metrics::global().handshake_ok();
    let serving = serve_tls(hs, remote, kind, shared, &live, &limits, drain);
    drop(live);
    serving.await;
}

/// `step`'s outcome, or `None` (counted) when a shortage of slots reclaimed the connection first.
async fn unless_reclaimed<T>(handshaking: &Handshaking, step: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        biased;
        done = step => Some(done),
        _ = handshaking.reclaimed() => {
            tracing::debug!("connection closed before its handshake ended: the relay is short of connection slots");
            crate::metrics::global().connection_closed("overload");
            None
        }
    }
}

/// Logs and counts a connection closed for its address's cap. The first one is a warning, and
/// says more when the address looks like a load balancer's (private or loopback while no
/// PROXY protocol names the clients behind it): then the cap throttles every client at once.
fn refused(remote: SocketAddr, limits: &crate::config::Limits, config: &Config, budget: &Budget) {
    crate::metrics::global().connection_closed("per_ip_limit");
    let cap = limits.max_connections_per_ip;
    if !budget.first_refusal() {
        tracing::debug!(%remote, cap, "connection closed: its address holds max_connections_per_ip");
        return;
    }
    let ip = remote.ip().to_canonical();
    let private = match ip {
        std::net::IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
        std::net::IpAddr::V6(v6) => v6.is_loopback() || v6.is_unique_local(),
    };
    if private && config.server.proxy_protocol_from.is_empty() {
        tracing::warn!(
            %remote, cap,
            "connection closed: its address holds limits.max_connections_per_ip; if a load balancer or proxy \
             sits in front, every client shares its address: have it send the PROXY protocol \
             (server.proxy_protocol_from) or raise the cap"
        );
    } else {
        tracing::warn!(%remote, cap, "connection closed: its address holds limits.max_connections_per_ip (further ones are logged at debug level)");
    }
}

/// The client's address from the PROXY protocol header `tcp` starts with, read within the
/// handshake deadline; `None` (logged) when the connection is to be closed.
async fn behind_balancer(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    from: &[ipnet::IpNet],
    within: Duration,
) -> Option<SocketAddr> {
    let read = tokio::time::timeout(within, proxy_header::read(tcp, peer, from));
    let e = match read.await.unwrap_or(Err(proxy_header::ProxyHeaderError::Timeout)) {
        Ok(client) => return Some(client),
        Err(e) => e,
    };
    if e.is_misconfiguration() {
        tracing::warn!(%peer, error = %e, "closed a connection from a load balancer");
    } else {
        tracing::debug!(%peer, error = %e, "closed a connection");
    }
    crate::metrics::global().proxy_header_failed(e.reason());
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let inherited = nodelay_for_accepted(&listener);
        assert_eq!(inherited, cfg!(target_os = "linux"));
        let _client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert_eq!(accepted.nodelay().expect("TCP_NODELAY"), inherited);
    }
}
