//! The one response body type: nothing, a small fixed body, or an upstream body streamed back
//! with an inactivity bound. An enum rather than a boxed trait object, so the hot redirect path
//! allocates nothing for its body.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::time::Sleep;

/// Errors a response body can end with; hyper then resets the stream or closes the connection.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A response body.
#[derive(Debug, Default)]
pub enum RelayBody {
    /// No body.
    #[default]
    Empty,
    /// A small body held in memory (pages, errors, health).
    Full(Option<Bytes>),
    /// An upstream response body, streamed; a silence longer than `idle` ends it. Boxed: the
    /// upstream client's body type lives above this module.
    Upstream { body: UnsyncBoxBody<Bytes, BodyError>, idle: Duration, timer: Option<Pin<Box<Sleep>>> },
}

impl RelayBody {
    /// A fixed body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        RelayBody::Full(Some(bytes.into()))
    }

    /// An upstream body that fails when the upstream stays silent for `idle`.
    pub fn upstream<B>(body: B, idle: Duration) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BodyError>,
    {
        RelayBody::Upstream { body: body.map_err(Into::into).boxed_unsync(), idle, timer: None }
    }
}

/// The upstream went silent in the middle of a response body.
#[derive(Debug, thiserror::Error)]
#[error("upstream response body stalled")]
pub struct BodyStalled;

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RelayBody::Empty => Poll::Ready(None),
            RelayBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RelayBody::Upstream { body, idle, timer } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(frame) => {
                    *timer = None;
                    Poll::Ready(frame)
                }
                Poll::Pending => {
                    let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(*idle)));
                    ready!(t.as_mut().poll(cx));
                    Poll::Ready(Some(Err(BodyStalled.into())))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RelayBody::Empty => true,
            RelayBody::Full(b) => b.is_none(),
            RelayBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RelayBody::Empty => SizeHint::with_exact(0),
            RelayBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RelayBody::Full(None) => SizeHint::with_exact(0),
            RelayBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}
