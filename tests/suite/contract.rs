//! The operator's contract: what `check` accepts, `serve` runs. The shipped example
//! configurations, mutated as a careless or hostile operator would (lines deleted and
//! duplicated, values swapped between keys, extreme numbers and durations, unicode and control
//! characters, a hundred sites more), go through the real `check`, which must answer (0 or 64)
//! and never panic or hang; each one it accepts is started with the real `serve` on loopback,
//! must answer `/healthz` and stop cleanly on SIGTERM.
//!
//! Before `serve`, the listen addresses, the store and the certificate paths of the examples
//! are pointed at loopback port 0 and a temporary folder (the same text replacement for every
//! case), so any accepted configuration can run here. A bounded number of cases and of `serve`
//! starts keeps the test to a few seconds per start.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config as Runner, TestCaseError, TestRunner};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::common::Pki;
use crate::common::TlsClient;
use crate::common::process::RelayProcess;
use oauth_relay::Config;

const BIN: &str = env!("CARGO_BIN_EXE_oauth-relay");
/// Mutated configurations put through `check`.
const CASES: u32 = 128;
/// Of those `check` accepts, how many are started with `serve` (each takes well under a second
/// on loopback; the rest are only checked).
const SERVES: usize = 28;
/// The longest `check` may take on any configuration.
const CHECK_BOUND: Duration = Duration::from_secs(20);
/// The proxy variables `[outbound] proxy = "env"` reads, cleared so the machine's own do not
/// decide the outcome.
const PROXY_VARS: [&str; 8] =
    ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"];

const SEEDS: [&str; 3] = [
    include_str!("../../config/example.toml"),
    include_str!("../../config/multi-site.toml"),
    include_str!("../../config/local.toml"),
];

/// What an operator might do to a configuration; line numbers are taken modulo the file's
/// length, key lines modulo the number of `key = value` lines.
#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    /// Swaps the values of two key lines.
    Swap(usize, usize),
    /// Puts this text as the value of a key line.
    Value(usize, String),
    /// Inserts a character at a position of a line.
    Insert(usize, usize, char),
    /// Appends this many copies of the last site, each with hostnames and a name of its own.
    Sites(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let numbers = [
        "0",
        "-1",
        "1",
        "65535",
        "65536",
        "4294967296",
        "2305843009213693952",
        "9223372036854775807",
        "18446744073709551615",
        "1e308",
        "nan",
    ];
    let durations = [
        "\"0s\"",
        "\"1ns\"",
        "\"99ms\"",
        "\"25h\"",
        "\"18446744073709551615s\"",
        "\"584542046091y\"",
        "\"-1s\"",
        "\"5 parsecs\"",
    ];
    let values = numbers.iter().chain(&durations).map(|s| s.to_string()).collect::<Vec<_>>();
    let chars =
        ['\u{0}', '\u{1b}', '\n', '\u{7f}', '\u{e9}', '\u{202e}', '\u{feff}', '\u{1f600}', '"', '\\', '#', '\t', '['];
    prop_oneof![
        4 => any::<usize>().prop_map(Mutation::Delete),
        4 => any::<usize>().prop_map(Mutation::Duplicate),
        4 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        4 => (any::<usize>(), prop::sample::select(values)).prop_map(|(l, v)| Mutation::Value(l, v)),
        4 => (any::<usize>(), any::<usize>(), prop::sample::select(chars.to_vec())).prop_map(|(l, at, c)| Mutation::Insert(l, at, c)),
        1 => (1usize..120).prop_map(Mutation::Sites),
    ]
}

/// The line indices of `key = value` lines.
fn key_lines(lines: &[String]) -> Vec<usize> {
    let is_key = |l: &str| {
        l.split_once(" = ")
            .is_some_and(|(k, _)| !k.is_empty() && k.trim().chars().all(|c| c.is_ascii_lowercase() || c == '_'))
    };
    lines.iter().enumerate().filter(|(_, l)| is_key(l)).map(|(i, _)| i).collect()
}

