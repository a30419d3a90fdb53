//! Child processes: the relay binary as [`RelayProcess`] (started with `serve`, its output
//! captured to files, the addresses it bound read from its log, stopped with SIGTERM), and
//! [`ChildGuard`] for any child (HAProxy, tinyproxy) that must not outlive its test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long the relay may take to start (bind and log its listeners) or to exit after SIGTERM.
/// Generous: an instrumented build (`RELAY_BIN`) starts slowly and writes its profile on exit.
pub const PROCESS_BOUND: Duration = Duration::from_secs(30);

/// A free loopback address: bind port 0, read it, release it. Only for an address that must be
/// written into a file before the process that binds it starts (a proxy's config, the admin
/// address the `reload` command reads); a relay listening on port 0 says in its log which port
/// it got ([`RelayProcess::https_addr`]).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

/// `oauth-relay serve` as a child process, its stdout and stderr (the log) written to files of
/// its own; killed and reaped when dropped, however the test ends.
pub struct RelayProcess {
    child: ChildGuard,
    /// Holds `stdout` and `stderr`.
    dir: tempfile::TempDir,
    /// Set once the child has been reaped, so no signal goes to a pid the system may reuse.
    exited: Option<ExitStatus>,
}

impl RelayProcess {
    /// Starts `oauth-relay serve [extra...] --config CONFIG` with stdin closed and `RUST_LOG`
    /// unset (the built-in filter), then lets `env` adjust the environment.
    pub fn serve(config: &Path, extra: &[&str], env: impl FnOnce(&mut Command)) -> RelayProcess {
        Self::serve_bin(Path::new(env!("CARGO_BIN_EXE_oauth-relay")), config, extra, env)
    }

    /// [`RelayProcess::serve`] with another build of the binary (a release or instrumented one).
    pub fn serve_bin(bin: &Path, config: &Path, extra: &[&str], env: impl FnOnce(&mut Command)) -> RelayProcess {
        let dir = tempfile::tempdir().expect("a folder for the relay's output");
        let file = |name: &str| std::fs::File::create(dir.path().join(name)).expect("create an output file");
        let mut cmd = Command::new(bin);
        cmd.arg("serve").args(extra).arg("--config").arg(config).env_remove("RUST_LOG");
        env(&mut cmd);
        cmd.stdin(Stdio::null()).stdout(file("stdout")).stderr(file("stderr"));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        RelayProcess { child: ChildGuard(child), dir, exited: None }
    }

    /// Its process id (for `/proc/PID/status`).
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Where its stderr (the log) goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("stderr")
    }

    /// Everything it has logged (to stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Everything it has written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// Waits (every 20 ms, at most `within`) for a log line that satisfies `pred` and returns
    /// it; fails, showing the log, when the time is up or the relay exits first. `what` says in
    /// the failure what was awaited.
    pub async fn wait_line(&mut self, what: &str, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + within;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| pred(l)) {
                return line.to_string();
            }
            if let Some(status) = self.try_exit() {
                panic!("the relay exited ({status}) before logging {what}:\n{log}");
            }
            assert!(Instant::now() < until, "no {what} in the relay's log within {within:?}:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most 10 s) for a log line that contains `needle`; returns it.
    pub async fn wait_for(&mut self, needle: &str) -> String {
        self.wait_line(&format!("`{needle}`"), Duration::from_secs(10), |l| l.contains(needle)).await
    }

    /// The first HTTPS address it logged having bound (listen on port 0 and read the port it
    /// got, so no other test can take the port between a pick and the bind). Waits at most
    /// [`PROCESS_BOUND`]. Bound is not yet serving: connections wait in the backlog until the
    /// relay serves, and it handles SIGHUP only from then on (see [`RelayProcess::signal`]).
    pub async fn https_addr(&mut self) -> SocketAddr {
        self.logged_addr("serving HTTPS").await
    }

    /// The first plain-HTTP address it logged having bound (see [`RelayProcess::https_addr`]).
    pub async fn http_addr(&mut self) -> SocketAddr {
        self.logged_addr("serving plain HTTP (redirects to HTTPS)").await
    }

    /// The admin address it logged having bound (see [`RelayProcess::https_addr`]).
    pub async fn admin_addr(&mut self) -> SocketAddr {
        self.logged_addr("serving admin (health)").await
    }

    async fn logged_addr(&mut self, message: &str) -> SocketAddr {
        let line = self.wait_line(&format!("`{message}`"), PROCESS_BOUND, |l| addr_in(l, message).is_some()).await;
        addr_in(&line, message).expect("the address just found")
    }

    /// Sends `sig` ("TERM", "HUP") with kill(1) and asserts it was delivered. The relay installs
    /// its SIGHUP handler just before it starts serving: send HUP once it has answered something
    /// (a request, or READY=1 on the notify socket), not merely bound its ports.
    pub fn signal(&self, sig: &str) {
        assert!(self.exited.is_none(), "kill -{sig}: the relay already exited ({:?})", self.exited);
        self.child.signal(sig);
    }

    /// Its exit status once it has exited, waiting at most `bound`; `None` if still running.
    pub async fn exit_within(&mut self, bound: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.exit_within(bound).await;
        }
        self.exited
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.0.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// SIGTERM (unless it already exited), then at most [`PROCESS_BOUND`] for the exit: its exit
    /// status and everything it logged.
    pub async fn stop(&mut self) -> (ExitStatus, String) {
        if self.try_exit().is_none() {
            self.signal("TERM");
        }
        let status = self
            .exit_within(PROCESS_BOUND)
            .await
            .unwrap_or_else(|| panic!("the relay did not exit within {PROCESS_BOUND:?} of SIGTERM:\n{}", self.log()));
        (status, self.log())
    }
}

/// The address in the log line `line` if it is the event `message` (`"serving HTTPS"`), in
/// either log format: JSON (`{"message":"serving HTTPS","addr":"127.0.0.1:4433",...}`) or
/// pretty (`... INFO oauth_relay::cli: serving HTTPS addr=127.0.0.1:4433`).
fn addr_in(line: &str, message: &str) -> Option<SocketAddr> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        return if v["message"] == message { v["addr"].as_str()?.parse().ok() } else { None };
    }
    let (_, rest) = line.split_once(&format!(": {message} addr="))?;
    rest.split_whitespace().next()?.parse().ok()
}

/// A child process that is killed and reaped on drop, so none outlives its test.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Sends `sig` (e.g. "TERM", "HUP") with kill(1) and asserts it was delivered.
    pub fn signal(&self, sig: &str) {
        let pid = self.0.id().to_string();
        let sent = Command::new("kill").arg(format!("-{sig}")).arg(&pid).status().expect("run kill");
        assert!(sent.success(), "kill -{sig} {pid}");
    }

    /// Its exit status once it has exited, waiting at most `bound`; `None` if still running.
    pub async fn exit_within(&mut self, bound: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + bound;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
