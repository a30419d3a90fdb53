//! A connection's deadlines after its TLS handshake: how long it may stay idle between requests,
//! how long a request's headers may take once their first byte has arrived (slowloris), and how
//! long its answers may make no progress toward the client (a client that stops reading). While
//! an answer is being prepared none applies: the upstream timeouts bound that phase.
//!
//! Three parties share a [`Watch`]: the transport reports bytes read and writes that block
//! ([`WatchedIo`]), the service marks each request in flight and its response body reports when
//! hyper asks it for data ([`Watch::begin`], [`TrackedBody`]), and [`drive`] runs the connection
//! with one timer. Requests cost a few timestamps and no timer work: the timer is not moved when
//! a request starts or ends; when it fires, it looks at the connection and either acts or sets
//! itself to the deadline that applies now. Only a deadline that comes earlier than the timer
//! (the first header byte after a long idle) wakes it early.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
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

/// How long headers or an answer must have made no progress before a shortage of connection
/// slots counts them as stalled: a client's request follows its handshake within
/// milliseconds, so a second is far beyond what a working client takes.
pub const STALLED: Duration = Duration::from_secs(1);

/// What a connection's deadlines look at. Timestamps are milliseconds since `origin`, plus one,
/// so that 0 can mean "none".
#[derive(Debug)]
pub struct Watch {
    origin: Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    /// Whether the first bytes of a request start the header deadline: HTTP/1 only. HTTP/2
    /// clients send frames while idle (pings, window updates), and h2 reads headers in frames.
    heads: bool,
    /// Requests whose responses are not finished.
    in_flight: AtomicU32,
    /// When the connection last became idle.
    idle_since: AtomicU64,
    /// When the first byte of the next request's head arrived (0: none yet).
    head_since: AtomicU64,
    /// Response bodies with more to give that hyper has not finished sending: they wait on the
    /// client, not on the upstream.
    sending: AtomicU32,
    /// When hyper last asked a response body for data.
    sent: AtomicU64,
    /// Since when the socket has not taken a write (0: it takes them).
    write_blocked: AtomicU64,
    /// When the timer fires next, so a deadline that comes earlier can wake it.
    armed: AtomicU64,
    /// Set when the relay, short of connection slots, asks this connection to go.
    evict: AtomicBool,
    /// Set when the connection ends after refusing a request its client may still be sending:
    /// the transport then lingers (see `linger`).
    linger: AtomicBool,
    wake: Notify,
}

/// The deadline in force, and what happens when it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// A request is being answered and nothing waits on the client.
    Busy,
    /// Idle: told goodbye gracefully.
    Idle(Instant),
    /// Headers begun but unfinished: closed at once.
    Head(Instant),
    /// An answer makes no progress toward the client: closed at once.
    Send(Instant),
}

impl Watch {
    /// A fresh HTTP/1 connection: its first request's headers are already due.
    pub fn http1(limits: &Limits) -> Arc<Watch> {
        Self::new(limits, true)
    }

    /// A fresh HTTP/2 connection: only the idle and send bounds apply.
    pub fn http2(limits: &Limits) -> Arc<Watch> {
        Self::new(limits, false)
    }

