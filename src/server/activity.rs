//! Per-connection deadlines that hyper does not offer on its own: an idle keep-alive timeout and
//! a separate, shorter bound on receiving a request's headers once its first byte has arrived
//! (slowloris). A connection with a request in flight has no deadline here; upstream timeouts
//! bound that phase.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::Limits;
use crate::relay::RelayBody;

/// How long an idle connection that has been told goodbye (GOAWAY, `close_notify`) may take to
/// go before it is dropped: a round trip for HTTP/2's closing PING, with room to spare.
pub const GOODBYE: Duration = Duration::from_secs(1);

/// The process epoch: as a timer instant, and on the coarse clock, read together.
fn epoch() -> (Instant, Duration) {
    static EPOCH: OnceLock<(Instant, Duration)> = OnceLock::new();
    *EPOCH.get_or_init(|| (Instant::now(), coarse()))
}

/// `CLOCK_MONOTONIC_COARSE`: the kernel's last tick, read without the TSC (a few nanoseconds in
/// the vDSO against about thirty for the precise clock on a VM). The same timebase as tokio's
/// clock, behind it by at most a tick (1-10 ms): nginx's cached-time trade, for deadlines of
/// seconds.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn coarse() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the call only fills it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Elsewhere (no coarse clock in libc), the precise clock since a fixed origin.
#[cfg(not(target_os = "linux"))]
fn coarse() -> Duration {
    static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed()
}

/// Milliseconds since the process epoch (never 0), as a cheap atomic timestamp. Two clock reads
/// per request take it (the first byte of a request, the end of its answer).
fn now_ms() -> u64 {
    coarse().saturating_sub(epoch().1).as_millis() as u64 + 1
}

fn at_ms(ms: u64) -> Instant {
    epoch().0 + Duration::from_millis(ms.saturating_sub(1))
}

/// Tells serving connections to finish (graceful: answer what is in flight, take no new
/// request) or to close now (force), through each connection's own wake-up: no extra future is
/// polled on the request path.
#[derive(Debug, Default)]
pub struct Shutdown {
    /// 0 serving, then [`GRACEFUL`], then [`FORCE`]; it only ever rises.
    phase: AtomicU8,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Weak<Activity>>>,
}

const GRACEFUL: u8 = 1;
const FORCE: u8 = 2;

impl Shutdown {
    /// Stops every connection after its in-flight requests.
    pub fn graceful(&self) {
        self.set(GRACEFUL);
    }

    /// Closes every connection now.
    pub fn force(&self) {
        self.set(FORCE);
    }

    fn set(&self, phase: u8) {
        self.phase.fetch_max(phase, Ordering::AcqRel);
        let conns: Vec<Arc<Activity>> = match self.conns.lock() {
            Ok(c) => c.values().filter_map(Weak::upgrade).collect(),
            Err(_) => return,
        };
        for a in conns {
            a.changed.notify_one();
        }
    }

    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }

    fn register(self: &Arc<Self>, activity: &Arc<Activity>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.conns.lock() {
            c.insert(id, Arc::downgrade(activity));
        }
        Registration { shutdown: self.clone(), id }
    }
}

/// Removes a connection from [`Shutdown`]'s list when it ends.
struct Registration {
    shutdown: Arc<Shutdown>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut c) = self.shutdown.conns.lock() {
            c.remove(&self.id);
        }
    }
}

/// The state of one connection as its deadlines see it.
#[derive(Debug)]
pub struct Activity {
    /// Requests whose responses are not finished.
    active: AtomicU32,
    /// When the connection last became idle.
    idle_since: AtomicU64,
    /// When the first byte of the next request arrived (0: none yet).
    first_byte: AtomicU64,
    /// Whether arriving bytes start the header-read deadline (HTTP/1 only).
    header_deadline: bool,
    /// When the watchdog's timer fires next (ms), so a deadline that moves earlier can wake it.
    armed: AtomicU64,
    /// The header-read and idle timeouts in ms (set when the watchdog starts).
    header_ms: AtomicU64,
    idle_ms: AtomicU64,
    /// Wakes the watchdog when a deadline moves earlier than its timer.
    changed: Notify,
}

