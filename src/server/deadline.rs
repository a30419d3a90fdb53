//! A connection's deadlines after its TLS handshake: how long it may stay idle between requests,
//! and how long a request's headers may take once their first byte has arrived (slowloris).
//! While a response is in flight neither applies: the upstream timeouts bound that phase.
//!
//! Three parties share a [`Watch`]: the transport reports bytes read ([`WatchedIo`]), the
//! service marks each request in flight ([`Watch::begin`], held by the response body), and
//! [`drive`] runs the connection with one timer. Requests cost two timestamps and no timer work:
//! the timer is not moved when a request starts or ends; when it fires, it looks at the
//! connection and either acts or sets itself to the deadline that applies now. Only a deadline
//! that comes earlier than the timer (the first header byte after a long idle) wakes it early.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::response::RelayBody;

/// How long an idle connection that has been told goodbye (GOAWAY, `close_notify`) may take to
/// go before it is dropped: a round trip for HTTP/2's closing PING, with room to spare.
pub const GOODBYE: Duration = Duration::from_secs(1);

/// What a connection's deadlines look at. Timestamps are milliseconds since `origin`, plus one,
/// so that 0 can mean "none".
#[derive(Debug)]
pub struct Watch {
    origin: Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// Whether the first bytes of a request start the header deadline: HTTP/1 only. HTTP/2
    /// clients send frames while idle (pings, window updates), and h2 reads headers in frames.
    heads: bool,
    /// Requests whose responses are not finished.
    in_flight: AtomicU32,
    /// When the connection last became idle.
    idle_since: AtomicU64,
    /// When the first byte of the next request's head arrived (0: none yet).
    head_since: AtomicU64,
    /// When the timer fires next, so a deadline that comes earlier can wake it.
    armed: AtomicU64,
    wake: Notify,
}

impl Watch {
    /// A fresh HTTP/1 connection: its first request's headers are already due.
    pub fn http1(limits: &Limits) -> Arc<Watch> {
        Self::new(limits, true)
    }

    /// A fresh HTTP/2 connection: only the idle bound applies.
    pub fn http2(limits: &Limits) -> Arc<Watch> {
        Self::new(limits, false)
    }

    fn new(limits: &Limits, heads: bool) -> Arc<Watch> {
        Arc::new(Watch {
            origin: Instant::now(),
            header_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            heads,
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(1),
            head_since: AtomicU64::new(if heads { 1 } else { 0 }),
            armed: AtomicU64::new(u64::MAX),
            wake: Notify::new(),
        })
    }

    fn now(&self) -> u64 {
        self.stamp(Instant::now())
    }

    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn instant(&self, stamp: u64) -> Instant {
        self.origin + Duration::from_millis(stamp.saturating_sub(1))
    }

    /// Wakes the timer when `deadline` comes before it.
    fn earlier(&self, deadline: u64) {
        if deadline < self.armed.load(Ordering::Acquire) {
            self.wake.notify_one();
        }
    }

    /// Marks a request in flight until the returned guard (kept in its response body) drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    fn bytes_read(&self) {
        if self.heads && self.in_flight.load(Ordering::Acquire) == 0 && self.head_since.load(Ordering::Acquire) == 0 {
            let now = self.now();
            self.head_since.store(now, Ordering::Release);
            self.earlier(now.saturating_add(millis(self.header_timeout)));
        }
    }

    /// The instant the connection must close if nothing changes; `None` while a request is in
    /// flight.
    fn deadline(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match self.head_since.load(Ordering::Acquire) {
            0 => self.instant(self.idle_since.load(Ordering::Acquire)) + self.idle_timeout,
            head => self.instant(head) + self.header_timeout,
        })
    }

    /// When the timer should fire next: the deadline, or while busy one idle period from now.
    fn arm(&self) -> Instant {
        let at = self.deadline().unwrap_or_else(|| Instant::now() + self.idle_timeout);
        self.armed.store(self.stamp(at), Ordering::Release);
        at
    }

    fn reading_head(&self) -> bool {
        self.head_since.load(Ordering::Acquire) != 0
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A request in flight; dropping it (with its response body) makes the connection idle again
/// once no other request is in flight.
#[derive(Debug)]
pub struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let w = &self.0;
        if w.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = w.now();
            w.head_since.store(0, Ordering::Release);
            w.idle_since.store(now, Ordering::Release);
            w.earlier(now.saturating_add(millis(w.idle_timeout)));
        }
    }
}

