//! systemd notifications from the real binary, received on a real notify socket (a Unix
//! datagram socket the test binds, named by NOTIFY_SOCKET): READY=1 once serving, WATCHDOG=1
//! at half of WATCHDOG_USEC, RELOADING=1 (with MONOTONIC_USEC) then READY=1 around each reload,
//! good or refused, and STOPPING=1 on SIGTERM.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Pki;
use common::process::RelayProcess;
use tokio::net::UnixDatagram;

/// The notify socket and every message received so far.
struct Socket {
    sock: UnixDatagram,
    seen: Vec<String>,
    log: std::path::PathBuf,
}

impl Socket {
    /// Receives until a message satisfies `pred` (at most 10 s); returns it.
    async fn until(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = match tokio::time::timeout(left, self.sock.recv(&mut buf)).await {
                Ok(r) => r.expect("recv"),
                Err(_) => panic!(
                    "no {what} within 10 s; received {:#?}\nrelay log:\n{}",
                    self.seen,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            };
            let msg = String::from_utf8(buf[..n].to_vec()).expect("UTF-8 message");
            self.seen.push(msg.clone());
            if pred(&msg) {
                return msg;
            }
        }
    }
}

/// The value of `KEY=` in a notify message.
fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// A relay for `auth.example.test` on an ephemeral HTTPS port whose callback answers `status`.
fn write_config(path: &Path, pki: &Pki, status: u16) {
    let leaf = pki.leaf("relay", &["auth.example.test"]);
    let text = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nstorage = \"{}\"\n\n[health]\nupstream_probe_interval = \"0s\"\n\n\
         [[site]]\nhostnames = [\"auth.example.test\"]\n\n[site.tls]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [site.callback]\nstatus = {status}\n",
        pki.dir.path().join("certs").display(),
        leaf.cert_path.display(),
        leaf.key_path.display(),
    );
    std::fs::write(path, text).expect("write config");
}

#[tokio::test]
async fn the_binary_speaks_the_systemd_notify_protocol() {
    let pki = Pki::new();
    let socket_path = pki.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    let config = pki.dir.path().join("relay.toml");
    write_config(&config, &pki, 302);
    let mut relay = RelayProcess::serve(&config, &[], |cmd| {
        // WATCHDOG_USEC 200 ms: a ping every 100 ms.
        cmd.env("NOTIFY_SOCKET", &socket_path).env("WATCHDOG_USEC", "200000").env_remove("WATCHDOG_PID");
    });
    let mut s = Socket { sock, seen: Vec::new(), log: relay.log_path() };

    let ready = s.until("READY=1", |m| field(m, "READY") == Some("1")).await;
    assert!(field(&ready, "STATUS").is_some_and(|st| st.starts_with("serving 1 site(s), 1 hostname(s)")), "{ready}");
    // READY means serving: the listener accepts at once.
    let https = relay.https_addr().await;
    tokio::net::TcpStream::connect(https).await.expect("serving when READY=1 arrives");
    for _ in 0..2 {
        s.until("WATCHDOG=1", |m| field(m, "WATCHDOG") == Some("1")).await;
    }

    // A good reload: RELOADING=1 with the monotonic time, then READY=1.
    write_config(&config, &pki, 303);
    relay.signal("HUP");
    let reloading = s.until("RELOADING=1", |m| field(m, "RELOADING") == Some("1")).await;
    let usec: u64 = field(&reloading, "MONOTONIC_USEC").expect("MONOTONIC_USEC").parse().expect("a number");
    assert!(usec > 0);
    let ready = s.until("READY=1 after the reload", |m| field(m, "READY") == Some("1")).await;
    assert!(field(&ready, "STATUS").is_some_and(|st| st.starts_with("serving ")), "{ready}");

    // A refused reload ends with READY=1 too (the old configuration serves), and says so.
    write_config(&config, &pki, 200);
    relay.signal("HUP");
    let reloading = s.until("RELOADING=1", |m| field(m, "RELOADING") == Some("1")).await;
    let later: u64 = field(&reloading, "MONOTONIC_USEC").expect("MONOTONIC_USEC").parse().expect("a number");
    assert!(later > usec, "MONOTONIC_USEC moves forward");
    let ready = s.until("READY=1 after the refused reload", |m| field(m, "READY") == Some("1")).await;
    assert!(field(&ready, "STATUS").is_some_and(|st| st.starts_with("reload refused; still serving")), "{ready}");

    relay.signal("TERM");
    let stopping = s.until("STOPPING=1", |m| field(m, "STOPPING") == Some("1")).await;
    assert!(field(&stopping, "STATUS").is_some_and(|st| st.starts_with("stopping")), "{stopping}");
    let exit = relay.exit_within(Duration::from_secs(10)).await.expect("still running 10 s after SIGTERM");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn without_notify_socket_nothing_is_sent_and_the_relay_serves() {
    // The in-process relay of every other test runs without NOTIFY_SOCKET; this one checks the
    // binary too: no socket, no error in the log.
    let pki = Pki::new();
    let config = pki.dir.path().join("relay.toml");
    write_config(&config, &pki, 302);
    let mut relay = RelayProcess::serve(&config, &[], |cmd| {
        cmd.env_remove("NOTIFY_SOCKET").env_remove("WATCHDOG_USEC");
    });
    // Serving (a request answered), so SIGHUP is handled from here on.
    let client = common::TlsClient::new(relay.https_addr().await, pki.client_config(&[b"http/1.1"]));
    assert_eq!(client.get("auth.example.test", "/healthz").await.status, 200);
    relay.signal("HUP");
    relay.wait_for("configuration reloaded").await;
    let text = relay.log();
    assert!(!text.contains("NOTIFY_SOCKET") && !text.contains("watchdog"), "{text}");
}
