//! Fewer writes and packets per TLS connection, under the TLS layer.
//!
//! - A full TLS 1.3 handshake ends with the server's session ticket, written as soon as the
//!   client's Finished is read; the client's first request usually comes in the same read. The
//!   ticket is held and goes out with the first response (or the HTTP/2 preface).
//! - A response the connection closes after (`Connection: close`, HTTP/1.0) is followed by TLS's
//!   `close_notify`. When the service says that the answer to a connection's first request is
//!   also its last, the two go out together at shutdown.
//!
//! Held bytes never wait for anything but this connection's own next step: during the
//! handshake they go out as soon as a read would block (the client may need them before it can
//! answer); after it, with the next write, with the flush the HTTP layer makes on every pass
//! (hyper's HTTP/1 dispatcher and h2 both flush before they wait), at shutdown, and, best
//! effort, when the connection is dropped (a failed handshake's alert). A last answer that turns
//! out not to be the last (the HTTP layer reads on instead of closing) is sent when that read
//! would block.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream that gathers small TLS writes (see the module docs).
#[derive(Debug)]
pub struct Gather {
    tcp: TcpStream,
    /// Written by the layer above, not yet sent.
    held: Vec<u8>,
    /// The handshake is running.
    handshaking: bool,
    /// Set by the service: what is written next ends the connection.
    last: LastAnswer,
    /// Some of `held` was written after `last` was set.
    holds_last: bool,
}

/// The service's word that the answer to a connection's first request is complete and the
/// connection's last, so the connection may hold it until `close_notify` joins it. Only the
/// first request is looked at: that is where one-shot clients (health checks, scripts, a
/// handshake per request) say `Connection: close`, and later requests on a kept-alive
/// connection then pay one atomic load for it instead of a header lookup.
#[derive(Debug, Clone, Default)]
pub struct LastAnswer(Arc<AtomicU8>);

/// [`LastAnswer`]'s states: no request yet, the first answer is the last, or neither.
const FIRST: u8 = 0;
const MARKED: u8 = 1;
const PAST: u8 = 2;

impl LastAnswer {
    /// True until [`LastAnswer::decide`] has been called once.
    pub fn is_first(&self) -> bool {
        self.0.load(Ordering::Relaxed) == FIRST
    }

    /// Records what the first request's answer is: the connection's last, or not.
    pub fn decide(&self, last: bool) {
        self.0.store(if last { MARKED } else { PAST }, Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed) == MARKED
    }
}

impl Gather {
    /// A stream at the start of its handshake.
    pub fn new(tcp: TcpStream) -> Gather {
        Gather { tcp, held: Vec::new(), handshaking: true, last: LastAnswer::default(), holds_last: false }
    }

    /// The handshake is over: what it left held goes out with the next write or flush.
    pub fn handshake_done(&mut self) {
        self.handshaking = false;
    }

    /// The handle the service marks a last answer with.
    pub fn last_answer(&self) -> LastAnswer {
        self.last.clone()
    }

    fn holding(&self) -> bool {
        self.handshaking || self.last.is_set()
    }

    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        // Only a handshake or a last answer needs the buffer; a kept-alive connection holds none.
        self.held = Vec::new();
        Poll::Ready(Ok(()))
    }
}

// The read and flush are kept out of line: inlined, they grow tokio-rustls' own read and flush
// paths past what the compiler inlines further up (measured: +170 instructions per W1 request).
impl AsyncRead for Gather {
    #[inline(never)]
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if read.is_pending() && !this.held.is_empty() && (this.handshaking || this.holds_last) {
            // About to wait for the client, which may be waiting for these bytes.
            if let Poll::Ready(Err(e)) = this.release_before_waiting(cx) {
                return Poll::Ready(Err(e));
            }
        }
        read
    }
}

impl Gather {
    #[cold]
    fn release_before_waiting(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A handshake's flight leaves the first answer's mark alone; a held answer spends it.
        if self.holds_last {
            self.last.decide(false);
            self.holds_last = false;
        }
        self.poll_send_held(cx)
    }

    /// A write while something is held, or while holding.
    #[cold]
    fn poll_write_gathered(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if self.holding() {
            self.holds_last |= !self.handshaking;
            let n = bufs.iter().map(|b| b.len()).sum();
            self.held.reserve(n);
            for b in bufs {
                self.held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(n));
        }
        while !self.held.is_empty() {
            // The held bytes and these in one system call, and usually one packet.
            let mut slices = [IoSlice::new(&[]); 16];
            slices[0] = IoSlice::new(&self.held);
            let k = bufs.len().min(slices.len() - 1);
            slices[1..=k].copy_from_slice(&bufs[..k]);
            let n = ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, &slices[..=k]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < self.held.len() {
                self.held.drain(..n);
                continue;
            }
            let sent = n - self.held.len();
            self.held = Vec::new();
            if sent > 0 {
                return Poll::Ready(Ok(sent));
            }
        }
        write_to(&mut self.tcp, cx, bufs)
    }
}

/// One slice (a TLS record, as rustls writes them) goes out with `send(2)` rather than
/// `writev(2)`: the kernel's single-buffer path skips the vector's copy-in and the file layer.
#[inline]
fn write_to(tcp: &mut TcpStream, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
    match bufs {
        [one] => Pin::new(tcp).poll_write(cx, one),
        _ => Pin::new(tcp).poll_write_vectored(cx, bufs),
    }
}

