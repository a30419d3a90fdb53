//! The relay under test, run in-process through `oauth_relay::run_with` on ephemeral loopback
//! ports (or on listeners the test bound itself), with a handle to reload its configuration
//! file and a way to ask it whether it is ready.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oauth_relay::reload::{ReloadHandle, Requests};
use oauth_relay::{Config, Listeners};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::client::plain_get;

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
        Self::with_config(parse(toml)).await
    }

    /// Loads the configuration file at `path`, binds and runs it; `reload` re-reads that file.
    pub async fn load(path: &Path) -> RelayUnderTest {
        Self::with_config(Config::load(path).unwrap_or_else(|e| panic!("config: {e}"))).await
    }

    /// Binds the listeners `config` names and runs it (a configuration made some other way than
    /// from a file, such as the embedded one).
    pub async fn with_config(config: Config) -> RelayUnderTest {
        let listeners = Listeners::bind(&config).await.expect("bind");
        Self::spawn(config, listeners)
    }

    /// Parses `toml` and runs it on `listeners`, which the test bound beforehand (to tell an
    /// ACME server their ports before the relay starts, or to take over another relay's ports);
    /// the listen addresses in `toml` are not bound.
    pub fn on(toml: &str, listeners: Listeners) -> RelayUnderTest {
        Self::spawn(parse(toml), listeners)
    }

    /// Loads the configuration file at `path` and runs it on `listeners` bound beforehand;
    /// `reload` re-reads that file.
    pub fn load_on(path: &Path, listeners: Listeners) -> RelayUnderTest {
        Self::spawn(Config::load(path).unwrap_or_else(|e| panic!("config: {e}")), listeners)
    }

    fn spawn(config: Config, listeners: Listeners) -> RelayUnderTest {
        let config = Arc::new(config);
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

    /// `GET /readyz` over plain HTTP, on the admin listener if there is one, else on the
    /// plain-HTTP listener (readiness is answered before any Host check): status and body.
    pub async fn readyz(&self) -> (u16, String) {
        let addr = self.admin.or(self.http).expect("an admin or plain-HTTP listener to ask /readyz on");
        let r = plain_get(addr, "localhost", "/readyz").await;
        (r.status, r.text().to_string())
    }

    /// Polls `/readyz` (every 20 ms, at most `within`) until `pred` holds of its status and
    /// body, and returns them; `what` says in the failure what was awaited.
    pub async fn wait_readyz(&self, what: &str, within: Duration, pred: impl Fn(u16, &str) -> bool) -> (u16, String) {
        let until = Instant::now() + within;
        loop {
            let (status, body) = self.readyz().await;
            if pred(status, &body) {
                return (status, body);
            }
            assert!(Instant::now() < until, "{what}: /readyz still {status} after {within:?}:\n{body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most 20 s) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        self.wait_readyz("ready", Duration::from_secs(20), |s, _| s == 200).await;
    }
}

fn parse(toml: &str) -> Config {
    Config::parse("test.toml", toml).unwrap_or_else(|e| panic!("config: {e}"))
}

impl Drop for RelayUnderTest {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}
