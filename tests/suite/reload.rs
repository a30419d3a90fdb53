//! Configuration reload: a valid file takes effect for the next connection and the next request
//! on an open one, an invalid file is refused and the old configuration stays, and in both
//! cases a client sending requests all along (keep-alive and new connections) sees no failure.
//! In-process through `run_with`, over `POST /reload` on the admin listener, and on the real
//! binary with SIGHUP and `oauth-relay reload`.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::client::Reply;
use common::pki::Leaf;
use common::process::RelayProcess;
use common::{Pki, RelayUnderTest, TlsClient};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use oauth_relay::Config;
use oauth_relay::reload::ReloadError;

const BIN: &str = env!("CARGO_BIN_EXE_oauth-relay");
const HOST: &str = "auth.example.test";
const NEW_HOST: &str = "new.example.test";
const CALLBACK: &str = "/v1/auth/callback?code=c&state=s";

/// What a configuration file says; [`Setup::write`] renders it.
#[derive(Clone)]
struct Shape {
    https: String,
    admin: Option<String>,
    callback_status: u16,
    /// Adds a second site, `new.example.test`, in front of another upstream.
    second_site: bool,
    /// Raw lines appended to `[server]` (e.g. a mistake).
    server_extra: String,
}

impl Shape {
    fn new(https: &str, admin: Option<&str>) -> Shape {
        Shape {
            https: https.into(),
            admin: admin.map(Into::into),
            callback_status: 302,
            second_site: false,
            server_extra: String::new(),
        }
    }
}

/// A temp folder with the PKI, the certificates and the configuration file.
struct Setup {
    pki: Pki,
    leaf: Leaf,
    new_leaf: Leaf,
    path: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let pki = Pki::new();
        let leaf = pki.leaf("auth", &[HOST]);
        let new_leaf = pki.leaf("new", &[NEW_HOST]);
        let path = pki.dir.path().join("relay.toml");
        Setup { pki, leaf, new_leaf, path }
    }

    fn write(&self, s: &Shape) {
        let site = |name: &str, host: &str, upstream: &str, leaf: &Leaf, status: u16| {
            format!(
                "[[site]]\nname = \"{name}\"\nhostnames = [\"{host}\"]\nupstream = \"{upstream}\"\n\n\
                 [site.tls]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
                 [site.callback]\nstatus = {status}\n\n",
                leaf.cert_path.display(),
                leaf.key_path.display()
            )
        };
        let mut text = format!(
            "[server]\nhttps = [\"{}\"]\nstorage = \"{}\"\n{}{}\n\n[health]\nupstream_probe_interval = \"0s\"\n\n",
            s.https,
            self.pki.dir.path().join("certs").display(),
            s.admin.as_ref().map(|a| format!("admin = \"{a}\"\n")).unwrap_or_default(),
            s.server_extra,
        );
        text.push_str(&site("auth", HOST, "https://broker.example.test", &self.leaf, s.callback_status));
        if s.second_site {
            text.push_str(&site("new", NEW_HOST, "https://broker2.example.test", &self.new_leaf, 302));
        }
        std::fs::write(&self.path, text).expect("write config");
    }

    /// The 1-based line of the first line of the file that contains `needle`.
    fn line_of(&self, needle: &str) -> usize {
        let text = std::fs::read_to_string(&self.path).unwrap();
        text.lines().position(|l| l.contains(needle)).expect("needle in config") + 1
    }

    fn client(&self, addr: SocketAddr) -> TlsClient {
        TlsClient::new(addr, self.pki.client_config(&[b"http/1.1"]))
    }
}

/// A configuration of `Shape::new("127.0.0.1:0", admin)`, the relay started in-process on it,
/// and a client for it.
async fn start_in_process(admin: Option<&str>) -> (Setup, Shape, RelayUnderTest, TlsClient) {
    let setup = Setup::new();
    let shape = Shape::new("127.0.0.1:0", admin);
    setup.write(&shape);
    let relay = RelayUnderTest::load(&setup.path).await;
    let client = setup.client(relay.https);
    (setup, shape, relay, client)
}

/// Requests sent continuously while a test reloads: one keep-alive connection opened before the
/// reload, and a new connection for every other request.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<LoadReport>,
}