    fn new(limits: &Limits, heads: bool) -> Arc<Watch> {
        Arc::new(Watch {
            origin: Instant::now(),
            header_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            send_timeout: limits.send_timeout,
            heads,
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(1),
            head_since: AtomicU64::new(if heads { 1 } else { 0 }),
            sending: AtomicU32::new(0),
            sent: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            armed: AtomicU64::new(u64::MAX),
            evict: AtomicBool::new(false),
            linger: AtomicBool::new(false),
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

    /// The socket did not take a write: the send deadline runs from the first such moment.
    fn write_blocked(&self) {
        if self.write_blocked.load(Ordering::Acquire) == 0 {
            let now = self.now();
            self.write_blocked.store(now, Ordering::Release);
            self.earlier(now.saturating_add(millis(self.send_timeout)));
        }
    }

    fn wrote(&self) {
        if self.write_blocked.load(Ordering::Relaxed) != 0 {
            self.write_blocked.store(0, Ordering::Release);
        }
    }

    /// hyper asked a response body for data: the client has taken what came before.
    fn asked(&self) {
        self.sent.store(self.now(), Ordering::Release);
    }

    /// The send deadline, when something waits on the client: a body with more to give, or a
    /// write the socket did not take.
    fn send_deadline(&self) -> Option<Instant> {
        let body = (self.sending.load(Ordering::Acquire) > 0).then(|| self.sent.load(Ordering::Acquire));
        let socket = Some(self.write_blocked.load(Ordering::Acquire)).filter(|&s| s != 0);
        let since = match (body, socket) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(self.instant(since) + self.send_timeout)
    }

    /// The deadline in force now.
    fn due(&self) -> Due {
        let send = self.send_deadline();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return send.map_or(Due::Busy, Due::Send);
        }
        let rest = match self.head_since.load(Ordering::Acquire) {
            0 => Due::Idle(self.instant(self.idle_since.load(Ordering::Acquire)) + self.idle_timeout),
            head => Due::Head(self.instant(head) + self.header_timeout),
        };
        match (send, rest) {
            (Some(s), Due::Idle(t) | Due::Head(t)) if s < t => Due::Send(s),
            _ => rest,
        }
    }

    /// When the timer should fire next: the deadline, or while busy one send period from now
    /// (so a send deadline that starts later never comes before the timer).
    fn arm(&self) -> Instant {
        let at = match self.due() {
            Due::Busy => Instant::now() + self.send_timeout,
            Due::Idle(t) | Due::Head(t) | Due::Send(t) => t,
        };
        self.armed.store(self.stamp(at), Ordering::Release);
        at
    }
}

impl super::budget::Reclaim for Watch {
    /// How readily this connection goes when the relay is short of connection slots (lower
    /// first): an answer stalled on the client, then headers begun and unfinished, both for at
    /// least [`STALLED`], then idle; each the oldest first. `None` while it is answering a
    /// request, and for a request or an answer that is merely under way.
    fn reclaim_rank(&self) -> Option<(u8, Instant)> {
        let stalled = |since: Instant| Instant::now().saturating_duration_since(since) >= STALLED;
        match self.due() {
            Due::Busy => None,
            Due::Send(t) => Some((0, t - self.send_timeout)).filter(|(_, since)| stalled(*since)),
            Due::Head(t) => Some((1, t - self.header_timeout)).filter(|(_, since)| stalled(*since)),
            Due::Idle(t) => Some((2, t - self.idle_timeout)),
        }
    }

    /// Asks the connection to go now unless it is answering a request.
    fn reclaim(&self) {
        self.evict.store(true, Ordering::Release);
        self.wake.notify_one();
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
/// A connection that misses the header-read or the send deadline is dropped (closed at once:
/// it is not reading what it would be told). One that stayed idle is closed the way nginx and
/// Go close theirs: HTTP/2 gets a GOAWAY, so a client that sent a request at that moment learns
/// it was not processed and may safely retry it, and TLS gets its `close_notify`. The client has
/// [`GOODBYE`] to take that before the connection is dropped anyway.
///
/// `conn` comes boxed: every open connection holds this future for its whole life, and a future
/// keeps what it was given in a slot of its own, so an unboxed connection would take its room
/// (about 2 KB with TLS) more than once.
pub async fn drive<C>(mut conn: Pin<Box<C>>, watch: Arc<Watch>, drain: &Drain)
where
    C: GracefulConnection<Error = hyper::Error>,
{
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
            // The deadlines first: a peer that always gives the connection more to do (a flood
            // of pings or settings) would otherwise use up the task's budget in `conn` every
            // time, and tokio's timer, which yields to an exhausted budget, would never fire.
            biased;
            _ = &mut sleep => {
                let now = Instant::now();
                match watch.due() {
                    Due::Send(t) if t <= now => {
                        tracing::debug!("connection closed: no progress sending to the client for {:?}", watch.send_timeout);
                        crate::metrics::global().connection_closed("send_timeout");
                        return;
                    }
                    Due::Head(t) if t <= now => {
                        tracing::debug!("connection closed: headers not received in time");
                        crate::metrics::global().connection_closed("header_timeout");
                        return;
                    }
                    Due::Idle(t) if t <= now && (goodbye.is_some() || closing) => {
                        tracing::debug!("connection closed: the goodbye went unanswered");
                        return;
                    }
                    Due::Idle(t) if t <= now => {
                        tracing::debug!("idle connection: closing it gracefully");
                        crate::metrics::global().connection_closed("idle_timeout");
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                        let at = now + GOODBYE;
                        goodbye = Some(at);
                        sleep.as_mut().reset(at);
                    }
                    // Busy, or active since the timer was set. A request that came in after a
                    // goodbye (HTTP/2 streams already on their way) gets a fresh idle period.
                    _ => {
                        goodbye = None;
                        sleep.as_mut().reset(watch.arm());
                    }
                }
            }
            _ = &mut force, if draining => return,
            _ = &mut graceful, if !draining => {
                draining = true;
                if !closing {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = watch.wake.notified(), if goodbye.is_none() => {
                if watch.evict.swap(false, Ordering::AcqRel) {
                    match watch.due() {
                        Due::Busy => {}
                        Due::Idle(_) if !closing => {
                            tracing::debug!("idle connection closed: the relay is short of connection slots");
                            crate::metrics::global().connection_closed("overload");
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                            let at = Instant::now() + GOODBYE;
                            goodbye = Some(at);
                            sleep.as_mut().reset(at);
                            continue;
                        }
                        _ => {
                            tracing::debug!("stalled connection closed: the relay is short of connection slots");
                            crate::metrics::global().connection_closed("overload");
                            return;
                        }
                    }
                }
                sleep.as_mut().reset(watch.arm());
            }
            served = conn.as_mut() => {
                // hyper answered a request it could not parse (400, 414, 431) and stopped.
                if served.is_err_and(|e| e.is_parse() || e.is_parse_too_large()) {
                    watch.linger.store(true, Ordering::Release);
                }
                return;
            }
        }
    }
}

/// A response body that keeps its request in flight until it is finished or dropped, and
/// tells the watch when hyper asks it for data (the send deadline's progress).
#[derive(Debug)]
pub struct TrackedBody {
    inner: RelayBody,
    in_flight: InFlight,
    /// Counted in [`Watch::sending`]: it has data to give or gave a frame hyper has yet to send,
    /// and did not last answer "pending" (which would mean waiting on the upstream, not on the
    /// client).
    sending: bool,
}

impl TrackedBody {
    /// `resp` with its body tracked. An answer that refuses its request (see `linger`) makes
    /// the transport read on for a while if the connection ends after it.
    pub fn response(resp: http::Response<RelayBody>, in_flight: InFlight) -> http::Response<TrackedBody> {
        if super::linger::refuses_request(resp.status()) {
            in_flight.0.linger.store(true, Ordering::Release);
        }
        resp.map(|body| TrackedBody::new(body, in_flight))
    }

    pub fn new(inner: RelayBody, in_flight: InFlight) -> Self {
        let mut body = TrackedBody { inner, in_flight, sending: false };
        if !body.inner.is_end_stream() {
            body.in_flight.0.asked();
            body.set_sending(true);
        }
        body
    }

    fn set_sending(&mut self, sending: bool) {
        if sending != self.sending {
            self.sending = sending;
            let watch = &self.in_flight.0;
            let counter = &watch.sending;
            if sending {
                counter.fetch_add(1, Ordering::AcqRel);
                let since = watch.sent.load(Ordering::Acquire);
                watch.earlier(since.saturating_add(millis(watch.send_timeout)));
            } else {
                counter.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = <RelayBody as Body>::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        this.in_flight.0.asked();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        // A frame handed over waits on the client until hyper has sent it and dropped the body
        // (HTTP/2 holds the last frame until the stream has window for it); "pending" waits on
        // the upstream instead.
        this.set_sending(matches!(frame, Poll::Ready(Some(Ok(_)))));
        frame
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.set_sending(false);
    }
}

/// A transport that tells its [`Watch`] when bytes arrive and when writes block, and lingers
/// when the connection ends after a refused request (see `linger`).
#[derive(Debug)]
pub struct WatchedIo<T: AsyncRead + Unpin + Send + 'static> {
    /// Taken only when it is dropped, to linger.
    inner: Option<T>,
    watch: Arc<Watch>,
}

impl<T: AsyncRead + Unpin + Send + 'static> WatchedIo<T> {
    pub fn new(inner: T, watch: Arc<Watch>) -> Self {
        WatchedIo { inner: Some(inner), watch }
    }

    fn inner(&mut self) -> Pin<&mut T> {
        Pin::new(self.inner.as_mut().expect("taken only on drop"))
    }
}

impl<T: AsyncRead + Unpin + Send + 'static> Drop for WatchedIo<T> {
    fn drop(&mut self) {
        if self.watch.linger.load(Ordering::Acquire) {
            if let Some(io) = self.inner.take() {
                super::linger::spawn(io);
            }
        }
    }
}

impl<T: AsyncRead + Unpin + Send + 'static> AsyncRead for WatchedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = this.inner().poll_read(cx, buf);
        if buf.filled().len() > before {
            this.watch.bytes_read();
        }
        r
    }
}

/// Notes on `watch` whether a write went through or the socket did not take it.
fn track<R>(watch: &Watch, poll: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
    match &poll {
        Poll::Pending => watch.write_blocked(),
        Poll::Ready(_) => watch.wrote(),
    }
    poll
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for WatchedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = this.inner().poll_write(cx, buf);
        track(&this.watch, poll)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = this.inner().poll_write_vectored(cx, bufs);
        track(&this.watch, poll)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = this.inner().poll_flush(cx);
        track(&this.watch, poll)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = this.inner().poll_shutdown(cx);
        track(&this.watch, poll)
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

    use super::super::budget::Reclaim;
    use super::*;

    const HEADER: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);
    const SEND: Duration = Duration::from_secs(30);

