//! The relay binary as a child process: a free loopback address to put in its config, a way to
//! start `oauth-relay serve`, and a guard that kills and reaps it when the test ends, however it
//! ends.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A free loopback address: bind port 0, read it, release it.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

/// Starts `oauth-relay serve [extra...] --config CONFIG` with stdin and stdout closed and stderr
/// written to `log`; `env` adjusts the environment first.
pub fn serve(config: &Path, extra: &[&str], log: &Path, env: impl FnOnce(&mut Command)) -> ChildGuard {
    serve_bin(Path::new(env!("CARGO_BIN_EXE_oauth-relay")), config, extra, log, env)
}

/// [`serve`] with another build of the binary (a release or instrumented build).
pub fn serve_bin(bin: &Path, config: &Path, extra: &[&str], log: &Path, env: impl FnOnce(&mut Command)) -> ChildGuard {
    let mut cmd = Command::new(bin);
    cmd.arg("serve").args(extra).arg("--config").arg(config);
    env(&mut cmd);
    let stderr = std::fs::File::create(log).expect("create the log file");
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).spawn().expect("spawn oauth-relay");
    ChildGuard(child)
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

/// Whether `addr` accepts TCP connections within `bound` (a child process has bound it).
pub async fn listening_within(addr: SocketAddr, bound: Duration) -> bool {
    let until = Instant::now() + bound;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
