//! What every attack test stands on: the relay binary as a child process with short deadlines
//! (so its `/metrics` and `/proc/PID/status` are its own), an attack client from
//! `tests/attacks/` as another child process, a legitimate client on a loopback address of its
//! own, and the checks that the relay lets go of what the attack took.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::process::{ChildGuard, RelayProcess};
use crate::common::{self, Pki, TlsClient};

/// The deadlines of every attack test's relay, unless the test names its own: short, so the
/// relay's own defences act within the attack's few seconds.
const LIMITS: [(&str, &str); 4] = [
    ("handshake_timeout", "\"1s\""),
    ("header_read_timeout", "\"1s\""),
    ("idle_timeout", "\"2s\""),
    ("send_timeout", "\"1s\""),
];

/// How long a legitimate client may wait for `/healthz` during an attack: generous, this is
/// whether it is served at all, not a benchmark.
pub const LEGIT_BOUND: Duration = Duration::from_secs(5);

/// How far above its level before the attack the relay's own memory (`RssAnon`) may stay once
/// the attack is over: the allocator keeps some freed memory, and the first burst of
/// connections sizes buffers and tables that stay.
const MEMORY_SLACK_KIB: u64 = 6 * 1024;

/// How long the relay may take to close what the attack left and give its memory back (the
/// heap is trimmed every 2 s after a burst).
const RECOVERY_BOUND: Duration = Duration::from_secs(10);

/// The legitimate client's address; the attack clients use 127.0.0.1 and 127.0.1.x.
const LEGIT_SOURCE: &str = "127.0.0.2";

/// A relay under attack.
pub struct Target {
    pub relay: RelayProcess,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pki: Pki,
    legit: TlsClient,
    /// `RssAnon` in KiB once started and warmed up.
    pub baseline_kib: u64,
}

impl Target {
    /// Starts the relay with [`LIMITS`] overridden and extended by `limits` (TOML values), and
    /// `site` lines for its one site, `auth.example.test`; warms it up and notes its memory.
    pub async fn start(limits: &[(&str, &str)], site: &str) -> Target {
        let pki = Pki::new();
        let leaf = pki.leaf("relay", &["auth.example.test"]);
        let mut table: Vec<(&str, &str)> =
            LIMITS.iter().filter(|(k, _)| !limits.iter().any(|(o, _)| o == k)).copied().collect();
        table.extend_from_slice(limits);
        let limits: String = table.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        let toml = format!(
            "[server]\nhttps = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\nstorage = \"{store}\"\n\n[limits]\n{limits}\n\
             [log]\naccess = false\n{site}",
            store = pki.dir.path().join("store").display(),
            site = common::files_site("auth", &["auth.example.test"], &leaf, site),
        );
        let config = pki.dir.path().join("relay.toml");
        std::fs::write(&config, toml).expect("write the relay's config");
        let mut relay = RelayProcess::serve(&config, &[], |_| {});
        let https = relay.https_addr().await;
        let admin = relay.admin_addr().await;
        let source: IpAddr = LEGIT_SOURCE.parse().unwrap();
        let legit = TlsClient::new(https, pki.client_config(&[b"http/1.1"])).with_source(source);
        let mut target = Target { relay, https, admin, pki, legit, baseline_kib: 0 };
        for _ in 0..3 {
            target.legit().await;
        }
        target.wait_open(0).await;
        target.baseline_kib = target.rss_anon_kib();
        target
    }

    /// One `GET /healthz` from the legitimate client on a fresh TLS connection: `200 ok` within
    /// [`LEGIT_BOUND`], or the test fails. Returns how long it took.
    pub async fn legit(&self) -> Duration {
        let start = Instant::now();
        let reply = tokio::time::timeout(LEGIT_BOUND, self.legit.get("auth.example.test", "/healthz"))
            .await
            .unwrap_or_else(|_| panic!("a legitimate client was not answered within {LEGIT_BOUND:?}"));
        assert_eq!((reply.status, reply.text()), (200, "ok"), "a legitimate client's /healthz");
        start.elapsed()
    }

    /// One labelled metric family from the admin listener, by label value.
    pub async fn metric(&self, name: &str, label: &str) -> BTreeMap<String, u64> {
        tokio::time::timeout(LEGIT_BOUND, common::client::scrape(self.admin, name, label))
            .await
            .unwrap_or_else(|_| panic!("the admin listener did not answer /metrics within {LEGIT_BOUND:?}"))
    }

    /// `oauth_relay_open_connections{listener="https"}`.
    pub async fn open(&self) -> u64 {
        self.metric("oauth_relay_open_connections", "listener").await["https"]
    }

    /// `oauth_relay_connection_closures_total{reason}`, summed over `reasons`.
    pub async fn closures(&self, reasons: &[&str]) -> u64 {
        let all = self.metric("oauth_relay_connection_closures_total", "reason").await;
        reasons.iter().map(|r| all.get(*r).copied().unwrap_or(0)).sum()
    }

