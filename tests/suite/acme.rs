//! Automatic certificates against a real ACME server (Pebble), with the relay's real listeners
//! answering the challenges: issuance over TLS-ALPN-01 and HTTP-01, restart without an order,
//! renewal with hot swap under load, faults, two replicas sharing one store, and the CLI.

use crate::common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pebble::{Pebble, PebbleOptions, same_serial};
use common::proxy::Proxy;
use common::{Pki, RelayUnderTest, TlsClient};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use oauth_relay::{Config, Listeners};
use tokio::net::TcpListener;

pub(crate) const HOST: &str = "relay.test";

pub(crate) fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Runs `oauth-relay WORDS... --config CONFIG REST...` (the test build) off the runtime.
pub(crate) async fn cli(words: &[&str], config: &Path, rest: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_oauth-relay"));
    cmd.args(words).arg("--config").arg(config).args(rest);
    tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("run oauth-relay")
}

/// Listeners bound before Pebble starts, so Pebble's VA can be told their ports.
pub(crate) async fn bind_ports() -> Listeners {
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.unwrap() };
    Listeners { https: vec![bind().await], http: vec![bind().await], admin: None }
}

/// The ports of pre-bound [`Listeners`] that Pebble's VA is told to dial.
pub(crate) trait VaPorts {
    fn https_port(&self) -> u16;
    fn http_port(&self) -> u16;
}

impl VaPorts for Listeners {
    fn https_port(&self) -> u16 {
        self.https[0].local_addr().unwrap().port()
    }
    fn http_port(&self) -> u16 {
        self.http[0].local_addr().unwrap().port()
    }
}

/// One ACME site for `relay.test` (plus `extra` TOML at the end).
pub(crate) fn acme_config(
    storage: &Path,
    pebble_dir: &str,
    ca: &Path,
    challenge: &str,
    tls_extra: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[server]
https = ["127.0.0.1:0"]
http = ["127.0.0.1:0"]
public_https_port = 443
storage = "{storage}"

[[site]]
name = "auth"
hostnames = ["{HOST}"]

[site.tls]
source = "acme"
directory = "{pebble_dir}"
directory_ca_file = "{ca}"
contact = ["ops@relay.test"]
terms_agreed = true
challenge = "{challenge}"
reload_interval = "200ms"
retry_min = "100ms"
retry_max = "400ms"
{tls_extra}
{extra}
"#,
        storage = storage.display(),
        ca = ca.display(),
    )
}

/// The store folder of the Pebble directory, and the hostname folder in it.
pub(crate) fn host_dir(storage: &Path, pebble: &Pebble) -> PathBuf {
    let url = url::Url::parse(&pebble.directory_url()).unwrap();
    storage.join("acme").join(oauth_relay::acme::store::folder_name(&url)).join(HOST)
}

pub(crate) fn meta(storage: &Path, pebble: &Pebble) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(host_dir(storage, pebble).join("meta.json")).unwrap()).unwrap()
}

pub(crate) fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The certificate chain the relay serves for `HOST`, verified by a client trusting only
/// Pebble's root: (leaf serial, chain length).
pub(crate) async fn served_chain(relay_https: SocketAddr, client: &Arc<rustls::ClientConfig>) -> (String, usize) {
    let tls =
        TlsClient::new(relay_https, client.clone()).connect(HOST).await.expect("handshake trusting only Pebble's root");
    let chain = tls.get_ref().1.peer_certificates().expect("chain").to_vec();
    use x509_parser::prelude::*;
    let (_, leaf) = X509Certificate::from_der(chain[0].as_ref()).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(
        san.value.general_names.iter().any(|n| matches!(n, GeneralName::DNSName(d) if *d == HOST)),
        "leaf names {HOST}"
    );
    (leaf.raw_serial_as_string().replace(':', ""), chain.len())
}

