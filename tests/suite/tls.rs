//! TLS termination over real handshakes: SNI refusal with `unrecognized_name`, the default site
//! for clients without SNI, per-site certificates, protocol versions and ALPN, session
//! resumption, hot reload of `files` certificates, the `self-signed` source, and readiness
//! tracking certificate validity.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::pki::Leaf;
use common::{Pki, RelayUnderTest, TlsClient};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// One `[[site]]` block serving `hostnames` with the `files` certificate `leaf`.
fn site(name: &str, hostnames: &[&str], leaf: &Leaf, extra: &str) -> String {
    common::files_site(name, hostnames, leaf, extra)
}

/// `[server]` on an ephemeral HTTPS port, followed by `sites`.
fn config(server_extra: &str, sites: &[String]) -> String {
    format!("[server]\nhttps = [\"127.0.0.1:0\"]\n{server_extra}\n{}", sites.concat())
}

/// A relay serving one site, `auth.example.test`, with a certificate from a fresh test CA.
async fn auth_site() -> (Pki, Leaf, RelayUnderTest) {
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &["auth.example.test"]);
    let relay = RelayUnderTest::start(&config("", &[site("auth", &["auth.example.test"], &leaf, "")])).await;
    (pki, leaf, relay)
}

/// The rustls error inside a failed handshake's `io::Error`.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

fn expect_unrecognized_name(result: std::io::Result<impl Sized>) {
    let err = result.err().expect("the handshake is refused");
    assert_eq!(
        rustls_error(&err),
        Some(&rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName)),
        "refused with unrecognized_name, got {err:?}"
    );
}

/// A client trusting the test CA that speaks only `version`.
fn client_for_version(pki: &Pki, version: &'static rustls::SupportedProtocolVersion) -> Arc<rustls::ClientConfig> {
    pki.client_config_for(&[version], &[b"http/1.1"])
}

#[tokio::test]
async fn unknown_sni_is_refused_with_unrecognized_name() {
    let (pki, leaf, relay) = auth_site().await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    expect_unrecognized_name(client.connect("other.example.test").await);
    // No default site: a client without SNI (an IP literal sends none) is refused the same way.
    expect_unrecognized_name(client.connect("127.0.0.1").await);
    // The configured name still works on the same listener.
    assert_eq!(client.peer_serial("auth.example.test").await, leaf.serial);
}

#[tokio::test]
async fn default_site_answers_clients_without_sni() {
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &["auth.example.test", "127.0.0.1"]);
    let relay =
        RelayUnderTest::start(&config("", &[site("auth", &["auth.example.test"], &leaf, "default = true")])).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    assert_eq!(client.peer_serial("127.0.0.1").await, leaf.serial);
    let host = format!("127.0.0.1:{}", relay.https.port());
    let reply = client.send("127.0.0.1", "GET", "/v1/auth/callback?x=1", &[("host", &host)], "").await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), "https://api.aurinko.io/v1/auth/callback?x=1");
}

#[tokio::test]
async fn sni_picks_each_sites_certificate() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.example.test"]);
    let b = pki.leaf("b", &["b.example.test"]);
    assert_ne!(a.serial, b.serial);
    let relay = RelayUnderTest::start(&config(
        "",
        &[site("a", &["a.example.test"], &a, ""), site("b", &["b.example.test"], &b, "")],
    ))
    .await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    assert_eq!(client.peer_serial("a.example.test").await, a.serial);
    assert_eq!(client.peer_serial("b.example.test").await, b.serial);
    assert_eq!(client.peer_serial("A.Example.Test").await, a.serial, "SNI is case-insensitive");
    // The Host must belong to the site the handshake chose.
    let reply = client.send("a.example.test", "GET", "/v1/auth/callback?x=1", &[("host", "b.example.test")], "").await;
    assert_eq!(reply.status, 421);
}