/// Tells serving connections to finish: `graceful` (answer what is in flight, take no new
/// request), then, once the grace period is over, `force` (close now).
#[derive(Debug, Clone, Default)]
pub struct Drain {
    pub graceful: CancellationToken,
    pub force: CancellationToken,
}

/// Runs `conn` until it ends, misses a deadline or is drained.
///
/// A connection that misses the header-read deadline is dropped (closed at once). One that
/// stayed idle is closed the way nginx and Go close theirs: HTTP/2 gets a GOAWAY, so a client
/// that sent a request at that moment learns it was not processed and may safely retry it, and
/// TLS gets its `close_notify`. The client has [`GOODBYE`] to take that before the connection is
/// dropped anyway.
///
/// `conn` comes boxed: every open connection holds this future for its whole life, and a future
/// keeps what it was given in a slot of its own, so an unboxed connection would take its room
/// (about 2 KB with TLS) more than once.
pub async fn drive<C: GracefulConnection>(mut conn: Pin<Box<C>>, watch: Arc<Watch>, drain: &Drain) {
    let mut draining = false;
    let mut closing = false;
    // Set once an idle connection has been told goodbye: when it must be gone.
    let mut goodbye: Option<Instant> = None;
    let graceful = drain.graceful.cancelled();
    let force = drain.force.cancelled();
    let sleep = tokio::time::sleep_until(watch.arm());
    let (mut graceful, mut force, mut sleep) = (std::pin::pin!(graceful), std::pin::pin!(force), std::pin::pin!(sleep));
    loop {
        tokio::select! {
            biased;
            _ = conn.as_mut() => return,
            _ = &mut force, if draining => return,
            _ = &mut graceful, if !draining => {
                draining = true;
                if !closing {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = watch.wake.notified(), if goodbye.is_none() => sleep.as_mut().reset(watch.arm()),
            _ = &mut sleep => {
                let now = Instant::now();
                if watch.deadline().is_none_or(|d| d > now) {
                    // Busy, or active since the timer was set. A request that came in after a
                    // goodbye (HTTP/2 streams already on their way) gets a fresh idle period.
                    goodbye = None;
                    sleep.as_mut().reset(watch.arm());
                } else if goodbye.is_some() || closing || watch.reading_head() {
                    tracing::debug!("connection closed: header-read deadline passed, or the goodbye went unanswered");
                    return;
                } else {
                    tracing::debug!("idle connection: closing it gracefully");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    let at = now + GOODBYE;
                    goodbye = Some(at);
                    sleep.as_mut().reset(at);
                }
            }
        }
    }
}

/// A response body that keeps its request in flight until it is finished or dropped.
#[derive(Debug)]
pub struct TrackedBody {
    inner: RelayBody,
    _in_flight: InFlight,
}

impl TrackedBody {
    pub fn new(inner: RelayBody, in_flight: InFlight) -> Self {
        TrackedBody { inner, _in_flight: in_flight }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = <RelayBody as Body>::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A transport that tells its [`Watch`] when bytes arrive.
#[derive(Debug)]
pub struct WatchedIo<T> {
    inner: T,
    watch: Arc<Watch>,
}

impl<T> WatchedIo<T> {
    pub fn new(inner: T, watch: Arc<Watch>) -> Self {
        WatchedIo { inner, watch }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.watch.bytes_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    //! Each deadline over a real hyper connection on an in-memory pipe, with tokio's clock
    //! paused: the runtime jumps to the next timer whenever every task waits, so a minute of
    //! idling takes no time and the instant a connection closes is exact.

    use std::convert::Infallible;

    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::task::JoinHandle;

    use super::*;

    const HEADER: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    fn limits() -> Limits {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: HEADER,
            idle_timeout: IDLE,
            shutdown_grace: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            max_connections: 16,
            max_query_bytes: 8 * 1024,
            max_body_bytes: 64 * 1024,
        }
    }

    /// An HTTP/1.1 connection served under its deadlines; `GET /slow` answers after five
    /// minutes, anything else at once. Returns the client's end and the serving task.
    fn serve(drain: &Drain) -> (DuplexStream, JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(4096);
        let watch = Watch::http1(&limits());
        let io = TokioIo::new(WatchedIo::new(server, watch.clone()));
        let in_flight = watch.clone();
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let guard = in_flight.begin();
            async move {
                if req.uri().path() == "/slow" {
                    tokio::time::sleep(Duration::from_secs(300)).await;
                }
                Ok::<_, Infallible>(http::Response::new(TrackedBody::new(RelayBody::full("ok"), guard)))
            }
        });
        let conn = http1::Builder::new().serve_connection(io, svc);
        let drain = drain.clone();
        (client, tokio::spawn(async move { drive(Box::pin(conn), watch, &drain).await }))
    }

    /// Sends one request and reads its whole response (a 2-byte body).
    async fn exchange(client: &mut DuplexStream, path: &str) -> String {
        client.write_all(format!("GET {path} HTTP/1.1\r\nhost: relay.test\r\n\r\n").as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\nok") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    /// How long from now until the server closes the connection (the client reads its end).
    async fn closes_after(client: &mut DuplexStream) -> Duration {
        let start = Instant::now();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "unexpected bytes: {}", String::from_utf8_lossy(&rest));
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
        let (mut client, task) = serve(&Drain::default());
        assert!(exchange(&mut client, "/").await.starts_with("HTTP/1.1 200 OK\r\n"));
        assert_eq!(closes_after(&mut client).await, IDLE);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_must_send_its_headers_within_the_header_timeout() {
        let (mut client, _task) = serve(&Drain::default());
        assert_eq!(closes_after(&mut client).await, HEADER);
    }

    #[tokio::test(start_paused = true)]
    async fn headers_begun_after_a_long_idle_get_the_header_timeout_from_their_first_byte() {
        let (mut client, _task) = serve(&Drain::default());
        assert!(exchange(&mut client, "/").await.starts_with("HTTP/1.1 200 OK\r\n"));
        tokio::time::sleep(Duration::from_secs(45)).await;
        client.write_all(b"GET / HTTP/1.1\r\nhost: rel").await.unwrap();
        // Cut off ten seconds after the first byte, not at the idle deadline 15 s later.
        assert_eq!(closes_after(&mut client).await, HEADER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_never_cut_while_its_answer_is_being_prepared() {
        let (mut client, _task) = serve(&Drain::default());
        let start = Instant::now();
        assert!(exchange(&mut client, "/slow").await.starts_with("HTTP/1.1 200 OK\r\n"));
        assert_eq!(start.elapsed(), Duration::from_secs(300));
        // Idle from the end of the answer on.
        assert_eq!(closes_after(&mut client).await, IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_finishes_answers_in_flight_then_force_closes_what_is_left() {
        let drain = Drain::default();
        let (mut idle, idle_task) = serve(&drain);
        assert!(exchange(&mut idle, "/").await.starts_with("HTTP/1.1 200 OK\r\n"));
        let (mut busy, busy_task) = serve(&drain);
        busy.write_all(b"GET /slow HTTP/1.1\r\nhost: relay.test\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        drain.graceful.cancel();
        // The idle connection goes at once; the busy one keeps its request.
        assert_eq!(closes_after(&mut idle).await, Duration::ZERO);
        idle_task.await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!busy_task.is_finished());
        drain.force.cancel();
        busy_task.await.unwrap();
    }
}