async fn issue_end_to_end(challenge: &str) {
    logs();
    let ports = bind_ports().await;
    let pebble = Pebble::start(PebbleOptions::new(ports.http_port(), ports.https_port())).await;
    let storage = tempfile::tempdir().unwrap();
    let toml = acme_config(storage.path(), &pebble.directory_url(), pebble.ca_path(), challenge, "", "");
    let mut relay = RelayUnderTest::on(&toml, ports);
    relay.wait_ready().await;

    let client = pebble.client_config(&[b"http/1.1"]).await;
    let (serial, len) = served_chain(relay.https, &client).await;
    assert_eq!(len, 2, "leaf + Pebble intermediate");
    let m = meta(storage.path(), &pebble);
    assert_eq!(m["serial"], serial.as_str());
    assert_eq!(m["hostname"], HOST);
    assert!(m["order_url"].as_str().unwrap().starts_with(&format!("https://{}/", pebble.listen)));
    assert_eq!(pebble.orders(), 1);
    assert_eq!(pebble.accounts(), 1);

    // Files 0600, folders 0700; the chain on disk is the chain served.
    let dir = host_dir(storage.path(), &pebble);
    for f in ["meta.json", m["chain_file"].as_str().unwrap(), m["key_file"].as_str().unwrap()] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&dir.parent().unwrap().join("account.json")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(dir.parent().unwrap()), 0o700);
    let chain_pem = std::fs::read_to_string(dir.join(m["chain_file"].as_str().unwrap())).unwrap();
    assert_eq!(chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
    // The challenge answers are gone once the order is done.
    let answers = storage.path().join("acme/challenges");
    for kind in ["http-01", "tls-alpn-01"] {
        let left = std::fs::read_dir(answers.join(kind)).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "{kind} answers left behind");
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_issuance_end_to_end() {
    issue_end_to_end("tls-alpn-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_issuance_end_to_end() {
    issue_end_to_end("http-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_through_an_outbound_proxy() {
    // Networks that allow outbound HTTPS only through a proxy: every request to the CA goes
    // through its CONNECT tunnels (the CA's validation still comes straight to the relay).
    let proxy = Proxy::start(Some(("relay", "proxy-pw"))).await;
    let ports = bind_ports().await;
    let pebble = Pebble::start(PebbleOptions::new(ports.http_port(), ports.https_port())).await;
    let storage = tempfile::tempdir().unwrap();
    let outbound = format!("[outbound]\nproxy = \"{}\"", proxy.url(Some(("relay", "proxy-pw"))));
    let toml = acme_config(storage.path(), &pebble.directory_url(), pebble.ca_path(), "tls-alpn-01", "", &outbound);
    let mut relay = RelayUnderTest::on(&toml, ports);
    relay.wait_ready().await;
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let (serial, len) = served_chain(relay.https, &client).await;
    assert_eq!((len, meta(storage.path(), &pebble)["serial"].as_str()), (2, Some(serial.as_str())));
    let connects = proxy.connects();
    assert!(!connects.is_empty(), "the CA was reached through the proxy");
    assert!(connects.iter().all(|c| *c == pebble.listen.to_string()), "{connects:?}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_the_stored_certificate_without_ordering() {
    logs();
    let ports = bind_ports().await;
    let pebble = Pebble::start(PebbleOptions::new(ports.http_port(), ports.https_port())).await;
    let storage = tempfile::tempdir().unwrap();
    let toml = acme_config(storage.path(), &pebble.directory_url(), pebble.ca_path(), "tls-alpn-01", "", "");
    let mut first = RelayUnderTest::on(&toml, ports);
    first.wait_ready().await;
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let (serial, _) = served_chain(first.https, &client).await;
    first.stop().await;
    assert_eq!(pebble.orders(), 1);

    // A crash between writes left a temp file behind: it is ignored.
    std::fs::write(host_dir(storage.path(), &pebble).join(".meta.json.tmp-99999"), b"{ torn").unwrap();
    let mut second = RelayUnderTest::on(&toml, bind_ports().await);
    // Ready on the very first probe: the stored certificate is installed before serving.
    assert_eq!(second.readyz().await, (200, "ready\n".to_string()));
    assert_eq!(served_chain(second.https, &client).await.0, serial);
    // A few store polls later still no order and no second account.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(pebble.orders(), 1);
    assert_eq!(pebble.accounts(), 1);
    second.stop().await;

    // A corrupt store is reported and replaced by a fresh order, never a crash.
    let m = meta(storage.path(), &pebble);
    std::fs::write(host_dir(storage.path(), &pebble).join(m["chain_file"].as_str().unwrap()), b"garbage").unwrap();
    // Pebble's VA dials the first relay's ports.
    let mut third = RelayUnderTest::on(&toml, rebind(first.https, first.http.expect("http")).await);
    third.wait_ready().await;
    let (new_serial, _) = served_chain(third.https, &client).await;
    assert_ne!(new_serial, serial);
    assert_eq!(pebble.orders(), 2);
    assert_eq!(pebble.accounts(), 1);
    third.stop().await;
}

/// Binds the same ports again (Pebble's VA dials fixed ports); bounded retries while the old
/// sockets close.
pub(crate) async fn rebind(https: SocketAddr, http: SocketAddr) -> Listeners {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let (Ok(a), Ok(b)) = (TcpListener::bind(https).await, TcpListener::bind(http).await) {
            return Listeners { https: vec![a], http: vec![b], admin: None };
        }
        assert!(Instant::now() < deadline, "ports {https} / {http} not free again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serial of the leaf a TLS connection was served.
fn peer_serial<IO>(tls: &tokio_rustls::client::TlsStream<IO>) -> String {
    use x509_parser::prelude::*;
    let der = tls.get_ref().1.peer_certificates().expect("chain")[0].clone();
    let (_, leaf) = X509Certificate::from_der(der.as_ref()).unwrap();
    leaf.raw_serial_as_string().replace(':', "")
}

/// `GET /healthz` on an open HTTP/1.1 connection; true on `200 ok`.
async fn healthz(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> bool {
    let req = http::Request::get("/healthz").header("host", HOST).body(Empty::new()).unwrap();
    match tokio::time::timeout(Duration::from_secs(5), sender.send_request(req)).await {
        Ok(Ok(r)) => r.status() == 200,
        _ => false,
    }
}

async fn open(client: &TlsClient) -> Option<(String, hyper::client::conn::http1::SendRequest<Empty<Bytes>>)> {
    let tls = client.connect(HOST).await.ok()?;
    let serial = peer_serial(&tls);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.ok()?;
    tokio::spawn(conn);
    Some((serial, sender))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_swaps_the_certificate_under_load_without_a_failed_request() {
    logs();
    let ports = bind_ports().await;
    let mut opts = PebbleOptions::new(ports.http_port(), ports.https_port());
    // One-hour certificates renewed once less than 3598 s is left: due two seconds after issue.
    opts.validity_secs = Some(3600);
    let pebble = Pebble::start(opts).await;
    let storage = tempfile::tempdir().unwrap();
    let tls_extra = r#"renew_when_left = "3598s""#;
    let toml = acme_config(storage.path(), &pebble.directory_url(), pebble.ca_path(), "tls-alpn-01", tls_extra, "");
    let mut relay = RelayUnderTest::on(&toml, ports);
    relay.wait_ready().await;
    let client = TlsClient::new(relay.https, pebble.client_config(&[b"http/1.1"]).await);

    let (first, mut keep_alive) = open(&client).await.expect("first connection");
    let (mut failures, mut requests, mut after_swap_on_old) = (0, 0, 0);
    let mut new_serial = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut extra_rounds = 0;
    while extra_rounds < 10 {
        assert!(Instant::now() < deadline, "no renewed certificate within 20 s");
        requests += 2;
        if !healthz(&mut keep_alive).await {
            failures += 1;
        } else if new_serial.is_some() {
            after_swap_on_old += 1;
        }
        match open(&client).await {
            Some((serial, mut sender)) => {
                if !healthz(&mut sender).await {
                    failures += 1;
                }
                if serial != first {
                    new_serial.get_or_insert(serial);
                }
            }
            None => failures += 1,
        }
        if new_serial.is_some() {
            extra_rounds += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(failures, 0, "failed requests out of {requests}");
    assert!(after_swap_on_old > 0, "the keep-alive connection kept working after the swap");
    let new_serial = new_serial.unwrap();
    // Every new handshake now sees a renewed certificate; the store names the one served.
    let (now_serving, mut sender) = open(&client).await.unwrap();
    assert_ne!(now_serving, first);
    assert!(healthz(&mut sender).await);
    assert!(pebble.orders() >= 2);
    let m = meta(storage.path(), &pebble);
    eprintln!("renewed {first} -> {new_serial}; meta {m}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_nonces_rejected_still_ends_in_a_certificate() {
    logs();
    let ports = bind_ports().await;
    let mut opts = PebbleOptions::new(ports.http_port(), ports.https_port());
    opts.nonce_reject = 50;
    let pebble = Pebble::start(opts).await;
    let storage = tempfile::tempdir().unwrap();
    let toml = acme_config(storage.path(), &pebble.directory_url(), pebble.ca_path(), "tls-alpn-01", "", "");
    let mut relay = RelayUnderTest::on(&toml, ports);
    relay.wait_readyz("ready despite the rejected nonces", Duration::from_secs(30), |s, _| s == 200).await;
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let (serial, _) = served_chain(relay.https, &client).await;
    assert_eq!(meta(storage.path(), &pebble)["serial"], serial.as_str());
    relay.stop().await;
}

/// A loopback port held bound but not listening: a connection to it is refused, and no other
/// test can be given it meanwhile (the socket has no `SO_REUSEADDR`), unlike a port that was
/// free a moment ago.
pub(crate) fn refusing_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// Deactivates the authorizations of the order the stored certificate came from, with the
/// relay's stored account. Pebble then has no valid authorization to hand a later order for
/// the name, even on the draw that makes it reuse one despite `PEBBLE_AUTHZREUSE=0` (see
/// common/pebble.rs): every later order must pass its challenge.
pub(crate) async fn deactivate_stored_authorizations(storage: &Path, pebble: &Pebble) {
    use instant_acme::AuthorizationStatus;
    let url = url::Url::parse(&pebble.directory_url()).unwrap();
    let creds = oauth_relay::acme::AcmeStore::new(storage, &url).load_account().unwrap().expect("stored account");
    let http =
        oauth_relay::acme::client::http_client(Some(pebble.ca_path()), &oauth_relay::egress::Egress::direct()).unwrap();
    let account = instant_acme::Account::builder_with_http(http).from_credentials(creds).await.unwrap();
    let order_url = meta(storage, pebble)["order_url"].as_str().unwrap().to_string();
    let mut order = account.order(order_url).await.unwrap();
    let mut authorizations = order.authorizations();
    let mut deactivated = 0;
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.unwrap();
        assert_eq!(authz.status, AuthorizationStatus::Valid, "the stored certificate's authorization");
        assert_eq!(authz.deactivate().await.unwrap().status, AuthorizationStatus::Deactivated);
        deactivated += 1;
    }
    assert_eq!(deactivated, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unvalidatable_challenge_keeps_the_current_certificate_and_retries() {
    logs();
    let ports = bind_ports().await;
    // Pebble's VA dials a port nobody listens on for HTTP-01; TLS-ALPN-01 reaches the relay.
    let (_held, dead) = refusing_port();
    let pebble = Pebble::start(PebbleOptions::new(dead, ports.https_port())).await;
    let storage = tempfile::tempdir().unwrap();
    let dir = pebble.directory_url();
    let first = acme_config(storage.path(), &dir, pebble.ca_path(), "tls-alpn-01", "", "");
    let mut relay = RelayUnderTest::on(&first, ports);
    relay.wait_ready().await;
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let (serial, _) = served_chain(relay.https, &client).await;
    relay.stop().await;
    assert_eq!(pebble.issued().len(), 1);
    // Otherwise Pebble may hand one of the orders below this valid authorization and issue
    // without any challenge (seen as a new serial here, about once in 100 orders).
    deactivate_stored_authorizations(storage.path(), &pebble).await;

    // Now HTTP-01, and due at once (longer than Pebble's five-year lifetime is left).
    let due = r#"renew_when_left = "1900d""#;
    let toml = acme_config(storage.path(), &dir, pebble.ca_path(), "http-01", due, "");
    let mut relay = RelayUnderTest::on(&toml, bind_ports().await);
    let config = relay.config.clone();
    let status_path = host_dir(storage.path(), &pebble).join("status.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status: serde_json::Value =
            std::fs::read(&status_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        // Retried with backoff: several failures recorded, each with the CA's reason.
        if status["failures"].as_u64().unwrap_or(0) >= 3 {
            break status;
        }
        assert!(Instant::now() < deadline, "no repeated failures recorded: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The CA's reason, from whichever step saw it: Pebble validates in the background and
    // usually answers the challenge POST first ("waiting for validation"), but a quick enough
    // validation is already in that answer ("marking the challenge ready").
    const STEPS: [&str; 2] = ["waiting for validation: ", "marking the challenge ready: "];
    let error = status["last_error"].as_str().unwrap();
    assert!(STEPS.iter().any(|s| error.starts_with(s)), "{error}");
    assert!(error.contains(&format!("127.0.0.1:{dead}: connect: connection refused")), "{error}");
    assert!(status["next_attempt"].is_string());
    // Still serving the old certificate, and ready (it is valid).
    assert_eq!(served_chain(relay.https, &client).await.0, serial);
    assert_eq!(relay.readyz().await, (200, "ready\n".to_string()));
    let report = oauth_relay::acme::status_report(&config).await.expect("cert status");
    assert!(report.contains(&format!("serial         {serial}")), "{report}");
    assert!(STEPS.iter().any(|s| report.contains(&format!("last error     {s}"))), "{report}");
    // Pebble's side: several orders, all failed; the only certificate is the first one.
    assert!(pebble.orders() >= 4, "{} orders", pebble.orders());
    let issued = pebble.issued();
    assert!(issued.len() == 1 && same_serial(&issued[0], &serial), "issued {issued:?}, first {serial}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_ca_down_at_start_other_sites_serve_and_the_certificate_comes_later() {
    logs();
    let ports = bind_ports().await;
    let (https_port, http_port) = (ports.https_port(), ports.http_port());
    let pebble_pki = Pki::new();
    // Held (refusing connections, and given to no other test) until Pebble binds it.
    let (held, pebble_port) = refusing_port();
    let dir = format!("https://127.0.0.1:{pebble_port}/dir");
    let other_pki = Pki::new();
    let other = other_pki.leaf("other", &["other.test"]);
    let extra = format!(
        "[[site]]\nname = \"other\"\nhostnames = [\"other.test\"]\n\n[site.tls]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n",
        other.cert_path.display(),
        other.key_path.display()
    );
    let storage = tempfile::tempdir().unwrap();
    let toml = acme_config(storage.path(), &dir, &pebble_pki.ca_path, "tls-alpn-01", "", &extra);
    let mut relay = RelayUnderTest::on(&toml, ports);

    // Not ready, saying which hostname waits and why; the other site serves meanwhile.
    let (_, body) = relay
        .wait_readyz("not ready for want of a certificate", Duration::from_secs(10), |s, b| {
            s == 503 && b.contains("no certificate yet")
        })
        .await;
    assert!(body.starts_with("not ready\nrelay.test: no certificate yet: "), "{body}");
    assert!(!body.contains("other.test"), "{body}");
    let other_client = TlsClient::new(relay.https, other_pki.client_config(&[b"http/1.1"]));
    assert_eq!(other_client.get("other.test", "/healthz").await.status, 200);

    drop(held);
    let pebble = Pebble::start_with(pebble_pki, {
        let mut o = PebbleOptions::new(http_port, https_port);
        o.listen_port = Some(pebble_port);
        o
    })
    .await;
    relay.wait_ready().await;
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let (serial, len) = served_chain(relay.https, &client).await;
    assert_eq!(len, 2);
    assert_eq!(meta(storage.path(), &pebble)["serial"], serial.as_str());
    assert_eq!(pebble.orders(), 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_sharing_a_store_make_one_account_one_order_and_serve_one_certificate() {
    logs();
    let ports_a = bind_ports().await;
    // Pebble validates against relay A only; relay B may order and A then answers for it
    // from the shared store (as behind a load balancer).
    let pebble = Pebble::start(PebbleOptions::new(ports_a.http_port(), ports_a.https_port())).await;
    let storage = tempfile::tempdir().unwrap();
    let dir = pebble.directory_url();
    let toml = acme_config(storage.path(), &dir, pebble.ca_path(), "tls-alpn-01", "", "");
    let mut a = RelayUnderTest::on(&toml, ports_a);
    let mut b = RelayUnderTest::on(&toml, bind_ports().await);
    a.wait_ready().await;
    b.wait_ready().await;
    let client = pebble.client_config(&[b"http/1.1"]).await;
    let (serial_a, _) = served_chain(a.https, &client).await;
    let (serial_b, _) = served_chain(b.https, &client).await;
    assert_eq!(serial_a, serial_b);
    assert_eq!(pebble.orders(), 1);
    assert_eq!(pebble.accounts(), 1);
    // Released just after the certificate is served: give the release a moment.
    let lock = host_dir(storage.path(), &pebble).join("order.lock");
    let deadline = Instant::now() + Duration::from_secs(5);
    while lock.exists() {
        assert!(Instant::now() < deadline, "lock released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // `cert renew` from a third process: same lock, the relays answer and pick it up.
    let config_path = storage.path().join("relay.toml");
    std::fs::write(&config_path, &toml).unwrap();
    let out = cli(&["cert", "renew"], &config_path, &[HOST]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cert renew: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let renewed = meta(storage.path(), &pebble)["serial"].as_str().unwrap().to_string();
    assert_ne!(renewed, serial_a);
    assert!(stdout.starts_with(&format!("relay.test: renewed, serial {renewed}, not after ")), "{stdout}");
    for relay in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while served_chain(relay.https, &client).await.0 != renewed {
            assert!(Instant::now() < deadline, "the renewed certificate was not picked up from the store");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Pebble saw the CLI's order and no other: the relays themselves ordered nothing more.
    assert_eq!(pebble.orders(), 2, "the relays themselves ordered nothing more");
    assert_eq!(pebble.accounts(), 1);

    // `cert status` reads the store.
    let out = cli(&["cert", "status"], &config_path, &[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for want in [
        "relay.test\n".to_string(),
        format!("  directory      {dir}\n"),
        "  issuer         CN=Pebble Intermediate CA ".to_string(),
        format!("  serial         {renewed}\n"),
        "  not after      ".to_string(),
        "  next renewal   ".to_string(),
        "  last error     none\n".to_string(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lock_of_a_dead_relay_is_taken_over() {
    logs();
    let ports = bind_ports().await;
    let pebble = Pebble::start(PebbleOptions::new(ports.http_port(), ports.https_port())).await;
    let storage = tempfile::tempdir().unwrap();
    let lock = host_dir(storage.path(), &pebble).join("order.lock");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    std::fs::write(
        &lock,
        r#"{"owner":"gone/4242/00","purpose":"order a certificate","expires":"2020-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    let toml = acme_config(storage.path(), &pebble.directory_url(), pebble.ca_path(), "http-01", "", "");
    let mut relay = RelayUnderTest::on(&toml, ports);
    relay.wait_ready().await;
    assert!(!lock.exists());
    assert_eq!(pebble.orders(), 1);
    relay.stop().await;
}

#[test]
fn check_shows_the_acme_settings_and_never_the_eab_key() {
    let dir = tempfile::tempdir().unwrap();
    let toml = acme_config(
        dir.path(),
        "letsencrypt-staging",
        Path::new("/etc/ssl/ca.pem"),
        "http-01",
        "eab_key_id = \"kid-1\"\neab_hmac_key = \"c2VjcmV0LWhtYWMta2V5LXZhbHVl\"\nkey_type = \"ecdsa-p384\"",
        "",
    );
    let config = Config::parse("acme.toml", &toml).unwrap();
    let report = oauth_relay::config::report(&config);
    assert!(report.contains("acme https://acme-staging-v02.api.letsencrypt.org/directory"), "{report}");
    assert!(report.contains("eab hmac key      set"), "{report}");
    assert!(report.contains("eab key id        kid-1"), "{report}");
    assert!(report.contains("key type          ecdsa-p384"), "{report}");
    assert!(report.contains("http-01 (port 80 must be reachable from the CA)"), "{report}");
    assert!(!report.contains("c2VjcmV0"), "{report}");
    assert!(!format!("{config:?}").contains("c2VjcmV0"));
}

#[test]
fn acme_config_mistakes_name_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let toml = acme_config(dir.path(), "ftp://ca.example/dir", Path::new("/x"), "dns-01", "", "")
        .replace("terms_agreed = true", "terms_agreed = false")
        .replace("ops@relay.test", "not-an-email")
        .replace("\"relay.test\"", "\"*.relay.test\"");
    let err = Config::parse("acme.toml", &toml).unwrap_err().to_string();
    for key in [
        "site[0].tls.directory",
        "site[0].tls.contact[0]",
        "site[0].tls.terms_agreed",
        "site[0].tls.challenge",
        "site[0].hostnames",
    ] {
        assert!(err.contains(key), "{key} missing in:\n{err}");
    }
    let files = "[server]\nhttps = [\"127.0.0.1:0\"]\n[[site]]\nhostnames = [\"a.test\"]\n[site.tls]\nsource = \"self-signed\"\nterms_agreed = true\n";
    let err = Config::parse("x.toml", files).unwrap_err().to_string();
    assert!(err.contains("site[0].tls.terms_agreed: only used with source = \"acme\""), "{err}");
}
