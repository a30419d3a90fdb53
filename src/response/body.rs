//! The one response body type: nothing, a small fixed body, or an upstream body streamed back
//! with an inactivity bound, which says how it ended (the access line of a streamed answer is
//! written then, so an answer the upstream cut off is not logged as a plain 200). An enum rather
//! than a boxed trait object, so the hot redirect path allocates nothing for its body.

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
    Upstream { body: UnsyncBoxBody<Bytes, BodyError>, idle: Duration, timer: Option<Pin<Box<Sleep>>>, end: EndHook },
}

/// How a streamed body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Every byte was passed on.
    Complete,
    /// The upstream broke off in the middle (a reset, a close before the end).
    UpstreamCut,
    /// The upstream went silent for longer than the bound.
    UpstreamStalled,
    /// The body was dropped before its end: the client went away (or the server stopped).
    ClientGone,
}

/// What is called once when a streamed body ends.
pub type OnEnd = Box<dyn FnOnce(BodyEnd) + Send>;

/// Calls its [`OnEnd`] once: at the body's end, or with [`BodyEnd::ClientGone`] when dropped.
#[derive(Default)]
pub struct EndHook(Option<OnEnd>);

impl EndHook {
    fn fire(&mut self, end: BodyEnd) {
        if let Some(f) = self.0.take() {
            f(end);
        }
    }
}

impl Drop for EndHook {
    fn drop(&mut self) {
        self.fire(BodyEnd::ClientGone);
    }
}

impl std::fmt::Debug for EndHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "EndHook(set)" } else { "EndHook" })
    }
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
        RelayBody::Upstream {
            body: body.map_err(Into::into).boxed_unsync(),
            idle,
            timer: None,
            end: EndHook::default(),
        }
    }

    /// Whether the body is streamed from the upstream, so that it ends only later.
    pub fn is_streamed(&self) -> bool {
        matches!(self, RelayBody::Upstream { .. })
    }

    /// Has `f` called once when a streamed body ends; `f` comes back for any other body, which
    /// is complete as it is.
    pub fn on_end(&mut self, f: OnEnd) -> Option<OnEnd> {
        match self {
            RelayBody::Upstream { end, body, .. } if !body.is_end_stream() => {
                end.0 = Some(f);
                None
            }
            _ => Some(f),
        }
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
            RelayBody::Upstream { body, idle, timer, end } => match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(frame) => {
                    *timer = None;
                    match &frame {
                        // hyper stops polling once the body says it has ended.
                        Some(Ok(_)) if body.is_end_stream() => end.fire(BodyEnd::Complete),
                        Some(Ok(_)) => {}
                        Some(Err(_)) => end.fire(BodyEnd::UpstreamCut),
                        None => end.fire(BodyEnd::Complete),
                    }
                    Poll::Ready(frame)
                }
                Poll::Pending => {
                    let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(*idle)));
                    ready!(t.as_mut().poll(cx));
                    end.fire(BodyEnd::UpstreamStalled);
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::{BodyExt, Empty, Full, StreamBody};

    use super::*;

    /// `body` streamed, with the end it reports kept in the returned cell.
    fn watched(body: RelayBody) -> (RelayBody, Arc<Mutex<Option<BodyEnd>>>) {
        let seen = Arc::new(Mutex::new(None));
        let mut body = body;
        let cell = seen.clone();
        assert!(body.on_end(Box::new(move |end| *cell.lock().unwrap() = Some(end))).is_none());
        (body, seen)
    }

    const IDLE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_streamed_body_says_how_it_ended() {
        let (body, seen) = watched(RelayBody::upstream(Full::new(Bytes::from_static(b"ab")), IDLE));
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"ab");
        assert_eq!(*seen.lock().unwrap(), Some(BodyEnd::Complete));

        let frames: Vec<Result<Frame<Bytes>, BodyError>> =
            vec![Ok(Frame::data(Bytes::from_static(b"a"))), Err("reset".into())];
        let cut = StreamBody::new(futures_util::stream::iter(frames));
        let (body, seen) = watched(RelayBody::upstream(cut, IDLE));
        assert!(body.collect().await.is_err());
        assert_eq!(*seen.lock().unwrap(), Some(BodyEnd::UpstreamCut));

        let (body, seen) = watched(RelayBody::upstream(Full::new(Bytes::from_static(b"ab")), IDLE));
        drop(body);
        assert_eq!(*seen.lock().unwrap(), Some(BodyEnd::ClientGone));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_upstream_body_ends_as_stalled() {
        let silent = StreamBody::new(futures_util::stream::pending::<Result<Frame<Bytes>, BodyError>>());
        let (body, seen) = watched(RelayBody::upstream(silent, IDLE));
        let err = body.collect().await.unwrap_err();
        assert!(err.is::<BodyStalled>(), "{err}");
        assert_eq!(*seen.lock().unwrap(), Some(BodyEnd::UpstreamStalled));
    }

    #[test]
    fn a_body_that_is_complete_already_gives_the_hook_back() {
        let mut empty = RelayBody::upstream(Empty::<Bytes>::new(), IDLE);
        assert!(empty.on_end(Box::new(|_| {})).is_some());
        assert!(RelayBody::full("x").on_end(Box::new(|_| {})).is_some());
        assert!(!RelayBody::full("x").is_streamed());
    }
}
