//! The relay under test, run in-process through `oauth_relay::run` on ephemeral loopback ports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use oauth_relay::{Config, Listeners};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running relay; [`RelayUnderTest::stop`] shuts it down the way SIGTERM does.
pub struct RelayUnderTest {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub config: Arc<Config>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), oauth_relay::RunError>>>,
}

impl RelayUnderTest {
    /// Parses `toml` (listen on `127.0.0.1:0` to get ephemeral ports), binds and runs it.
    pub async fn start(toml: &str) -> RelayUnderTest {
        let config = Arc::new(Config::parse("test.toml", toml).unwrap_or_else(|e| panic!("config: {e}")));
        let listeners = Listeners::bind(&config).await.expect("bind");
        let https = listeners.https[0].local_addr().unwrap();
        let http = listeners.http.first().map(|l| l.local_addr().unwrap());
        let admin = listeners.admin.as_ref().map(|l| l.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(oauth_relay::run(config.clone(), listeners, async move {
            let _ = rx.await;
        }));
        RelayUnderTest { https, http, admin, config, stop: Some(tx), task: Some(task) }
    }

    /// Signals shutdown and waits (at most 30 s) for `run` to return.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("relay stops within 30 s")
                .expect("relay task")
                .expect("relay run");
        }
    }

    /// Whether `run` has returned.
    pub fn finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for RelayUnderTest {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}