#[derive(Debug, Default)]
struct LoadReport {
    /// Callback statuses seen on the one keep-alive connection, in order.
    keep_alive: Vec<u16>,
    /// Callback statuses seen on new connections, in order.
    fresh: Vec<u16>,
    failures: Vec<String>,
}

impl Load {
    async fn start(client: TlsClient) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // The keep-alive connection exists before the test goes on.
        let mut keep_alive = h1(&client).await.expect("keep-alive connection");
        let task = tokio::spawn(async move {
            let mut report = LoadReport::default();
            while !flag.load(Ordering::Relaxed) {
                match callback(&mut keep_alive).await {
                    Ok(s @ (302 | 303)) => report.keep_alive.push(s),
                    Ok(s) => report.failures.push(format!("keep-alive: status {s}")),
                    Err(e) => {
                        report.failures.push(format!("keep-alive: {e}"));
                        break;
                    }
                }
                let fresh = async { callback(&mut h1(&client).await?).await };
                match fresh.await {
                    Ok(s @ (302 | 303)) => report.fresh.push(s),
                    Ok(s) => report.failures.push(format!("new connection: status {s}")),
                    Err(e) => report.failures.push(format!("new connection: {e}")),
                }
            }
            report
        });
        Load { stop, task }
    }

    /// Stops the load and returns what it saw.
    async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(20), self.task).await.expect("load stops").expect("load task")
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn h1(client: &TlsClient) -> Result<Sender, String> {
    let tls = client.connect(HOST).await.map_err(|e| format!("handshake: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One callback GET on `sender`, within 10 s; its status.
async fn callback(sender: &mut Sender) -> Result<u16, String> {
    let req = http::Request::get(CALLBACK).header("host", HOST).body(Full::new(Bytes::new())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "no response within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(status)
}

/// Sends `n` callbacks on new connections beside the load, each a redirect: a bounded way to
/// let the load run for a while (no sleeping).
async fn let_load_run(client: &TlsClient, n: usize) {
    for _ in 0..n {
        let r = client.get(HOST, CALLBACK).await;
        assert!(matches!(r.status, 302 | 303), "status {}", r.status);
    }
}

/// A plain-HTTP/1.1 request to the admin listener.
async fn admin(addr: SocketAddr, method: &str, target: &str) -> Reply {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect admin");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("h1");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
        .await
        .expect("admin answers within 20 s")
        .expect("admin response");
    let (parts, body) = resp.into_parts();
    Reply { status: parts.status.as_u16(), headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
}

fn assert_switched(report: &LoadReport) {
    assert!(report.failures.is_empty(), "failed requests during the reload: {:#?}", report.failures);
    for (what, seen) in [("keep-alive", &report.keep_alive), ("new connections", &report.fresh)] {
        let first_new = seen.iter().position(|s| *s == 303).unwrap_or_else(|| panic!("{what} never saw 303"));
        assert!(first_new > 0, "{what} saw the old behaviour before the reload");
        assert!(seen[first_new..].iter().all(|s| *s == 303), "{what} went back to 302 after the reload: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_switches_routes_and_sites_without_failed_requests() {
    let (setup, shape, mut relay, client) = start_in_process(None).await;
    let serial_before = client.peer_serial(HOST).await;
    assert!(client.connect(NEW_HOST).await.is_err(), "the new hostname is not served yet");

    let load = Load::start(client.clone()).await;
    let_load_run(&client, 10).await;
    setup.write(&Shape { callback_status: 303, second_site: true, ..shape });
    let reloaded = relay.reload.reload().await.expect("reload");
    assert!(reloaded.warnings.is_empty(), "{:?}", reloaded.warnings);
    // The very next request uses the new configuration.
    let r = client.get(HOST, CALLBACK).await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), "https://broker.example.test/v1/auth/callback?code=c&state=s");
    let_load_run(&client, 10).await;
    let report = load.finish().await;
    assert_switched(&report);

    // The new site is served with its own certificate; the unchanged one kept its certificate.
    assert_eq!(client.peer_serial(NEW_HOST).await, setup.new_leaf.serial);
    let r = client.get(NEW_HOST, CALLBACK).await;
    assert_eq!((r.status, r.header("location")), (302, "https://broker2.example.test/v1/auth/callback?code=c&state=s"));
    assert_eq!(client.peer_serial(HOST).await, serial_before);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_across_a_reload() {
    let (setup, shape, mut relay, client) = start_in_process(None).await;
    // A request reads the session ticket that follows the handshake.
    assert_eq!(client.get(HOST, CALLBACK).await.status, 302);
    setup.write(&Shape { callback_status: 303, ..shape });
    relay.reload.reload().await.expect("reload");
    let tls = client.connect(HOST).await.expect("handshake");
    assert_eq!(tls.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    drop(tls);
    assert_eq!(client.get(HOST, CALLBACK).await.status, 303);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_balancer_put_in_front_takes_a_reload() {
    let (setup, shape, mut relay, client) = start_in_process(None).await;
    assert_eq!(client.get(HOST, CALLBACK).await.status, 302);
    setup.write(&Shape { server_extra: "proxy_protocol_from = [\"127.0.0.1\"]".into(), ..shape });
    relay.reload.reload().await.expect("reload");
    // New connections now need the balancer's header.
    assert!(client.connect(HOST).await.is_err(), "a handshake without a PROXY header");
    let behind = client.with_preamble(&[b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 443\r\n"]);
    assert_eq!(behind.get(HOST, CALLBACK).await.status, 302);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_13_only_policy_takes_a_reload() {
    let (setup, shape, mut relay, _) = start_in_process(None).await;
    let tls12 = TlsClient::new(relay.https, setup.pki.client_config_for(&[&rustls::version::TLS12], &[b"http/1.1"]));
    assert!(tls12.connect(HOST).await.is_ok(), "TLS 1.2 before the reload");
    setup.write(&Shape { server_extra: "min_tls_version = \"1.3\"".into(), ..shape });
    relay.reload.reload().await.expect("reload");
    assert!(tls12.connect(HOST).await.is_err(), "TLS 1.2 refused after it");
    assert_eq!(setup.client(relay.https).get(HOST, CALLBACK).await.status, 302, "TLS 1.3 still served");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_refused_and_the_old_one_stays_in_force() {
    let (setup, shape, mut relay, client) = start_in_process(None).await;
    let load = Load::start(client.clone()).await;
    let_load_run(&client, 5).await;

    setup.write(&Shape { callback_status: 304, server_extra: "hsts = \"nope\"".into(), ..shape.clone() });
    let err = relay.reload.reload().await.expect_err("refused");
    let file = setup.path.display().to_string();
    assert_eq!(
        err.lines(),
        vec![
            format!(
                "{file}:{}: server.hsts: must be a Strict-Transport-Security value such as \"max-age=31536000\", or \"\" to send none",
                setup.line_of("hsts")
            ),
            format!("{file}:{}: site[0].callback.status: 304: use 302, 303 or 307", setup.line_of("status = 304")),
        ]
    );
    let_load_run(&client, 5).await;
    let report = load.finish().await;
    assert!(report.failures.is_empty(), "failed requests: {:#?}", report.failures);
    assert!(report.keep_alive.iter().chain(&report.fresh).all(|s| *s == 302), "the old config stays: {report:?}");

    // A file that parses but cannot be served (a certificate that cannot be read) is refused too.
    std::fs::remove_file(&setup.new_leaf.key_path).unwrap();
    setup.write(&Shape { second_site: true, ..shape.clone() });
    let err = relay.reload.reload().await.expect_err("refused");
    assert!(matches!(err, ReloadError::Build(_)), "{err:?}");
    assert!(err.to_string().contains("new.key"), "{err}");
    assert!(client.connect(NEW_HOST).await.is_err(), "the refused site is not served");
    assert_eq!(client.get(HOST, CALLBACK).await.status, 302);

    // Fixed: the next reload goes through.
    setup.write(&Shape { callback_status: 307, ..shape });
    relay.reload.reload().await.expect("reload");
    assert_eq!(client.get(HOST, CALLBACK).await.status, 307);
    relay.stop().await;
}

#[tokio::test]
async fn admin_reload_endpoint_answers_200_400_and_405() {
    let (setup, shape, mut relay, client) = start_in_process(Some("127.0.0.1:0")).await;
    let addr = relay.admin.expect("admin");

    let r = admin(addr, "GET", "/reload").await;
    assert_eq!((r.status, r.header("allow")), (405, "POST"));
    // Only the admin listener reloads.
    assert_eq!(client.send(HOST, "POST", "/reload", &[], "").await.status, 404);

    setup.write(&Shape { callback_status: 303, ..shape.clone() });
    let r = admin(addr, "POST", "/reload").await;
    assert_eq!((r.status, r.text()), (200, "reloaded\n"));
    assert_eq!(client.get(HOST, CALLBACK).await.status, 303);

    setup.write(&Shape { callback_status: 301, ..shape.clone() });
    let r = admin(addr, "POST", "/reload").await;
    let want = format!(
        "{}:{}: site[0].callback.status: 301: use 302, 303 or 307\n",
        setup.path.display(),
        setup.line_of("301")
    );
    assert_eq!((r.status, r.text()), (400, want.as_str()));
    assert_eq!(client.get(HOST, CALLBACK).await.status, 303, "the refused file changed nothing");

    // Listen addresses need a restart: the reload goes through and says so.
    setup.write(&Shape { admin: Some("127.0.0.1:1".into()), ..shape });
    let r = admin(addr, "POST", "/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        "reloaded\nwarning: server.admin changed from 127.0.0.1:0 to 127.0.0.1:1: listen addresses change only on \
         restart; still listening on 127.0.0.1:0\n"
    );
    assert_eq!(admin(addr, "GET", "/healthz").await.status, 200, "still on the old admin address");
    relay.stop().await;
}

#[tokio::test]
async fn the_embedded_config_cannot_be_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nstorage = \"{}\"\n\n[[site]]\nhostnames = [\"localhost\"]\n",
        dir.path().display()
    );
    let config = Config::parse(oauth_relay::config::EMBEDDED_NAME, &text).expect("config");
    let mut relay = RelayUnderTest::with_config(config).await;
    let err = relay.reload.reload().await.expect_err("refused");
    assert!(matches!(err, ReloadError::Embedded), "{err:?}");
    assert!(err.to_string().contains("start the relay with --config FILE"), "{err}");
    relay.stop().await;
    // After the relay stopped, a reload request says so instead of waiting.
    assert!(matches!(relay.reload.reload().await, Err(ReloadError::Stopped)));
}

/// A configuration with an admin listener on a free port (the `reload` command reads it from the
/// file) and HTTPS on port 0, the relay binary started on it, a client for it, and the admin
/// address (the binary's twin of `start_in_process`). Running the `reload` command blocks the
/// test's runtime for a moment; the relay is another process, so that is fine.
async fn start_binary() -> (Setup, Shape, RelayProcess, TlsClient, SocketAddr) {
    let setup = Setup::new();
    let admin_addr = common::process::free_addr();
    let shape = Shape::new("127.0.0.1:0", Some(&admin_addr.to_string()));
    setup.write(&shape);
    let mut relay = RelayProcess::serve(&setup.path, &["--log-format", "json"], |cmd| {
        cmd.env("RUST_LOG", "info");
    });
    assert_eq!(relay.admin_addr().await, admin_addr);
    let client = setup.client(relay.https_addr().await);
    (setup, shape, relay, client, admin_addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_under_load_and_keeps_it_on_a_bad_file() {
    let (setup, shape, mut relay, client, _) = start_binary().await;

    // A bad file first: refused, logged with its problem, and the relay goes on unchanged.
    let load = Load::start(client.clone()).await;
    let_load_run(&client, 5).await;
    setup.write(&Shape { callback_status: 304, ..shape.clone() });
    relay.signal("HUP");
    relay.wait_for("configuration reload refused").await;
    let problem =
        format!("{}:{}: site[0].callback.status: 304: use 302, 303 or 307", setup.path.display(), setup.line_of("304"));
    assert!(relay.log().contains(&problem.replace('"', "\\\"")), "the problem is logged:\n{}", relay.log());
    let_load_run(&client, 5).await;
    let report = load.finish().await;
    assert!(report.failures.is_empty(), "failed requests: {:#?}", report.failures);
    assert!(report.keep_alive.iter().chain(&report.fresh).all(|s| *s == 302), "{report:?}");

    // Then a good one.
    let load = Load::start(client.clone()).await;
    let_load_run(&client, 5).await;
    setup.write(&Shape { callback_status: 303, second_site: true, ..shape });
    relay.signal("HUP");
    relay.wait_for("configuration reloaded").await;
    assert_eq!(client.get(HOST, CALLBACK).await.status, 303);
    let_load_run(&client, 5).await;
    let report = load.finish().await;
    assert_switched(&report);
    assert_eq!(client.peer_serial(NEW_HOST).await, setup.new_leaf.serial);

    let (status, _) = relay.stop().await;
    assert_eq!(status.code(), Some(0));
}

fn reload_cli(config: &Path) -> std::process::Output {
    Command::new(BIN).args(["reload", "--config"]).arg(config).stdin(Stdio::null()).output().expect("run reload")
}

#[tokio::test]
async fn reload_command_talks_to_the_running_binary() {
    let (setup, shape, mut relay, client, admin_addr) = start_binary().await;

    setup.write(&Shape { callback_status: 307, ..shape.clone() });
    let out = reload_cli(&setup.path);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "reloaded\n", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(client.get(HOST, CALLBACK).await.status, 307);

    // Valid TOML the relay cannot serve: the relay's refusal is printed, exit 1.
    std::fs::remove_file(&setup.new_leaf.cert_path).unwrap();
    setup.write(&Shape { second_site: true, ..shape.clone() });
    let out = reload_cli(&setup.path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("the relay refused the reload (400):\n"), "{stderr}");
    assert!(stderr.contains(&format!("{}: cannot read", setup.new_leaf.cert_path.display())), "{stderr}");
    assert_eq!(client.get(HOST, CALLBACK).await.status, 307);

    // Another file naming the same admin listener: the relay runs its own file, so it
    // refuses rather than re-read that one and answer "reloaded".
    let other = setup.pki.dir.path().join("other.toml");
    std::fs::write(&other, std::fs::read_to_string(&setup.path).unwrap()).unwrap();
    let out = reload_cli(&other);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "the relay refused the reload (409):\nnot reloaded: this relay runs {own}, not {other}; a reload re-reads \
             the relay's own file. Edit {own} and reload again, or restart the relay with --config {other}\n",
            own = setup.path.display(),
            other = other.display()
        )
    );
    assert!(out.stdout.is_empty());
    // The same file through a symlink is the same file.
    setup.write(&Shape { callback_status: 307, ..shape.clone() });
    let link = setup.pki.dir.path().join("link.toml");
    std::os::unix::fs::symlink(&setup.path, &link).unwrap();
    let out = reload_cli(&link);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "reloaded\n", "{}", String::from_utf8_lossy(&out.stderr));

    // No admin listener in the file: the command says to send SIGHUP.
    let no_admin = setup.pki.dir.path().join("no-admin.toml");
    let text = std::fs::read_to_string(&setup.path).unwrap();
    std::fs::write(&no_admin, text.replace(&format!("admin = \"{admin_addr}\"\n"), "")).unwrap();
    let out = reload_cli(&no_admin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no `[server] admin` listener") && stderr.contains("kill -HUP <pid>"), "{stderr}");

    assert_eq!(relay.stop().await.0.code(), Some(0));
}

#[tokio::test]
async fn a_config_path_that_became_a_fifo_is_refused_at_once() {
    let (setup, _shape, mut relay, client) = start_in_process(None).await;
    std::fs::remove_file(&setup.path).unwrap();
    assert!(Command::new("mkfifo").arg(&setup.path).status().expect("mkfifo").success());
    let err = tokio::time::timeout(Duration::from_secs(5), relay.reload.reload())
        .await
        .expect("answered at once, never waiting for a writer")
        .expect_err("refused");
    assert_eq!(err.lines(), [format!("{}: cannot read: not a regular file", setup.path.display())]);
    assert_eq!(client.get(HOST, CALLBACK).await.status, 302, "the old configuration serves on");
    relay.stop().await;
}

#[tokio::test]
async fn reload_command_recognises_a_server_that_is_not_a_relay() {
    let html = "<html><body>\u{1b}[31mwelcome</body></html>";
    let other =
        common::Upstream::start(None, common::UpstreamBehaviour::fixed(200, &[("content-type", "text/html")], html))
            .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("relay.toml");
    let toml = format!("[server]\nadmin = \"{}\"\n\n[[site]]\nhostnames = [\"auth.example.test\"]\n", other.addr);
    std::fs::write(&config, toml).expect("write config");
    let out = tokio::task::spawn_blocking(move || reload_cli(&config)).await.expect("reload");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "{} answered HTTP 200, not as an oauth-relay admin listener does; is another server listening there? \
             Otherwise send the relay SIGHUP: kill -HUP <pid>\n",
            other.addr
        )
    );
    assert!(out.stdout.is_empty());
}
