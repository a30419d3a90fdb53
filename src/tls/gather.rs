//! Fewer writes, and fewer packets, for a short TLS connection: the TCP stream under rustls.
//!
//! A new TLS 1.3 connection that asks for one answer would cost four writes, each its own
//! packet: the server's handshake flight, the session ticket (written as soon as the client's
//! Finished is read), the answer, and `close_notify`. This stream holds what the TLS layer
//! writes until the connection would wait for its peer, and then sends it in one write:
//!
//! - during the handshake, each flight goes out whole when the server starts waiting for the
//!   client's next one;
//! - after it, the ticket waits for the first answer (or HTTP/2's preface) and goes out with it;
//!   when that answer ends the connection, `close_notify` joins them at shutdown.
//!
//! The first time the connection waits for its peer after the handshake, gathering ends for
//! good: a kept-alive connection writes straight through. Held bytes never wait on anything but
//! this connection's own next step (a read that would block, shutdown, or drop), so nothing is
//! delayed past the moment its peer could need it.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Where a connection is: what it writes is held until it waits for its peer, or written through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The TLS handshake runs; each flight is held until the server waits for the client.
    Handshake,
    /// The handshake is over; held until the connection first waits for its peer or shuts down.
    FirstAnswer,
    /// Writes go straight to the socket.
    Through,
}

/// A TCP stream that gathers a new connection's writes (see the module docs).
#[derive(Debug)]
pub struct Gather {
    tcp: TcpStream,
    /// Written by the TLS layer, not yet sent.
    held: Vec<u8>,
    phase: Phase,
}

impl Gather {
    /// A stream at the start of its handshake.
    pub fn new(tcp: TcpStream) -> Gather {
        Gather { tcp, held: Vec::new(), phase: Phase::Handshake }
    }

    /// The handshake is over: what it left held waits for the first answer.
    pub fn handshake_done(&mut self) {
        self.phase = Phase::FirstAnswer;
    }

    fn holding(&self) -> bool {
        self.phase != Phase::Through
    }

    /// Sends everything held; the buffer is freed once empty (a kept-alive connection keeps none).
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        self.held = Vec::new();
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Gather {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if read.is_pending() && this.holding() {
            // About to wait for the peer, which may be waiting for these bytes.
            if this.phase == Phase::FirstAnswer {
                this.phase = Phase::Through;
            }
            if let Poll::Ready(Err(e)) = this.poll_send_held(cx) {
                return Poll::Ready(Err(e));
            }
        }
        read
    }
}

impl AsyncWrite for Gather {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.holding() {
            let n = bufs.iter().map(|b| b.len()).sum();
            this.held.reserve(n);
            for b in bufs {
                this.held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(n));
        }
        // What an earlier release could not send yet goes first.
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.holding() {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// Sends what is held and leaves the TCP stream open: every caller drops the connection
    /// right after its shutdown, and the close sends the FIN a `shutdown(2)` would have sent.
    /// (A client that opens a connection per request often has its answer and has closed, or
    /// reset, by then, and the call would only fail with `ENOTCONN`.)
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.phase = Phase::Through;
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }
}

impl Drop for Gather {
    fn drop(&mut self) {
        if !self.held.is_empty() {
            // A failed handshake's alert, or an answer whose shutdown never came: the socket
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
    async fn a_handshake_flight_goes_out_when_the_server_waits_for_the_client() {
        let (mut gather, mut client) = connected().await;
        gather.write_all(b"server flight").await.expect("write");
        gather.flush().await.expect("flush");
        assert_eq!(arrived(&mut client, NOTHING).await, b"");
        read_would_block(&mut gather).await;
        assert_eq!(arrived(&mut client, SOON).await, b"server flight");
    }

    #[tokio::test]
    async fn ticket_answer_and_close_notify_go_out_together() {
        let (mut gather, mut client) = connected().await;
        gather.write_all(b"ticket|").await.expect("write");
        gather.handshake_done();
        gather.write_all(b"answer|").await.expect("write");
        gather.flush().await.expect("flush");
        assert_eq!(arrived(&mut client, NOTHING).await, b"");
        gather.write_all(b"close_notify").await.expect("write");
        gather.shutdown().await.expect("shutdown");
        drop(gather);
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.expect("read to the end");
        assert_eq!(all, b"ticket|answer|close_notify");
    }

    #[tokio::test]
    async fn a_kept_alive_connection_writes_through_after_its_first_wait() {
        let (mut gather, mut client) = connected().await;
        gather.write_all(b"ticket|").await.expect("write");
        gather.handshake_done();
        gather.write_all(b"answer").await.expect("write");
        gather.flush().await.expect("flush");
        read_would_block(&mut gather).await;
        assert_eq!(arrived(&mut client, SOON).await, b"ticket|answer");
        gather.write_all(b"next").await.expect("write");
        gather.flush().await.expect("flush");
        assert_eq!(arrived(&mut client, SOON).await, b"next");
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
