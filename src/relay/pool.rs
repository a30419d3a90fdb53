//! The idle list of upstream connections, per origin. An HTTP/1.1 connection is a sequence of
//! request, answer, request, answer: a byte the upstream sends that no request asked for would
//! be read as the answer to the next caller's request, handing one user's token to another. So
//! a connection goes back to the list only once its answer ended cleanly, and leaves it only
//! after hyper's connection task has gone idle without unread bytes (`ready()`) and the socket
//! itself holds none (the [`Probe`]). What no HTTP/1.1 client can tell apart remains: a second
//! answer still on its way when the next request has been written reads as that request's
//! answer (HTTP/2 has stream ids). Everything else about a connection (its protocol, its
//! keep-alive) is hyper's `client::conn`; an HTTP/2 connection is shared by all requests.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use tokio::net::TcpStream;

/// A request body as the relay sends it upstream: read whole before it is sent.
pub(super) type ReqBody = Full<Bytes>;

/// How long a connection may wait unused before it is closed: below the 60 s and more that
/// servers commonly keep an idle connection open (nginx 75 s), so the relay closes first.
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// How often expired connections are looked for while nothing else touches the list.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// Idle HTTP/1.1 connections kept per origin. Enough for a burst of concurrent token
/// exchanges (the benchmark drives 64); more are closed after their answer.
const MAX_IDLE_PER_ORIGIN: usize = 128;

/// Where a connection goes: the scheme and authority of an upstream URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Origin {
    pub scheme: Scheme,
    pub authority: Authority,
}

/// A weak handle on a connection's socket, to ask the kernel whether bytes arrived on it while
/// it was idle. Weak, so that a connection hyper has closed is not kept open by the list.
#[derive(Clone, Debug)]
pub(super) struct Probe(Weak<TcpStream>);

impl Probe {
    pub fn new(tcp: &Arc<TcpStream>) -> Probe {
        Probe(Arc::downgrade(tcp))
    }

    /// True when the socket is open and nothing is waiting to be read on it. Asks the kernel
    /// (a non-blocking `MSG_PEEK`), not tokio's readiness, which learns of new bytes only when
    /// the runtime next polls for events.
    fn is_quiet(&self) -> bool {
        let Some(tcp) = self.0.upgrade() else { return false };
        let mut byte = [MaybeUninit::uninit()];
        match socket2::SockRef::from(&*tcp).peek(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Ok(0) => false,
            // An answer nobody asked for, or a TLS close the connection task has not read yet.
            Ok(_) => {
                tracing::debug!("bytes arrived on an idle upstream connection; it is closed");
                false
            }
            Err(_) => false,
        }
    }
}

/// A connection ready for one request.
pub(super) enum Conn {
    Http1 { sender: http1::SendRequest<ReqBody>, probe: Probe },
    Http2(http2::SendRequest<ReqBody>),
}

/// The idle lists of one upstream client. Cheap to clone (one `Arc`).
#[derive(Clone, Default)]
pub(super) struct Pool {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    lists: Mutex<Vec<List>>,
    /// Whether the task that closes expired connections runs.
    reaping: AtomicBool,
}

/// One origin's connections (a site has one to three origins, so a short vector is the map).
struct List {
    origin: Origin,
    http1: Vec<Idle>,
    http2: Option<(http2::SendRequest<ReqBody>, Instant)>,
}

struct Idle {
    sender: http1::SendRequest<ReqBody>,
    probe: Probe,
    since: Instant,
}

impl List {
    /// Drops what expired or closed.
    fn prune(&mut self, now: Instant) {
        self.http1.retain(|i| now.duration_since(i.since) < IDLE_TIMEOUT && !i.sender.is_closed());
        if self.http2.as_ref().is_some_and(|(s, used)| now.duration_since(*used) >= IDLE_TIMEOUT || s.is_closed()) {
            self.http2 = None;
        }
    }
}