impl Activity {
    /// A fresh HTTP/1 connection: its first request's headers are already due.
    pub fn new() -> Arc<Activity> {
        Self::with(true)
    }

    /// A fresh HTTP/2 connection: only the idle bound applies. Its clients send frames while idle
    /// (pings, window updates) that must not start a header deadline, and h2 reads a request's
    /// headers in whole frames.
    pub fn new_h2() -> Arc<Activity> {
        Self::with(false)
    }

    fn with(header_deadline: bool) -> Arc<Activity> {
        let now = now_ms();
        Arc::new(Activity {
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(now),
            first_byte: AtomicU64::new(if header_deadline { now } else { 0 }),
            header_deadline,
            armed: AtomicU64::new(0),
            header_ms: AtomicU64::new(0),
            idle_ms: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    /// Marks a request in flight until the returned guard (kept in the response body) drops.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }

    fn on_bytes_read(&self) {
        if self.header_deadline
            && self.active.load(Ordering::Acquire) == 0
            && self.first_byte.load(Ordering::Acquire) == 0
        {
            let now = now_ms();
            self.first_byte.store(now, Ordering::Release);
            // Wake the watchdog only when the header deadline comes before its timer; on a busy
            // keep-alive connection that is rare, so requests cost no timer work.
            if now + self.header_ms.load(Ordering::Relaxed) < self.armed.load(Ordering::Acquire) {
                self.changed.notify_one();
            }
        }
    }

    /// The instant the connection must close if nothing changes, or `None` while busy.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let first = self.first_byte.load(Ordering::Acquire);
        Some(if first != 0 {
            at_ms(first) + limits.header_read_timeout
        } else {
            at_ms(self.idle_since.load(Ordering::Acquire)) + limits.idle_timeout
        })
    }

    /// Runs the connection until it ends or misses a deadline.
    ///
    /// One timer per connection, re-armed lazily: when it fires, the deadline is recomputed from
    /// the atomics and the timer moved if the connection is busy or was active since. Only a
    /// deadline that moves earlier than the timer (the first header byte after a long idle, or
    /// an idle timeout shorter than the header one) wakes the watchdog, so a steady stream of
    /// requests costs about two timer resets per header-read period instead of two per request.
    ///
    /// A connection that misses the header-read deadline is dropped (closed at once). One that
    /// stayed idle is closed the way nginx and Go close theirs: HTTP/2 gets a GOAWAY, so a client
    /// that sent a request at that moment learns it was not processed and may safely retry it,
    /// and TLS gets its `close_notify`. The client has [`GOODBYE`] to take that before the
    /// connection is dropped anyway.
    ///
    /// The connection is boxed here, before any future holds it: a future stores what it was
    /// given, what it captures and what it pins in slots of their own, so an unboxed connection
    /// (hyper's is about 1.9 KB with its TLS stream) was held three times over in every open
    /// connection's memory. Callers box the returned future as it is, with no `async` block
    /// around it.
    pub fn drive<'a, C>(
        self: Arc<Self>,
        conn: C,
        limits: &'a Limits,
        shutdown: &'a Arc<Shutdown>,
    ) -> impl Future<Output = ()> + 'a
    where
        C: GracefulConnection + 'a,
    {
        self.watch(Box::pin(conn), limits, shutdown)
    }

    /// [`Activity::drive`]'s loop, over the boxed connection.
    async fn watch<C>(self: Arc<Self>, mut conn: Pin<Box<C>>, limits: &Limits, shutdown: &Arc<Shutdown>)
    where
        C: GracefulConnection,
    {
        self.header_ms.store(limits.header_read_timeout.as_millis() as u64, Ordering::Relaxed);
        self.idle_ms.store(limits.idle_timeout.as_millis() as u64, Ordering::Relaxed);
        let _registered = shutdown.register(&self);
        let mut finishing = false;
        // Set once an idle connection has been told goodbye: when it must be gone.
        let mut goodbye: Option<Instant> = None;
        let sleep = tokio::time::sleep_until(self.arm(limits));
        let mut sleep = std::pin::pin!(sleep);
        loop {
            match shutdown.phase() {
                FORCE => return,
                GRACEFUL if !finishing => {
                    finishing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ => {}
            }
            tokio::select! {
                biased;
                _ = conn.as_mut() => return,
                _ = self.changed.notified(), if goodbye.is_none() => sleep.as_mut().reset(self.arm(limits)),
                _ = sleep.as_mut() => {
                    let now = Instant::now();
                    if self.deadline(limits).is_none_or(|d| d > now) {
                        // Busy, or active since the timer was set. A request that came in
                        // after a goodbye (HTTP/2 streams already on their way) is bounded by
                        // the upstream timeouts; its connection gets a fresh idle period.
                        goodbye = None;
                        sleep.as_mut().reset(self.arm(limits));
                    } else if goodbye.is_some() || finishing || self.first_byte.load(Ordering::Acquire) != 0 {
                        tracing::debug!("connection closed: header-read deadline passed, or the goodbye went unanswered");
                        return;
                    } else {
                        tracing::debug!("idle connection: closing it gracefully");
                        finishing = true;
                        conn.as_mut().graceful_shutdown();
                        let at = now + GOODBYE;
                        goodbye = Some(at);
                        sleep.as_mut().reset(at);
                    }
                }
            }
        }
    }

    /// The next instant to check: the deadline, or (while busy) one idle period from now.
    fn arm(&self, limits: &Limits) -> Instant {
        let at = self.deadline(limits).unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        let ms = at.saturating_duration_since(epoch().0).as_millis() as u64 + 1;
        self.armed.store(ms, Ordering::Release);
        at
    }
}

/// Held by a response body; dropping it makes the connection idle again.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let a = &self.0;
        if a.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = now_ms();
            a.first_byte.store(0, Ordering::Release);
            a.idle_since.store(now, Ordering::Release);
            if now + a.idle_ms.load(Ordering::Relaxed) < a.armed.load(Ordering::Acquire) {
                a.changed.notify_one();
            }
        }
    }
}