impl AsyncWrite for Gather {
    #[inline]
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.is_empty() && !this.holding() {
            return write_to(&mut this.tcp, cx, bufs);
        }
        this.poll_write_gathered(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    #[inline(never)]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.is_empty() && !this.holding() {
            ready!(this.poll_send_held(cx))?;
        }
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// Sends what is held and leaves the TCP stream open: every caller drops the connection
    /// right after its shutdown, and the close sends the FIN a `shutdown(2)` would have sent.
    /// (The client has often gone already: a handshake-per-request client closes, or resets,
    /// as soon as it has its answer, and the call only failed with `ENOTCONN`.) nginx closes
    /// the same way when it has no request body left to drain.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }
}

impl Drop for Gather {
    fn drop(&mut self) {
        if !self.held.is_empty() {
            // A failed handshake's alert, or a last answer whose shutdown never came: the socket
            // takes it now or not at all.
            let _ = self.tcp.try_write(&self.held);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A `Gather` at the start of its handshake and the client's end of the same connection.
    async fn connected() -> (Gather, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (Gather::new(server), client)
    }

    /// What reaches the client within `wait` (nothing, when everything is held).
    async fn arrived(client: &mut TcpStream, wait: Duration) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(Ok(n @ 1..)) = tokio::time::timeout(wait, client.read(&mut buf)).await {
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    const NOTHING: Duration = Duration::from_millis(100);
    const SOON: Duration = Duration::from_millis(500);

    /// Polls a read on `gather` once: the client has sent nothing, so it would block.
    async fn read_would_block(gather: &mut Gather) {
        let mut buf = [0u8; 16];
        assert!(tokio::time::timeout(Duration::from_millis(20), gather.read(&mut buf)).await.is_err());
    }

    #[tokio::test]
    async fn a_handshake_write_goes_out_when_the_server_waits_for_the_client() {
        let (mut gather, mut client) = connected().await;
        gather.write_all(b"server flight").await.expect("write");
        gather.flush().await.expect("flush");
        assert_eq!(arrived(&mut client, NOTHING).await, b"");
        read_would_block(&mut gather).await;
        assert_eq!(arrived(&mut client, SOON).await, b"server flight");
    }

    #[tokio::test]
    async fn what_the_handshake_ends_with_goes_out_with_the_first_response() {
        let (mut gather, mut client) = connected().await;
        gather.write_all(b"ticket|").await.expect("write");
        gather.flush().await.expect("flush");
        gather.handshake_done();
        // A read that would block after the handshake does not send it: the response will.
        read_would_block(&mut gather).await;
        assert_eq!(arrived(&mut client, NOTHING).await, b"");
        gather.write_all(b"response").await.expect("write");
        assert_eq!(arrived(&mut client, SOON).await, b"ticket|response");
        assert_eq!(gather.held.capacity(), 0, "a kept-alive connection holds no buffer");
        // Later writes go straight out.
        gather.write_all(b"next").await.expect("write");
        assert_eq!(arrived(&mut client, SOON).await, b"next");
    }

    #[tokio::test]
    async fn a_flush_after_the_handshake_sends_what_it_left() {
        let (mut gather, mut client) = connected().await;
        gather.write_all(b"final flight").await.expect("write");
        gather.handshake_done();
        gather.flush().await.expect("flush");
        assert_eq!(arrived(&mut client, SOON).await, b"final flight");
    }

    /// A marked answer is written and flushed, and nothing goes out until shutdown sends it with
    /// what shutdown writes.
    async fn answer_waits_for_close_notify(mut gather: Gather, mut client: TcpStream) {
        gather.write_all(b"answer|").await.expect("write");
        gather.flush().await.expect("flush");
        assert_eq!(arrived(&mut client, NOTHING).await, b"");
        gather.write_all(b"close_notify").await.expect("write");
        gather.shutdown().await.expect("shutdown");
        drop(gather);
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.expect("read to the end");
        assert_eq!(all, b"answer|close_notify");
    }

    #[tokio::test]
    async fn a_last_answer_goes_out_with_what_shutdown_writes() {
        let (mut gather, client) = connected().await;
        gather.handshake_done();
        gather.last_answer().decide(true);
        read_would_block(&mut gather).await;
        answer_waits_for_close_notify(gather, client).await;
    }

    #[tokio::test]
    async fn the_first_answer_can_be_the_last_after_a_handshake_that_waited() {
        let (mut gather, mut client) = connected().await;
        let last = gather.last_answer();
        gather.write_all(b"flight|").await.expect("write");
        read_would_block(&mut gather).await;
        assert_eq!(arrived(&mut client, SOON).await, b"flight|");
        gather.handshake_done();
        assert!(last.is_first());
        last.decide(true);
        answer_waits_for_close_notify(gather, client).await;
    }

    #[tokio::test]
    async fn a_last_answer_that_is_not_the_last_goes_out_when_the_server_reads_on() {
        let (mut gather, mut client) = connected().await;
        gather.handshake_done();
        gather.last_answer().decide(true);
        gather.write_all(b"answer").await.expect("write");
        gather.flush().await.expect("flush");
        read_would_block(&mut gather).await;
        assert_eq!(arrived(&mut client, SOON).await, b"answer");
        gather.write_all(b"next").await.expect("write");
        gather.flush().await.expect("flush");
        assert_eq!(arrived(&mut client, SOON).await, b"next", "the mark is spent");
    }

    #[tokio::test]
    async fn held_bytes_are_offered_to_the_socket_when_the_connection_is_dropped() {
        let (mut gather, mut client) = connected().await;
        gather.write_all(b"alert").await.expect("write");
        drop(gather);
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.expect("read to the end");
        assert_eq!(all, b"alert");
    }
}
