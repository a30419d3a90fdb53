//! A TLS scan of the relay with another implementation: OpenSSL's `s_client` tries every
//! protocol version and every cipher suite it knows, and the scan fails on TLS below 1.2, on a
//! suite that is not AEAD, on compression, on a missing RFC 5746 renegotiation indication, on a
//! key exchange other than X25519 or a NIST curve, or on a missing `Strict-Transport-Security`
//! header. `scripts/tls-scan` runs testssl.sh
//! for the full list of known vulnerabilities (it takes minutes, too long for every test run).

use std::process::{Command, Stdio};

use crate::common::{self, Pki, RelayUnderTest, TlsClient};

const HOST: &str = "auth.example.test";

/// What one `openssl s_client` connection said: whether the handshake completed, and its
/// output (the negotiated protocol, suite, temporary key and compression).
struct Probe {
    connected: bool,
    output: String,
}

/// One `openssl s_client` handshake with `args`, bounded to 10 seconds; stdin is empty, so it
/// ends as soon as the handshake does.
fn probe(addr: std::net::SocketAddr, ca: &std::path::Path, args: &[&str]) -> Probe {
    let out = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect", &addr.to_string(), "-servername", HOST, "-CAfile"])
        .arg(ca)
        .args(["-verify_return_error", "-verify_hostname", HOST])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client (scripts/test installs openssl)");
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let connected = out.status.success() && output.contains("Verify return code: 0 (ok)");
    Probe { connected, output }
}

/// The suites `openssl ciphers` lists for `args` (one protocol, a cipher string).
fn suites(args: &[&str]) -> Vec<String> {
    let out = Command::new("openssl").arg("ciphers").args(args).output().expect("run openssl ciphers");
    assert!(out.status.success(), "openssl ciphers {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().split(':').map(str::to_string).collect()
}

/// Whether a TLS 1.2 suite (OpenSSL's name) is an AEAD: AES-GCM, ChaCha20-Poly1305 or AES-CCM.
fn is_aead(suite: &str) -> bool {
    ["GCM", "CHACHA20", "CCM"].iter().any(|a| suite.contains(a))
}

#[tokio::test]
async fn openssl_finds_only_tls_1_2_and_1_3_with_aead_suites_and_hsts() {
    let pki = Pki::new();
    let relay = RelayUnderTest::start(&common::one_site_config(&pki, "", "", "")).await;
    let (addr, ca) = (relay.https, pki.ca_path.clone());

    let scan = tokio::task::spawn_blocking(move || {
        // Old protocols, offered with every suite OpenSSL still has for them: refused.
        let all_levels = "ALL:COMPLEMENTOFALL:@SECLEVEL=0";
        for old in ["-tls1", "-tls1_1"] {
            let p = probe(addr, &ca, &[old, "-cipher", all_levels]);
            assert!(!p.connected, "{old} was accepted:\n{}", p.output);
            // Refused in the handshake (an alert), not before it by a bad option or no socket.
            assert!(p.output.contains("CONNECTED(") && p.output.contains("alert"), "{old}:\n{}", p.output);
        }
        // TLS 1.2: every suite OpenSSL knows, one at a time; those accepted are AEAD.
        let mut accepted = Vec::new();
        for suite in suites(&["-tls1_2", all_levels]) {
            let p = probe(addr, &ca, &["-tls1_2", "-cipher", &format!("{suite}:@SECLEVEL=0")]);
            if p.connected {
                assert!(p.output.contains("Compression: NONE"), "{suite}: compression:\n{}", p.output);
                // RFC 5746: renegotiation can never be spliced onto another session.
                let renegotiation = "Secure Renegotiation IS supported";
                assert!(p.output.contains(renegotiation), "{suite}: no RFC 5746:\n{}", p.output);
                let key = p.output.lines().find(|l| l.starts_with("Server Temp Key:")).unwrap_or("no temp key");
                assert!(
                    ["X25519", "ECDH, prime256v1", "ECDH, secp384r1"].iter().any(|k| key.contains(k)),
                    "{suite}: {key}"
                );
                accepted.push(suite);
            }
        }
        assert!(!accepted.is_empty(), "no TLS 1.2 suite was accepted");
        let weak: Vec<&String> = accepted.iter().filter(|s| !is_aead(s)).collect();
        assert!(weak.is_empty(), "non-AEAD TLS 1.2 suites accepted: {weak:?} (all accepted: {accepted:?})");
        // TLS 1.3: every suite there is an AEAD; at least one must work.
        let tls13: Vec<String> = suites(&["-tls1_3", "-s"]).into_iter().filter(|s| s.starts_with("TLS_")).collect();
        let ok13 = tls13.iter().filter(|s| probe(addr, &ca, &["-tls1_3", "-ciphersuites", s]).connected).count();
        assert!(ok13 > 0, "no TLS 1.3 suite of {tls13:?} was accepted");
        accepted
    });
    let accepted = scan.await.expect("scan");
    eprintln!("TLS 1.2 suites accepted: {accepted:?}");

    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    let reply = client.get(HOST, "/healthz").await;
    assert_eq!(reply.header("strict-transport-security"), "max-age=31536000");
}