fn apply(lines: &mut Vec<String>, m: &Mutation) {
    let n = lines.len();
    let keys = key_lines(lines);
    let key = |i: usize| keys[i % keys.len()];
    let value_of = |l: &str| l.split_once(" = ").map(|(_, v)| v.to_string()).unwrap_or_default();
    let with_value = |l: &str, v: &str| format!("{} = {v}", l.split_once(" = ").map_or(l, |(k, _)| k));
    match m {
        Mutation::Delete(i) => {
            lines.remove(i % n);
        }
        Mutation::Duplicate(i) => lines.insert(i % n, lines[i % n].clone()),
        Mutation::Swap(a, b) => {
            let (a, b) = (key(*a), key(*b));
            let (va, vb) = (value_of(&lines[a]), value_of(&lines[b]));
            lines[a] = with_value(&lines[a], &vb);
            lines[b] = with_value(&lines[b], &va);
        }
        Mutation::Value(i, v) => {
            let i = key(*i);
            lines[i] = with_value(&lines[i], v);
        }
        Mutation::Insert(i, at, c) => {
            let line = &mut lines[i % n];
            let chars: Vec<char> = line.chars().collect();
            let at = at % (chars.len() + 1);
            *line = chars[..at].iter().chain(std::iter::once(c)).chain(&chars[at..]).collect();
        }
        Mutation::Sites(k) => {
            let Some(start) = lines.iter().rposition(|l| l.trim() == "[[site]]") else { return };
            let block: Vec<String> = lines[start..].to_vec();
            for copy in 0..*k {
                let tag = format!("s{copy}");
                lines.extend(block.iter().map(|l| {
                    let l = l
                        .replace(".example.", &format!(".{tag}.example."))
                        .replace("\"localhost\"", &format!("\"{tag}.localhost\""));
                    let l = l.replace("default = true", "default = false");
                    if l.starts_with("name = \"") { l.replacen("name = \"", &format!("name = \"{tag}-"), 1) } else { l }
                }));
            }
        }
    }
}

/// The examples' machine-specific values pointed at loopback port 0 and `dir`.
fn localise(text: &str, dir: &Path) -> String {
    let mut text = text.to_string();
    for addr in ["0.0.0.0:443", "0.0.0.0:80", "127.0.0.1:9090", "127.0.0.1:8443"] {
        text = text.replace(addr, "127.0.0.1:0");
    }
    let d = dir.display();
    text.replace("/var/lib/oauth-relay", &format!("{d}/store"))
        .replace("storage = \"certs\"", &format!("storage = \"{d}/store\""))
        .replace("/etc/oauth-relay/tls/", &format!("{d}/tls/"))
}

/// The certificate files the examples name, for every hostname they use.
fn write_certificates(pki: &Pki, dir: &Path) {
    let leaf = pki.leaf("examples", &["aurinko.example.com", "oauth.example.com", "oauth.example.org"]);
    for sub in ["", "aurinko/", "other/"] {
        let folder = dir.join("tls").join(sub);
        std::fs::create_dir_all(&folder).expect("tls folder");
        std::fs::write(folder.join("tls.crt"), &leaf.cert_pem).expect("cert");
        std::fs::write(folder.join("tls.key"), &leaf.key_pem).expect("key");
    }
}