#[tokio::test]
async fn min_tls_version_1_3_refuses_tls12_with_protocol_version() {
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &["auth.example.test"]);
    let sites = [site("auth", &["auth.example.test"], &leaf, "")];
    let relay = RelayUnderTest::start(&config("min_tls_version = \"1.3\"", &sites)).await;
    let old = TlsClient::new(relay.https, client_for_version(&pki, &rustls::version::TLS12));
    let err = old.connect("auth.example.test").await.expect_err("TLS 1.2 is refused");
    assert_eq!(
        rustls_error(&err),
        Some(&rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion)),
        "refused with protocol_version, got {err:?}"
    );
    let new = TlsClient::new(relay.https, client_for_version(&pki, &rustls::version::TLS13));
    let reply = new.get("auth.example.test", "/healthz").await;
    assert_eq!((reply.status, reply.text()), (200, "ok"));
}

#[tokio::test]
async fn tls13_and_tls12_both_handshake() {
    let (pki, _, relay) = auth_site().await;
    for (version, expected) in [
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
    ] {
        let client = TlsClient::new(relay.https, client_for_version(&pki, version));
        let tls = client.connect("auth.example.test").await.expect("handshake");
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
        let reply = client.get("auth.example.test", "/healthz").await;
        assert_eq!((reply.status, reply.text()), (200, "ok"), "{expected:?}");
    }
}

#[tokio::test]
async fn alpn_picks_what_the_client_offers() {
    let (pki, _, relay) = auth_site().await;
    // What the client offers, and what the relay must pick.
    type Offer = (&'static [&'static [u8]], Option<&'static [u8]>);
    let offers: [Offer; 6] = [
        (&[b"h2", b"http/1.1"], Some(b"h2")),
        (&[b"http/1.1", b"h2"], Some(b"h2")),
        (&[b"http/1.1"], Some(b"http/1.1")),
        (&[b"http/1.0", b"http/1.1"], Some(b"http/1.1")),
        (&[b"http/1.0"], Some(b"http/1.0")),
        (&[], None),
    ];
    for (offer, picked) in offers {
        let client = TlsClient::new(relay.https, pki.client_config(offer));
        let tls = client.connect("auth.example.test").await.expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), picked, "offer {offer:?}");
    }
    let h2 = TlsClient::new(relay.https, pki.client_config(&[b"h2"]));
    let reply = h2.send_h2("auth.example.test", "GET", "/v1/auth/callback?x=1", &[], "").await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), "https://api.aurinko.io/v1/auth/callback?x=1");
    // No ALPN at all: HTTP/1.1.
    let plain = TlsClient::new(relay.https, pki.client_config(&[]));
    let reply = plain.get("auth.example.test", "/v1/auth/callback?x=1").await;
    assert_eq!(reply.status, 302);
    // http/1.0, as `curl --http1.0` offers it alone.
    let http10 = TlsClient::new(relay.https, pki.client_config(&[b"http/1.0"]));
    let answer = exchange_until_close(&http10, "GET /healthz HTTP/1.0\r\nHost: auth.example.test\r\n\r\n").await;
    let answer = answer.expect("an answer, then close_notify");
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n") && answer.ends_with("\r\n\r\nok"), "{answer}");
}

