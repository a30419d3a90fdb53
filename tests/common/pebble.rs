//! A real ACME server for tests: Debian's `pebble` with `pebble-challtestsrv` as its DNS, on
//! free loopback ports in a temp folder, stopped (killed and waited for) when dropped.
//!
//! Pebble's validation authority dials `http_port` (HTTP-01) and `tls_port` (TLS-ALPN-01) on
//! the address challtestsrv resolves every name to (127.0.0.1), so tests bind the relay's
//! listeners first and give their ports here. See ../shared/acme-pebble.md for the recipe.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::Pki;

/// How Pebble is started.
#[derive(Clone, Debug)]
pub struct PebbleOptions {
    /// The port Pebble's VA dials for HTTP-01 (the relay's plain-HTTP port).
    pub http_port: u16,
    /// The port Pebble's VA dials for TLS-ALPN-01 (the relay's HTTPS port).
    pub tls_port: u16,
    /// Percentage of good nonces Pebble rejects (`PEBBLE_WFE_NONCEREJECT`).
    pub nonce_reject: u32,
    /// Certificate lifetime in seconds (`certificateValidityPeriod`); Pebble's default is 5 years.
    pub validity_secs: Option<u64>,
    /// ACME listener port; `None` picks a free one.
    pub listen_port: Option<u16>,
}

impl PebbleOptions {
    pub fn new(http_port: u16, tls_port: u16) -> Self {
        PebbleOptions { http_port, tls_port, nonce_reject: 0, validity_secs: None, listen_port: None }
    }
}

/// True when two hex serials name the same number (a DER serial may carry a leading zero byte
/// that Pebble's log does not show).
pub fn same_serial(a: &str, b: &str) -> bool {
    a.trim_start_matches('0').eq_ignore_ascii_case(b.trim_start_matches('0'))
}

/// A running Pebble and challtestsrv.
pub struct Pebble {
    /// The CA of Pebble's own HTTPS listener (the relay's `directory_ca_file`).
    pub pki: Pki,
    pub listen: SocketAddr,
    pub mgmt: SocketAddr,
    children: Vec<Child>,
}