impl Pool {
    /// A connection to `origin` that can take a request now, if one is kept: the shared
    /// HTTP/2 connection, else the most recently used idle HTTP/1.1 connection whose task turns
    /// ready within `wait` and whose socket holds no unread bytes.
    pub async fn checkout(&self, origin: &Origin, wait: Duration) -> Option<Conn> {
        if let Some(h2) = self.shared(origin) {
            return Some(Conn::Http2(h2));
        }
        // Bounded: each turn takes one connection off a list that never grows past its limit.
        while let Some(mut idle) = self.pop(origin) {
            // `ready()` resolves once hyper's task has finished the last answer and found its
            // read buffer empty; it fails if unexpected bytes closed the connection meanwhile.
            if !matches!(tokio::time::timeout(wait, idle.sender.ready()).await, Ok(Ok(()))) {
                continue;
            }
            if idle.probe.is_quiet() {
                return Some(Conn::Http1 { sender: idle.sender, probe: idle.probe });
            }
        }
        None
    }

    /// Keeps an HTTP/1.1 connection whose answer ended cleanly.
    pub fn checkin(&self, origin: &Origin, sender: http1::SendRequest<ReqBody>, probe: Probe) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        self.with_list(origin, |list| {
            if list.http1.len() < MAX_IDLE_PER_ORIGIN {
                list.http1.push(Idle { sender, probe, since: now });
            }
        });
        self.reap_in_background();
    }

    /// Shares a new HTTP/2 connection, unless a live one is shared already.
    pub fn share(&self, origin: &Origin, sender: &http2::SendRequest<ReqBody>) {
        let now = Instant::now();
        self.with_list(origin, |list| {
            list.prune(now);
            list.http2.get_or_insert_with(|| (sender.clone(), now));
        });
        self.reap_in_background();
    }

    fn shared(&self, origin: &Origin) -> Option<http2::SendRequest<ReqBody>> {
        let mut lists = self.inner.lists.lock().unwrap_or_else(|p| p.into_inner());
        let list = lists.iter_mut().find(|l| l.origin == *origin)?;
        let (sender, used) = list.http2.as_mut()?;
        if sender.is_closed() {
            list.http2 = None;
            return None;
        }
        *used = Instant::now();
        Some(sender.clone())
    }

    fn pop(&self, origin: &Origin) -> Option<Idle> {
        let now = Instant::now();
        let mut lists = self.inner.lists.lock().unwrap_or_else(|p| p.into_inner());
        let list = lists.iter_mut().find(|l| l.origin == *origin)?;
        while let Some(idle) = list.http1.pop() {
            if now.duration_since(idle.since) < IDLE_TIMEOUT && !idle.sender.is_closed() {
                return Some(idle);
            }
        }
        None
    }

    fn with_list(&self, origin: &Origin, f: impl FnOnce(&mut List)) {
        let mut lists = self.inner.lists.lock().unwrap_or_else(|p| p.into_inner());
        match lists.iter_mut().find(|l| l.origin == *origin) {
            Some(list) => f(list),
            None => {
                let mut list = List { origin: origin.clone(), http1: Vec::new(), http2: None };
                f(&mut list);
                lists.push(list);
            }
        }
    }

    /// Starts, once, the task that closes connections idle for longer than [`IDLE_TIMEOUT`].
    /// It holds the lists weakly and ends with them (a reload drops the old client).
    fn reap_in_background(&self) {
        if self.inner.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REAP_EVERY).await;
                let Some(inner) = inner.upgrade() else { break };
                let now = Instant::now();
                let mut lists = inner.lists.lock().unwrap_or_else(|p| p.into_inner());
                lists.iter_mut().for_each(|l| l.prune(now));
            }
        });
    }
}

/// An upstream answer's body that hands its HTTP/1.1 connection back to the pool when it ends
/// cleanly. It checks `is_end_stream()` after each frame: hyper's server stops polling a body
/// there, so waiting for the final `None` would lose every connection. A body that fails or is
/// dropped before its end takes its connection with it, closed.
pub struct UpstreamBody {
    body: Incoming,
    reuse: Option<Reuse>,
}

/// What it takes to put a connection back.
pub(super) struct Reuse {
    pub pool: Pool,
    pub origin: Origin,
    pub sender: http1::SendRequest<ReqBody>,
    pub probe: Probe,
}

