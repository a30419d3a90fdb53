//! Reload requests: SIGHUP, `oauth-relay reload` and `POST /reload` on the admin listener all
//! end in the channel made here, which [`crate::run_with`] serves with
//! [`crate::app::App::reload`].

use tokio::sync::{mpsc, oneshot};

pub use crate::app::{ReloadError, Reloaded};

type Reply = oneshot::Sender<Result<Reloaded, ReloadError>>;

/// Asks a running relay to reload. Cheap to clone; main.rs hands SIGHUP to one.
#[derive(Clone, Debug)]
pub struct ReloadHandle {
    tx: mpsc::Sender<Option<Reply>>,
}

impl ReloadHandle {
    /// Reloads and waits for the outcome.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Some(tx)).await.map_err(|_| ReloadError::Stopped)?;
        rx.await.unwrap_or(Err(ReloadError::Stopped))
    }

    /// Asks for a reload without waiting (a signal); the outcome is only logged. Requests made
    /// while one is queued are merged into it.
    pub fn request(&self) {
        let _ = self.tx.try_send(None);
    }
}

/// The receiving end, given to [`crate::run_with`].
#[derive(Debug)]
pub struct Requests {
    handle: ReloadHandle,
    rx: mpsc::Receiver<Option<Reply>>,
}

impl Default for Requests {
    fn default() -> Self {
        Self::new()
    }
}

impl Requests {
    pub fn new() -> Requests {
        // A few waiting callers at most; more SIGHUPs than that are the same reload.
        let (tx, rx) = mpsc::channel(8);
        Requests { handle: ReloadHandle { tx }, rx }
    }

    /// A handle that sends to these requests.
    pub fn handle(&self) -> ReloadHandle {
        self.handle.clone()
    }

    /// The next request: `Some(reply)` when a caller waits for the outcome, `None` for a
    /// signal. Never ends while `self` holds a sender.
    pub(crate) async fn next(&mut self) -> Option<Reply> {
        self.rx.recv().await.flatten()
    }
}