/// `oauth-relay check --config PATH` in `dir`: exit status and stderr; fails if it takes longer
/// than [`CHECK_BOUND`].
fn check(path: &Path, dir: &Path) -> Result<(i32, String), TestCaseError> {
    let mut cmd = Command::new(BIN);
    PROXY_VARS.iter().for_each(|v| {
        cmd.env_remove(v);
    });
    let mut child = cmd
        .arg("check")
        .arg("--config")
        .arg(path)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn check");
    let until = Instant::now() + CHECK_BOUND;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut err).expect("read stderr");
            return Ok((status.code().unwrap_or(-1), err));
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TestCaseError::fail(format!("check did not finish within {CHECK_BOUND:?}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One case: check, and serve what check accepts (while the budget of starts lasts). Returns
/// whether it started the relay.
fn case(pki: &Pki, seed: usize, mutations: &[Mutation], serve: bool) -> Result<bool, TestCaseError> {
    let mut lines: Vec<String> = SEEDS[seed].lines().map(String::from).collect();
    for m in mutations {
        apply(&mut lines, m);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_certificates(pki, dir.path());
    let text = localise(&lines.join("\n"), dir.path());
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, &text).expect("write config");
    let (code, err) = check(&path, dir.path())?;
    prop_assert!(code == 0 || code == 64, "check exited {code}:\n{err}\n--- config:\n{text}");
    prop_assert!(!err.contains("panicked"), "{err}");
    if code != 0 || !serve {
        return Ok(false);
    }
    let config = Config::parse("relay.toml", &text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
    let s = &config.server;
    let loopback = s.https.iter().chain(&s.http).chain(&s.admin).all(|a| a.ip().is_loopback() && a.port() == 0);
    // The default `https` (0.0.0.0:443, when the line was deleted) is not this test's to bind;
    // certificate files check could not read are a warning that says serve will refuse.
    if !loopback || err.contains("will refuse to start") {
        return Ok(false);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(serve_once(&config, &path, dir.path(), &text))?;
    Ok(true)
}

/// Starts `serve`, asks `/healthz` on the admin listener, else the plain-HTTP one, else HTTPS,
/// and stops it with SIGTERM.
async fn serve_once(config: &Config, path: &Path, dir: &Path, text: &str) -> Result<(), TestCaseError> {
    let mut relay = RelayProcess::serve(path, &[], |cmd| {
        cmd.current_dir(dir);
        PROXY_VARS.iter().for_each(|v| {
            cmd.env_remove(v);
        });
    });
    let answer = if config.server.admin.is_some() {
        let addr = relay.admin_addr().await;
        healthz(tokio::net::TcpStream::connect(addr).await.expect("connect admin"), "localhost").await
    } else if !config.server.http.is_empty() {
        let addr = relay.http_addr().await;
        healthz(tokio::net::TcpStream::connect(addr).await.expect("connect http"), "localhost").await
    } else {
        let addr = relay.https_addr().await;
        let host = config.sites[0].hostnames[0].replace('*', "x");
        let stream = TlsClient::new(addr, any_certificate()).connect(&host).await.expect("TLS handshake");
        healthz(stream, &host).await
    };
    let (status, log) = relay.stop().await;
    prop_assert!(answer.starts_with("HTTP/1.1 200 "), "/healthz answered {answer:?}\n{log}\n--- config:\n{text}");
    prop_assert!(status.success(), "serve exited {status}:\n{log}\n--- config:\n{text}");
    Ok(())
}

/// `GET /healthz` with `Connection: close`, the whole answer (at most 10 s).
async fn healthz(mut stream: impl AsyncRead + AsyncWrite + Unpin, host: &str) -> String {
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write request");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn whatever_check_accepts_serve_runs_answers_healthz_and_stops() {
    let pki = Pki::new();
    let config = Runner { cases: CASES, failure_persistence: None, max_shrink_iters: 64, ..Runner::default() };
    let mut runner = TestRunner::new(config);
    let served = std::cell::Cell::new(0usize);
    let cases = (0..SEEDS.len(), prop::collection::vec(mutation(), 1..4));
    runner
        .run(&cases, |(seed, mutations)| {
            if case(&pki, seed, &mutations, served.get() < SERVES)? {
                served.set(served.get() + 1);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{} mutated configurations served", served.get());
    assert!(served.get() >= 4, "only {} mutated configurations were served", served.get());
}

/// Accepts any server certificate (the relay's self-signed ones included): this test asks
/// whether the relay answers, not whom to trust.
fn any_certificate() -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct Any(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = oauth_relay::crypto::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Any(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}