impl UpstreamBody {
    /// `body`, handing `reuse`'s connection back at its end (at once when it is empty).
    pub(super) fn new(body: Incoming, reuse: Option<Reuse>) -> UpstreamBody {
        let mut body = UpstreamBody { body, reuse };
        if body.body.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some(r) = self.reuse.take() {
            r.pool.checkin(&r.origin, r.sender, r.probe);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            Some(Ok(_)) if this.body.is_end_stream() => this.release(),
            Some(Ok(_)) => {}
            None => this.release(),
            Some(Err(_)) => this.reuse = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use hyper_util::client::legacy::connect::HttpConnector;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::super::connect::Connector;
    use super::*;

    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    /// A pool, an HTTP/1.1 connection to a raw loopback server, and that server's end.
    async fn connected() -> (Pool, Origin, Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: http::Uri = format!("http://{}/", listener.local_addr().unwrap()).parse().unwrap();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let tls = crate::egress::upstream_tls(None, &[]).unwrap();
        let connector = Connector {
            egress: crate::egress::Egress::direct().connector(http, Duration::from_secs(5)),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            http1: Connector::http1(16 * 1024),
            http2: Connector::http2(16 * 1024),
        };
        let (conn, accepted) = tokio::join!(connector.connect(&uri), listener.accept());
        let origin = Origin { scheme: Scheme::HTTP, authority: uri.authority().unwrap().clone() };
        (Pool::default(), origin, conn.unwrap(), accepted.unwrap().0)
    }

    /// One exchange on `conn`: the server reads the request and answers [`ANSWER`]; the body is
    /// read to its end, which hands the connection back to `pool`.
    async fn exchange(pool: &Pool, origin: &Origin, conn: Conn, server: &mut TcpStream) {
        let Conn::Http1 { mut sender, probe } = conn else { panic!("HTTP/1.1 expected") };
        let req = http::Request::get("/").header("host", "x").body(ReqBody::default()).unwrap();
        let (resp, _) = tokio::join!(sender.send_request(req), async {
            let mut buf = [0u8; 1024];
            let n = server.read(&mut buf).await.unwrap();
            assert!(buf[..n].ends_with(b"\r\n\r\n"), "one request head");
            server.write_all(ANSWER).await.unwrap();
        });
        let reuse = Reuse { pool: pool.clone(), origin: origin.clone(), sender, probe };
        let body = UpstreamBody::new(resp.unwrap().into_body(), Some(reuse));
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"ok");
    }

    #[tokio::test]
    async fn a_connection_whose_answer_ended_is_used_again() {
        let (pool, origin, conn, mut server) = connected().await;
        exchange(&pool, &origin, conn, &mut server).await;
        let again = pool.checkout(&origin, Duration::from_secs(1)).await.expect("the connection is kept");
        exchange(&pool, &origin, again, &mut server).await;
        assert!(pool.checkout(&origin, Duration::from_secs(1)).await.is_some());
    }

    #[tokio::test]
    async fn bytes_on_an_idle_connection_keep_it_from_every_caller() {
        let (pool, origin, conn, mut server) = connected().await;
        exchange(&pool, &origin, conn, &mut server).await;
        // Let hyper's task go idle, then send an answer nobody asked for. On this one-thread
        // runtime nothing runs between the write and the checkout, so hyper's task has not
        // seen the bytes: the socket probe must.
        tokio::time::sleep(Duration::from_millis(20)).await;
        server.write_all(ANSWER).await.unwrap();
        assert!(pool.checkout(&origin, Duration::from_secs(1)).await.is_none());
        // The connection was closed, not merely passed over.
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (pool, origin, conn, mut server) = connected().await;
        let Conn::Http1 { mut sender, probe } = conn else { panic!("HTTP/1.1 expected") };
        let req = http::Request::get("/").header("host", "x").body(ReqBody::default()).unwrap();
        let (resp, _) = tokio::join!(sender.send_request(req), async {
            let mut buf = [0u8; 1024];
            let _ = server.read(&mut buf).await.unwrap();
            server.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf").await.unwrap();
        });
        let reuse = Reuse { pool: pool.clone(), origin: origin.clone(), sender, probe };
        drop(UpstreamBody::new(resp.unwrap().into_body(), Some(reuse)));
        assert!(pool.checkout(&origin, Duration::from_secs(1)).await.is_none());
    }
}
