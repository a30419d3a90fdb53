//! Lingering close: after an early error answer (400, 408, 413, 414, 431) the client may still
//! be sending the request the relay refused. Closing the socket with unread bytes makes the
//! kernel send a reset, and a client that is still writing then sees a broken pipe instead of
//! the answer. Like nginx's `lingering_close`, the relay keeps reading and discarding for a
//! bounded time and amount before it closes, so the client reads its status.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// How long a refused client's bytes are read and discarded at most (nginx: `lingering_time`).
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// How many of them at most.
pub const LINGER_BYTES: usize = 256 * 1024;

/// Whether an answer's status is one that may leave the request unread behind it.
pub fn refuses_request(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 408 | 413 | 414 | 431)
}

/// Reads and discards what `io` still receives until the client closes, [`LINGER_BYTES`] have
/// come, or [`LINGER_TIME`] has passed; then drops it (which closes the connection). Runs as a
/// task of its own: the connection's slot is already given back.
pub fn spawn<T: AsyncRead + Unpin + Send + 'static>(mut io: T) {
    tokio::spawn(async move {
        let until = Instant::now() + LINGER_TIME;
        let mut buf = vec![0u8; 16 * 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match tokio::time::timeout_at(until, io.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    });
}