/// Sends `request` on a fresh connection and reads until the relay closes it; an error if it
/// closes without TLS's `close_notify`. Panics if the relay has not closed within 10 s (an
/// answer held for a `close_notify` that never comes).
async fn exchange_until_close(client: &TlsClient, request: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = client.connect("auth.example.test").await?;
    tls.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
        .await
        .expect("the relay closes the connection within 10 s")?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn a_last_answer_arrives_whole_and_then_close_notify() {
    let (pki, _, relay) = auth_site().await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let client = TlsClient::new(relay.https, client_for_version(&pki, version));
        // HTTP/1.1 asking to close, and HTTP/1.0 (which closes unless asked not to): the relay
        // holds the answer until close_notify can go with it.
        let answer = exchange_until_close(
            &client,
            "GET /v1/auth/callback?code=c&state=s HTTP/1.1\r\nHost: auth.example.test\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("the whole answer, then close_notify");
        assert!(answer.starts_with("HTTP/1.1 302 Found\r\n"), "{version:?}: {answer}");
        assert!(
            answer.contains("\r\nlocation: https://api.aurinko.io/v1/auth/callback?code=c&state=s\r\n"),
            "{answer}"
        );
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n"), "{answer}");

        let answer = exchange_until_close(&client, "GET /healthz HTTP/1.0\r\nHost: auth.example.test\r\n\r\n")
            .await
            .expect("the whole answer, then close_notify");
        assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{version:?}: {answer}");
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");

        // Kept-alive connections are not held up.
        assert_eq!(client.get("auth.example.test", "/healthz").await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_on_tls13_and_tls12_after_many_other_handshakes() {
    let (pki, _, relay) = auth_site().await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // rustls clients keep the sessions they are given, as browsers do.
        let client = TlsClient::new(relay.https, client_for_version(&pki, version));
        // A request reads the ticket that follows a TLS 1.3 handshake.
        assert_eq!(client.get("auth.example.test", "/healthz").await.status, 200);

        // More full handshakes than a server-side cache of 256 sessions holds, as a busy relay
        // sees while a user is away at the identity provider.
        let mut others = (*client_for_version(&pki, version)).clone();
        others.resumption = rustls::client::Resumption::disabled();
        let others = TlsClient::new(relay.https, Arc::new(others));
        let mut running = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let others = others.clone();
            running.spawn(async move {
                for _ in 0..20 {
                    assert_eq!(others.get("auth.example.test", "/healthz").await.status, 200);
                }
            });
        }
        while let Some(done) = running.join_next().await {
            done.expect("other clients");
        }

        let tls = client.connect("auth.example.test").await.expect("handshake");
        assert_eq!(tls.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed), "{version:?}");
        drop(tls);
        assert_eq!(client.get("auth.example.test", "/healthz").await.status, 200, "{version:?}");
    }
}

/// Replaces `path` the way cert-manager and certbot do: write a temp file, then rename it over.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Handshakes until the relay serves `serial` for `sni`, for at most 5 s.
async fn wait_for_serial(client: &TlsClient, sni: &str, serial: &str) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = client.peer_serial(sni).await;
        if seen == serial {
            return;
        }
        assert!(Instant::now() < until, "still serving {seen}, not {serial}, after 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One GET on an existing HTTP/1.1 connection.
async fn get_on(sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, target: &str) -> (u16, Bytes) {
    let req = http::Request::get(target).header("host", "auth.example.test").body(Full::new(Bytes::new())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("response within 5 s")
        .expect("response");
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.expect("body").to_bytes())
}

#[tokio::test]
async fn files_are_reloaded_without_restart() {
    let pki = Pki::new();
    let first = pki.leaf("first", &["auth.example.test"]);
    let served = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (served.path().join("tls.crt"), served.path().join("tls.key"));
    std::fs::write(&cert, &first.cert_pem).unwrap();
    std::fs::write(&key, &first.key_pem).unwrap();
    let toml = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\n\n[[site]]\nname = \"auth\"\nhostnames = [\"auth.example.test\"]\n\n\
         [site.tls]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\nreload_interval = \"50ms\"\n",
        cert.display(),
        key.display()
    );
    let relay = RelayUnderTest::start(&toml).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    assert_eq!(client.peer_serial("auth.example.test").await, first.serial);

    // A keep-alive connection opened on the first certificate.
    let tls = client.connect("auth.example.test").await.expect("handshake");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("h1");
    tokio::spawn(conn);
    assert_eq!(get_on(&mut sender, "/healthz").await, (200, Bytes::from("ok")));

    let second = pki.leaf("second", &["auth.example.test"]);
    replace(&cert, second.cert_pem.as_bytes());
    replace(&key, second.key_pem.as_bytes());
    wait_for_serial(&client, "auth.example.test", &second.serial).await;
    assert_eq!(get_on(&mut sender, "/healthz").await, (200, Bytes::from("ok")), "open connection survives");

    // A broken replacement is ignored: the second certificate keeps serving for many intervals.
    replace(&cert, b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n");
    replace(&key, b"garbage");
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert_eq!(client.peer_serial("auth.example.test").await, second.serial);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let reply = client.get("auth.example.test", "/readyz").await;
    assert_eq!((reply.status, reply.text()), (200, "ready\n"));

    // ...and the watcher is still alive: a good file after the bad one is picked up.
    let third = pki.leaf("third", &["auth.example.test"]);
    replace(&cert, third.cert_pem.as_bytes());
    replace(&key, third.key_pem.as_bytes());
    wait_for_serial(&client, "auth.example.test", &third.serial).await;
}

/// A client whose only trust anchor is the PEM certificate at `path`.
fn client_trusting(path: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(path).expect("read cert") {
        roots.add(c.expect("pem")).expect("add root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(oauth_relay::crypto::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

#[tokio::test]
async fn self_signed_certificate_is_made_once_and_kept_private() {
    use std::os::unix::fs::PermissionsExt;
    oauth_relay::crypto::provider();
    let storage = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nstorage = \"{}\"\n\n[[site]]\nname = \"local\"\n\
         hostnames = [\"self.example.test\"]\n\n[site.tls]\nsource = \"self-signed\"\n",
        storage.path().display()
    );
    let dir = storage.path().join("self-signed");
    let (cert, key) = (dir.join("local.crt"), dir.join("local.key"));
    let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;

    let mut relay = RelayUnderTest::start(&toml).await;
    // `run` makes the certificate before it accepts; the start returns before that.
    let until = Instant::now() + Duration::from_secs(5);
    while !cert.is_file() {
        assert!(Instant::now() < until, "{} made within 5 s", cert.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(mode(&key), 0o600, "key mode");
    assert_eq!(mode(&dir), 0o700, "folder mode");
    let client = TlsClient::new(relay.https, client_trusting(&cert));
    let serial = client.peer_serial("self.example.test").await;
    let reply = client.get("self.example.test", "/v1/auth/callback?x=1").await;
    assert_eq!(reply.status, 302);
    relay.stop().await;

    let relay = RelayUnderTest::start(&toml).await;
    let client = TlsClient::new(relay.https, client_trusting(&cert));
    assert_eq!(client.peer_serial("self.example.test").await, serial, "the second start reuses the certificate");
}

#[tokio::test]
async fn readyz_follows_certificate_validity() {
    let pki = Pki::new();
    let good = pki.leaf("good", &["auth.example.test"]);
    let relay = RelayUnderTest::start(&config("", &[site("auth", &["auth.example.test"], &good, "")])).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    let reply = client.get("auth.example.test", "/readyz").await;
    assert_eq!((reply.status, reply.text()), (200, "ready\n"));

    // An expired certificate: clients reject it, so ask the admin listener.
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    let expired = pki.leaf_with_validity("expired", &["old.example.test"], now - 10 * day, now - day);
    let relay = RelayUnderTest::start(&config(
        "admin = \"127.0.0.1:0\"",
        &[site("auth", &["auth.example.test"], &good, ""), site("old", &["old.example.test"], &expired, "")],
    ))
    .await;
    let reply = common::client::plain_get(relay.admin.expect("admin"), "localhost", "/readyz").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.text(), "not ready\nold.example.test: certificate expired\n");
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    let err = client.connect("old.example.test").await.expect_err("an expired certificate is rejected");
    assert!(
        matches!(
            rustls_error(&err),
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Expired))
                | Some(rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. }))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn readyz_says_when_a_certificate_does_not_name_its_hostname() {
    let pki = Pki::new();
    let good = pki.leaf("good", &["auth.example.test"]);
    let foreign = pki.leaf("foreign", &["elsewhere.example.test"]);
    let relay = RelayUnderTest::start(&config(
        "admin = \"127.0.0.1:0\"",
        &[site("auth", &["auth.example.test"], &good, ""), site("other", &["other.example.test"], &foreign, "")],
    ))
    .await;
    let reply = common::client::plain_get(relay.admin.expect("admin"), "localhost", "/readyz").await;
    assert_eq!(
        (reply.status, reply.text()),
        (503, "not ready\nother.example.test: the certificate does not name this hostname\n")
    );
}