    fn limits() -> Limits {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: HEADER,
            idle_timeout: IDLE,
            send_timeout: SEND,
            shutdown_grace: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            max_connections: 16,
            max_connections_per_ip: 16,
            max_query_bytes: 8 * 1024,
            max_body_bytes: 64 * 1024,
        }
    }

    /// The test service: `GET /slow` answers after five minutes, `GET /big` with a megabyte,
    /// anything else with `ok` at once.
    fn service(
        watch: Arc<Watch>,
    ) -> impl hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<TrackedBody>,
        Error = Infallible,
        Future = impl Future<Output = Result<http::Response<TrackedBody>, Infallible>> + Send,
    > + Clone {
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let guard = watch.begin();
            async move {
                let body = match req.uri().path() {
                    "/slow" => {
                        tokio::time::sleep(Duration::from_secs(300)).await;
                        RelayBody::full("ok")
                    }
                    "/big" => RelayBody::full(vec![b'x'; 1 << 20]),
                    _ => RelayBody::full("ok"),
                };
                Ok::<_, Infallible>(http::Response::new(TrackedBody::new(body, guard)))
            }
        })
    }

    /// An HTTP/1.1 connection served under its deadlines. Returns the client's end and the
    /// serving task.
    fn serve(drain: &Drain) -> (DuplexStream, JoinHandle<()>) {
        let (client, task, _) = serve_watched(drain);
        (client, task)
    }

    /// [`serve`], and the connection's watch.
    fn serve_watched(drain: &Drain) -> (DuplexStream, JoinHandle<()>, Arc<Watch>) {
        let (client, server) = tokio::io::duplex(4096);
        let watch = Watch::http1(&limits());
        let io = TokioIo::new(WatchedIo::new(server, watch.clone()));
        let conn = http1::Builder::new().serve_connection(io, service(watch.clone()));
        let (drain, driven) = (drain.clone(), watch.clone());
        (client, tokio::spawn(async move { drive(Box::pin(conn), driven, &drain).await }), watch)
    }

    /// An HTTP/2 connection served under its deadlines, and an h2 client on it that grants the
    /// server no flow-control window: answers with a body can never be sent.
    async fn serve_h2_zero_window() -> (h2::client::SendRequest<Bytes>, JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let watch = Watch::http2(&limits());
        let io = TokioIo::new(WatchedIo::new(server, watch.clone()));
        let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(io, service(watch.clone()));
        let task = tokio::spawn(async move { drive(Box::pin(conn), watch, &Drain::default()).await });
        let (send, connection) =
            h2::client::Builder::new().initial_window_size(0).handshake(client).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        (send, task)
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
    async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
        let (mut client, task) = serve(&Drain::default());
        client.write_all(b"GET /big HTTP/1.1\r\nhost: relay.test\r\n\r\n").await.unwrap();
        let start = Instant::now();
        // The client reads nothing: the answer fills the pipe and the server's writes block.
        task.await.unwrap();
        assert_eq!(start.elapsed(), SEND);
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_stream_with_a_zero_window_is_cut_off_after_the_send_timeout() {
        let (mut send, task) = serve_h2_zero_window().await;
        let start = Instant::now();
        let request = http::Request::get("https://relay.test/").body(()).unwrap();
        let (response, _) = send.send_request(request, true).expect("send the request");
        // The headers arrive (they are not flow-controlled); the body never can. (The response
        // is kept: dropping it would cancel the stream.)
        let response = response.await.expect("response head");
        assert_eq!(response.status(), 200);
        task.await.unwrap();
        assert_eq!(start.elapsed(), SEND);
        drop(response);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shortage_of_slots_closes_idle_and_stalled_connections_never_an_answer_in_flight() {
        let drain = Drain::default();
        let (mut idle, idle_task, idle_watch) = serve_watched(&drain);
        assert!(exchange(&mut idle, "/").await.starts_with("HTTP/1.1 200 OK\r\n"));
        let (mut busy, busy_task, busy_watch) = serve_watched(&drain);
        busy.write_all(b"GET /slow HTTP/1.1\r\nhost: relay.test\r\n\r\n").await.unwrap();
        let (mut fresh, fresh_task, fresh_watch) = serve_watched(&drain);
        fresh.write_all(b"GET / HTTP/1.1\r\nho").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Headers begun half a second ago are merely under way; the idle connection goes first.
        assert!(idle_watch.reclaim_rank().is_some());
        assert_eq!(busy_watch.reclaim_rank(), None);
        assert_eq!(fresh_watch.reclaim_rank(), None);
        tokio::time::sleep(STALLED).await;
        let (stalled, since) = fresh_watch.reclaim_rank().expect("stalled headers");
        assert!(stalled < idle_watch.reclaim_rank().expect("idle").0, "stalled before idle");
        assert_eq!(Instant::now() - since, STALLED + Duration::from_millis(500));
        for w in [&idle_watch, &busy_watch, &fresh_watch] {
            w.reclaim();
        }
        assert_eq!(closes_after(&mut idle).await, Duration::ZERO);
        idle_task.await.unwrap();
        fresh_task.await.unwrap();
        // The answer in flight is untouched.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!busy_task.is_finished());
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
