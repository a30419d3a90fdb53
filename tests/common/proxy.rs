//! A real outbound HTTP proxy for tests: Debian's `tinyproxy` on a free loopback port, logging
//! every request line it gets (so a test can see which `CONNECT`s went through it), optionally
//! asking for Basic credentials. Killed and waited for when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{ChildGuard, free_addr};

/// A running tinyproxy.
pub struct Proxy {
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _child: ChildGuard,
}

impl Proxy {
    /// Starts tinyproxy; with `credentials`, only requests carrying them are served (407 else).
    /// Waits (at most 10 s) until it accepts connections.
    pub async fn start(credentials: Option<(&str, &str)>) -> Proxy {
        for _ in 0..3 {
            if let Some(p) = Self::try_start(credentials).await {
                return p;
            }
            eprintln!("tinyproxy exited during start (its port was taken?); retrying on a fresh port");
        }
        panic!("tinyproxy did not start three times");
    }

    async fn try_start(credentials: Option<(&str, &str)>) -> Option<Proxy> {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = free_addr();
        let log = dir.path().join("tinyproxy.log");
        // No `ConnectPort` line: CONNECT to any port (the test upstreams use ephemeral ones).
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{log}\"\nLogLevel Connect\nMaxClients 100\n\
             Allow 127.0.0.1\n",
            port = addr.port(),
            log = log.display(),
        );
        if let Some((user, password)) = credentials {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let conf_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).expect("write tinyproxy.conf");
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run tinyproxy (scripts/test installs Debian's tinyproxy)");
        let mut child = ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if child.0.try_wait().expect("try_wait").is_some() {
                return None;
            }
            assert!(Instant::now() < deadline, "tinyproxy did not listen on {addr} within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(Proxy { addr, log, _dir: dir, _child: child })
    }

    /// The proxy URL for `[outbound] proxy`, with these credentials in it.
    pub fn url(&self, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((user, password)) => format!("http://{user}:{password}@{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// The targets of the `CONNECT` requests the proxy received so far (`127.0.0.1:8443`).
    pub fn connects(&self) -> Vec<String> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.split_once("): CONNECT ").map(|(_, rest)| rest.trim_end_matches(" HTTP/1.1").to_string()))
            .collect()
    }
}