    /// The relay's own memory: `RssAnon` (heap and stacks) in KiB, from `/proc/PID/status`.
    pub fn rss_anon_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.relay.pid())).expect("the relay's status");
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).expect("RssAnon in /proc/PID/status");
        line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("RssAnon in kB")
    }

    /// Waits (at most [`RECOVERY_BOUND`]) until at most `n` HTTPS connections are open.
    async fn wait_open(&self, n: u64) {
        let until = Instant::now() + RECOVERY_BOUND;
        loop {
            let open = self.open().await;
            if open <= n {
                return;
            }
            assert!(Instant::now() < until, "{open} connections still open {RECOVERY_BOUND:?} after the attack");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// After the attack: every HTTPS connection closes and the relay's memory comes back to
    /// within [`MEMORY_SLACK_KIB`] of where it was, both within [`RECOVERY_BOUND`]. Returns how
    /// long that took.
    pub async fn recovers(&self) -> Duration {
        let start = Instant::now();
        self.wait_open(0).await;
        loop {
            let now = self.rss_anon_kib();
            if now <= self.baseline_kib + MEMORY_SLACK_KIB {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < RECOVERY_BOUND,
                "RssAnon still {now} KiB {RECOVERY_BOUND:?} after the attack (before it: {} KiB)",
                self.baseline_kib
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts `tests/attacks/{script}` with `args` against this relay (`--seconds` bounds it;
    /// the client exits by itself).
    pub fn attack(&self, script: &str, args: &[&str]) -> Attack {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/attacks").join(script);
        let port = self.https.port().to_string();
        let ca = self.pki.ca_path.display().to_string();
        let fixed = ["--host", "127.0.0.1", "--port", &port, "--sni", "auth.example.test", "--ca", &ca];
        let mut command = Command::new("/usr/bin/python3");
        command.arg(&path).args(args).env("PYTHONDONTWRITEBYTECODE", "1").args(fixed);
        Attack::spawn(command, "scripts/test installs python3-h2")
    }

    /// Starts `h2load` (Debian's nghttp2-client) with `args` on `path` of this relay: its
    /// connections go to the relay's port, with the site's name as SNI and `:authority`.
    pub fn h2load(&self, path: &str, args: &[&str]) -> Attack {
        let mut command = Command::new("h2load");
        command
            .args(args)
            .arg(format!("--connect-to=127.0.0.1:{}", self.https.port()))
            .arg(format!("https://auth.example.test{path}"));
        Attack::spawn(command, "scripts/test installs nghttp2-client")
    }

    /// Runs the legitimate client over and over (each on a fresh connection, 100 ms apart)
    /// until `attack` ends, and notes the most connections and memory the relay held
    /// meanwhile. Fails if the client is not answered, or the attack client does not end
    /// within `bound`.
    pub async fn during(&self, attack: &mut Attack, bound: Duration) -> Seen {
        let mut seen = Seen::default();
        while attack.child.0.try_wait().expect("try_wait").is_none() {
            assert!(attack.started.elapsed() < bound, "the attack client still runs after {bound:?}");
            seen.legit.push(self.legit().await);
            seen.peak_open = seen.peak_open.max(self.open().await);
            seen.peak_kib = seen.peak_kib.max(self.rss_anon_kib());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen
    }
}

/// What [`Target::during`] saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Each legitimate request's time.
    pub legit: Vec<Duration>,
    /// The most HTTPS connections open at one sample.
    pub peak_open: u64,
    /// The highest `RssAnon` at one sample, KiB.
    pub peak_kib: u64,
}

/// An attack client running as a child process.
pub struct Attack {
    child: ChildGuard,
    dir: tempfile::TempDir,
    started: Instant,
}

impl Attack {
    /// Runs `command` with its output in files of a folder of its own; `hint` says where the
    /// program comes from when it cannot be started.
    fn spawn(mut command: Command, hint: &str) -> Attack {
        let dir = tempfile::tempdir().expect("a folder for the attack's output");
        let file = |name: &str| std::fs::File::create(dir.path().join(name)).expect("create an output file");
        let child = command
            .stdin(Stdio::null())
            .stdout(file("stdout"))
            .stderr(file("stderr"))
            .spawn()
            .unwrap_or_else(|e| panic!("run {command:?}: {e} ({hint})"));
        Attack { child: ChildGuard(child), dir, started: Instant::now() }
    }

    /// The client's standard output once it has ended (it must have exited 0).
    pub fn output(mut self) -> String {
        let status = self.child.0.wait().expect("wait for the attack client");
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        assert!(status.success(), "the attack client failed ({status}):\n{}\n{}", read("stdout"), read("stderr"));
        read("stdout")
    }

    /// The summary a client from `tests/attacks/` prints last, once it has ended.
    pub fn summary(self) -> serde_json::Value {
        let out = self.output();
        serde_json::from_str(out.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("the attack client's summary: {e}:\n{out}"))
    }
}

/// A number from an attack client's summary.
pub fn n(summary: &serde_json::Value, key: &str) -> f64 {
    summary[key].as_f64().unwrap_or_else(|| panic!("no `{key}` in {summary}"))
}
