//! A real `redis-server` (Debian's `redis-server` package) on a loopback port, with no
//! persistence, in a folder of its own; stopped when dropped. Optionally with an ACL user and
//! password, or TLS only (a certificate from the test PKI).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Pki;
use super::pebble::free_port;
use super::process::ChildGuard;

/// How a test's Redis is set up.
#[derive(Default)]
pub struct RedisOptions {
    /// An ACL user `(name, password)` allowed only keys and channels under `oauth-relay:`; the
    /// `default` user is then turned off.
    pub user: Option<(String, String)>,
    /// Serve TLS only, with a leaf from this PKI for `localhost` and 127.0.0.1.
    pub tls: Option<Pki>,
}

/// A running Redis.
pub struct Redis {
    pub port: u16,
    child: ChildGuard,
    dir: tempfile::TempDir,
    pub tls: Option<Pki>,
    args: Vec<String>,
}

impl Redis {
    /// A plain Redis with the default user and no password.
    pub async fn start() -> Redis {
        Self::start_with(RedisOptions::default()).await
    }

    /// Starts `redis-server` and waits (at most 10 s) until it answers `PING`.
    pub async fn start_with(opts: RedisOptions) -> Redis {
        let dir = tempfile::tempdir().expect("a folder for redis");
        let port = free_port();
        let mut args: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--dir".into(), dir.path().display().to_string()]);
        match &opts.tls {
            Some(pki) => {
                let leaf = pki.leaf("redis", &["localhost", "127.0.0.1"]);
                args.extend(["--port".into(), "0".into(), "--tls-port".into(), port.to_string()]);
                args.extend(["--tls-cert-file".into(), leaf.cert_path.display().to_string()]);
                args.extend(["--tls-key-file".into(), leaf.key_path.display().to_string()]);
                args.extend(["--tls-ca-cert-file".into(), pki.ca_path.display().to_string()]);
                args.extend(["--tls-auth-clients".into(), "no".into()]);
            }
            None => args.extend(["--port".into(), port.to_string()]),
        }
        if let Some((user, password)) = &opts.user {
            // An ACL file, so the rules are what a managed Redis would give the relay: its
            // own keys and channel, scripts, INFO; no CONFIG, no FLUSHALL.
            let acl = dir.path().join("users.acl");
            let rules = format!(
                "user default off\nuser {user} on >{password} ~oauth-relay:* &oauth-relay:* \
                 +@read +@write +@scripting +@pubsub +@connection +info -@dangerous +info\n"
            );
            std::fs::write(&acl, rules).expect("write the ACL file");
            args.extend(["--aclfile".into(), acl.display().to_string()]);
        }
        let child = Self::spawn(dir.path(), &args);
        let mut redis = Redis { port, child, dir, tls: opts.tls, args };
        redis.wait_up().await;
        redis
    }

    fn spawn(dir: &std::path::Path, args: &[String]) -> ChildGuard {
        let log = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).expect("log file"));
        let child = Command::new("redis-server")
            .args(args)
            .stdout(log("redis.log"))
            .stderr(log("redis.err"))
            .spawn()
            .expect("redis-server (scripts/test installs redis-server)");
        ChildGuard(child)
    }

    async fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers().await {
            if let Ok(Some(status)) = self.child.0.try_wait() {
                panic!("redis-server exited ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "redis-server did not answer within 10 s: {}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the server again on its port after [`Redis::kill`], empty (it keeps nothing on
    /// disk), as a Redis that lost its data would come back.
    pub async fn restart_empty(&mut self) {
        self.kill();
        self.child = Self::spawn(self.dir.path(), &self.args);
        self.wait_up().await;
    }

    /// Whether the port takes connections (TLS or not, a TCP connect is enough to know the
    /// server is up).
    async fn answers(&self) -> bool {
        tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok()
    }

    /// `redis://127.0.0.1:{port}/0`, or `rediss://localhost:{port}/0` with TLS.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://localhost:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// The folder the server runs in.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Stops the server (SIGKILL: as abrupt as a lost node) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }

    /// `redis-cli` against this server with `args`, its output (plain servers only).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (from redis-tools, installed with redis-server)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