/// A response body that keeps its connection marked busy until it is finished or dropped.
#[derive(Debug)]
pub struct TrackedBody {
    inner: RelayBody,
    _guard: ActiveGuard,
}

impl TrackedBody {
    pub fn new(inner: RelayBody, guard: ActiveGuard) -> Self {
        TrackedBody { inner, _guard: guard }
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

/// Transport wrapper that tells [`Activity`] when bytes arrive.
pub struct ActivityIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        ActivityIo { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.on_bytes_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
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
    use super::*;

    /// Every open connection holds this future for its whole life; it must hold hyper's
    /// connection (1.9 KB with TLS, about 1 KB over plain TCP) only through the box `drive`
    /// puts it in.
    #[tokio::test]
    async fn the_watchdog_holds_its_connection_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        let svc = hyper::service::service_fn(|_| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Empty::<Bytes>::new()))
        });
        let conn = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
        let conn_size = std::mem::size_of_val(&conn);
        let limits = Limits {
            handshake_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(1),
            max_header_bytes: 8192,
            max_connections: 1,
            max_query_bytes: 8192,
            max_body_bytes: 1024,
        };
        let shutdown = Arc::new(Shutdown::default());
        let activity = Activity::new();
        let watched = activity.drive(conn, &limits, &shutdown);
        let size = std::mem::size_of_val(&watched);
        // Holding a copy would make it at least as big as the connection (448 and 640 bytes in a
        // debug build here).
        assert!(size < conn_size, "the watchdog's future is {size} bytes, its connection {conn_size}");
    }
}