/// A loopback port free for both TCP and UDP (challtestsrv's DNS listens on both).
pub fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Pebble {
    /// Starts challtestsrv and Pebble and waits (at most 20 s) until the directory answers.
    pub async fn start(opts: PebbleOptions) -> Pebble {
        Self::start_with(Pki::new(), opts).await
    }

    /// Like [`Pebble::start`] with the listener CA made beforehand (a relay configured before
    /// Pebble runs already names its file).
    pub async fn start_with(pki: Pki, opts: PebbleOptions) -> Pebble {
        // A free port is only free until someone binds it: a test running beside this one can
        // take it between our check and Pebble's bind, and Pebble then exits. Start again on
        // fresh ports (unless the test fixed the listen port).
        let mut pki = pki;
        for _ in 0..3 {
            match Self::try_start(pki, &opts).await {
                Ok(p) => return p,
                Err((back, why)) if opts.listen_port.is_none() => {
                    eprintln!("pebble exited during start ({why}); retrying on fresh ports");
                    pki = back;
                }
                Err((_, why)) => panic!("pebble exited during start: {why}"),
            }
        }
        panic!("pebble exited during start three times");
    }

    /// One start; `Err` (with the PKI back and the reason) when a child exits before the
    /// directory answers.
    async fn try_start(pki: Pki, opts: &PebbleOptions) -> Result<Pebble, (Pki, String)> {
        let leaf = pki.leaf("pebble-listener", &["localhost", "127.0.0.1"]);
        let dir = pki.dir.path().to_path_buf();
        let listen: SocketAddr = ([127, 0, 0, 1], opts.listen_port.unwrap_or_else(free_port)).into();
        let mgmt: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let (dns, chall_mgmt) = (free_port(), free_port());
        let mut pebble = serde_json::json!({
            "listenAddress": listen.to_string(),
            "managementListenAddress": mgmt.to_string(),
            "certificate": leaf.cert_path,
            "privateKey": leaf.key_path,
            "httpPort": opts.http_port,
            "tlsPort": opts.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some(v) = opts.validity_secs {
            pebble["certificateValidityPeriod"] = v.into();
        }
        let config_path = dir.join("pebble-config.json");
        std::fs::write(&config_path, serde_json::json!({ "pebble": pebble }).to_string()).unwrap();

        let log = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).unwrap());
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns}"), "-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{chall_mgmt}"), "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .expect("pebble-challtestsrv (apt-get install pebble)");
        let mut children = vec![challtestsrv];
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            // Not quite "never": Pebble 2.4.0 makes a fresh authorization only when
            // `rand.Intn(100) > authzReusePercent`, so a draw of 0 still hands a new order the
            // account's valid authorization for the name (about 1 order in 100, issued without
            // a challenge). Tests that need every order validated leave none valid.
            .env("PEBBLE_AUTHZREUSE", "0")
            .env("PEBBLE_WFE_NONCEREJECT", opts.nonce_reject.to_string())
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn();
        match pebble {
            Ok(c) => children.push(c),
            Err(e) => {
                let mut p = Pebble { pki, listen, mgmt, children };
                p.stop();
                panic!("pebble (apt-get install pebble): {e}");
            }
        }
        let mut p = Pebble { pki, listen, mgmt, children };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if p.get(&p.directory_url()).await.is_ok() {
                return Ok(p);
            }
            if p.children.iter_mut().any(|c| matches!(c.try_wait(), Ok(Some(_)))) {
                let why = std::fs::read_to_string(p.log_dir().join("pebble.err")).unwrap_or_default();
                let why = why.lines().last().unwrap_or("no log").to_string();
                p.stop();
                return Err((std::mem::replace(&mut p.pki, Pki::new()), why));
            }
            assert!(Instant::now() < deadline, "pebble did not answer within 20 s; see {}", p.log_dir().display());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `https://127.0.0.1:{port}/dir`.
    pub fn directory_url(&self) -> String {
        format!("https://{}/dir", self.listen)
    }

    /// The CA file that Pebble's own HTTPS listener is checked against.
    pub fn ca_path(&self) -> &Path {
        &self.pki.ca_path
    }

    /// Where Pebble's and challtestsrv's output goes.
    pub fn log_dir(&self) -> PathBuf {
        self.pki.dir.path().to_path_buf()
    }

    /// Pebble's own log so far: what this CA instance received and did.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_dir().join("pebble.log")).unwrap_or_default()
    }

    fn log_lines_with(&self, needle: &str) -> Vec<String> {
        self.log().lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
    }

    /// Orders this Pebble accepted (its `Added order "…" to the db` lines).
    ///
    /// Counted from Pebble's log rather than with the relay's `acme::counters`: those are
    /// process-wide and keyed by directory URL, so a Pebble that gets the port an earlier
    /// test's Pebble had in this process would also count that test's orders.
    pub fn orders(&self) -> usize {
        self.log_lines_with("Added order \"").len()
    }

    /// Accounts this Pebble created (its `There are now N accounts in memory` lines).
    pub fn accounts(&self) -> usize {
        self.log_lines_with(" accounts in memory").len()
    }

    /// Serials of the certificates this Pebble issued, in issue order, as hex without leading
    /// zeros (compare with [`same_serial`]).
    pub fn issued(&self) -> Vec<String> {
        self.log_lines_with("Issued certificate serial ")
            .iter()
            .filter_map(|l| l.split("Issued certificate serial ").nth(1)?.split_whitespace().next())
            .map(|s| s.trim_start_matches('0').to_ascii_lowercase())
            .collect()
    }

    /// GET over HTTPS trusting only the listener CA; the body on 200.
    async fn get(&self, url: &str) -> Result<Bytes, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.pki.ca_pem.as_bytes()).unwrap()).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(oauth_relay::crypto::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
        let resp = tokio::time::timeout(Duration::from_secs(5), client.get(url.parse().unwrap()))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("status {}", resp.status()));
        }
        Ok(resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes())
    }

    /// The root that signs the certificates Pebble issues (regenerated at every start).
    pub async fn root_pem(&self) -> String {
        let body = self.get(&format!("https://{}/roots/0", self.mgmt)).await.expect("pebble root");
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// A TLS client configuration that trusts only Pebble's issuing root, without resumption.
    pub async fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let pem = self.root_pem().await;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(oauth_relay::crypto::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Every connection makes a full handshake: a resumed session shows the chain it was
        // first given, not the one served now.
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    }

    /// Kills both servers and waits for them to exit.
    pub fn stop(&mut self) {
        for mut c in self.children.drain(..).rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pebble {
    /// Stops both servers; when the test is failing, keeps the temp folder (Pebble's log, its
    /// config) and says where it is, so the CA's side of a failure can be read afterwards.
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking()
            && let Ok(fresh) = tempfile::tempdir()
        {
            let kept = std::mem::replace(&mut self.pki.dir, fresh).keep();
            eprintln!("pebble's log kept in {}", kept.join("pebble.log").display());
        }
    }
}
