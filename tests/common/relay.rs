//! The relay under test, run in-process through `oauth_relay::run_with` on ephemeral loopback
//! ports, with a handle to reload its configuration file.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use oauth_relay::reload::{ReloadHandle, Requests};
use oauth_relay::{Config, Listeners};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running relay; [`RelayUnderTest::stop`] shuts it down the way SIGTERM does.
pub struct RelayUnderTest {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub config: Arc<Config>,
    /// Re-reads the configuration file, as SIGHUP does (for a relay from [`RelayUnderTest::load`]).
    pub reload: ReloadHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), oauth_relay::BuildError>>>,
}

impl RelayUnderTest {
    /// Parses `toml` (listen on `127.0.0.1:0` to get ephemeral ports), binds and runs it.
    pub async fn start(toml: &str) -> RelayUnderTest {
        Self::run(Config::parse("test.toml", toml).unwrap_or_else(|e| panic!("config: {e}"))).await
    }

    /// Loads the configuration file at `path`, binds and runs it; `reload` re-reads that file.
    pub async fn load(path: &Path) -> RelayUnderTest {
        Self::run(Config::load(path).unwrap_or_else(|e| panic!("config: {e}"))).await
    }

    async fn run(config: Config) -> RelayUnderTest {
        let config = Arc::new(config);
        let listeners = Listeners::bind(&config).await.expect("bind");
        let https = listeners.https[0].local_addr().unwrap();
        let http = listeners.http.first().map(|l| l.local_addr().unwrap());
        let admin = listeners.admin.as_ref().map(|l| l.local_addr().unwrap());
        let requests = Requests::new();
        let reload = requests.handle();
        let (tx, rx) = oneshot::channel::<()>();
        let stopped = async move {
            let _ = rx.await;
        };
        let task = tokio::spawn(oauth_relay::run_with(config.clone(), listeners, stopped, requests));
        RelayUnderTest { https, http, admin, config, reload, stop: Some(tx), task: Some(task) }
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
