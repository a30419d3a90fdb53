//! The answers to pending ACME challenges, shared by the order that publishes them and the
//! responders that serve them: HTTP-01 on the plain-HTTP listener, TLS-ALPN-01 on the HTTPS
//! listener.
//!
//! Every answer is kept in memory and also written under `{storage}/acme/challenges/`. The
//! file matters when several replicas share one store behind a load balancer (the CA's
//! validation may reach a replica that did not place the order) and for `cert renew`, which
//! orders from a separate process while the running relay answers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use crate::crypto::{hex, unhex};
use crate::fsutil;
use crate::storage::shared::{Shared, SharedError};
use crate::tls::AlpnChallenges;

/// A TLS-ALPN-01 answer: the key authorization digest and the certificate that carries it.
struct AlpnAnswer {
    /// The challenge token this answer is for: only its own order withdraws it.
    token: String,
    digest: Vec<u8>,
    key: Arc<CertifiedKey>,
    /// Published by this process (trusted as is) or read from the store (re-checked each time).
    own: bool,
}

/// How long a challenge answer stays in the shared store: longer than any validation.
const CHALLENGE_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Which challenge answer to copy to the shared store once published.
pub enum Answer {
    Http01(String),
    TlsAlpn01(String),
}

/// Pending challenge answers by HTTP-01 token and by TLS-ALPN-01 hostname.
pub struct Challenges {
    dir: PathBuf,
    http: Mutex<HashMap<String, String>>,
    alpn: Mutex<HashMap<String, AlpnAnswer>>,
    /// Where the files also go when replicas share a store without a shared disk.
    shared: Option<Arc<Shared>>,
    /// Held while an answer is fetched from the shared store; when the last fetch found nothing.
    fetching: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Why a challenge answer could not be published.
#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    #[error("{path}: cannot write the challenge answer: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the TLS-ALPN-01 certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot load the TLS-ALPN-01 key: {0}")]
    Key(#[from] rustls::Error),
    #[error("`{0}` cannot name a challenge file")]
    BadName(String),
}

impl Challenges {
    /// Answers kept in memory and under `{storage}/acme/challenges/`.
    pub fn new(storage: &Path) -> Challenges {
        Challenges {
            dir: storage.join("acme").join("challenges"),
            http: Mutex::new(HashMap::new()),
            alpn: Mutex::new(HashMap::new()),
            shared: None,
            fetching: tokio::sync::Mutex::new(None),
        }
    }

    /// These answers also copied to `shared`, for the replicas the CA's validation may reach.
    pub fn with_shared(mut self, shared: Option<Arc<Shared>>) -> Challenges {
        self.shared = shared;
        self
    }

    /// Copies a just published answer to the shared store (with an expiry: an order that dies
    /// leaves nothing behind for long). Nothing to do without one.
    pub async fn share(&self, answer: Answer) -> Result<(), SharedError> {
        let Some(shared) = &self.shared else { return Ok(()) };
        let name = match answer {
            Answer::Http01(token) => format!("acme/challenges/http-01/{token}"),
            Answer::TlsAlpn01(host) => format!("acme/challenges/tls-alpn-01/{host}"),
        };
        shared.push(&name, Some(CHALLENGE_TTL)).await
    }

    /// Removes a withdrawn answer from the shared store, in the background (it also expires).
    fn unshare(&self, name: String) {
        if let (Some(shared), Ok(rt)) = (self.shared.clone(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                if let Err(e) = shared.push(&name, None).await {
                    tracing::debug!(%name, error = %e, "cannot remove a withdrawn challenge answer from the shared store; it expires");
                }
            });
        }
    }

    fn http_path(&self, token: &str) -> PathBuf {
        self.dir.join("http-01").join(token)
    }

    fn alpn_path(&self, host: &str) -> PathBuf {
        self.dir.join("tls-alpn-01").join(host)
    }

    /// Serves `key_authorization` at `/.well-known/acme-challenge/{token}` until withdrawn.
    pub fn publish_http01(&self, token: &str, key_authorization: &str) -> Result<(), ChallengeError> {
        if !valid_token(token) {
            return Err(ChallengeError::BadName(token.into()));
        }
        let path = self.http_path(token);
        write(&path, key_authorization.as_bytes())?;
        if let Ok(mut m) = self.http.lock() {
            m.insert(token.to_string(), key_authorization.to_string());
        }
        Ok(())
    }

    /// Answers `acme-tls/1` handshakes for `host` with a certificate carrying `digest`, the
    /// answer to challenge `token`. The CA's handshake names only the host, so the latest
    /// answer for a host is served; the token keeps an older order from withdrawing it.
    pub fn publish_tls_alpn01(&self, host: &str, token: &str, digest: &[u8]) -> Result<(), ChallengeError> {
        if !valid_host(host) {
            return Err(ChallengeError::BadName(host.into()));
        }
        if !valid_token(token) {
            return Err(ChallengeError::BadName(token.into()));
        }
        let key = alpn_certificate(host, digest)?;
        write(&self.alpn_path(host), format!("{token} {}", hex(digest)).as_bytes())?;
        if let Ok(mut m) = self.alpn.lock() {
            let answer = AlpnAnswer { token: token.into(), digest: digest.to_vec(), key, own: true };
            m.insert(host.to_string(), answer);
        }
        Ok(())
    }

    /// Stops answering an HTTP-01 token.
    pub fn withdraw_http01(&self, token: &str) {
        if let Ok(mut m) = self.http.lock() {
            m.remove(token);
        }
        if valid_token(token) {
            let _ = std::fs::remove_file(self.http_path(token));
            self.unshare(format!("acme/challenges/http-01/{token}"));
        }
    }

    /// Stops answering TLS-ALPN-01 challenge `token` for `host`; an answer published since
    /// for another token (a later order) stays.
    pub fn withdraw_tls_alpn01(&self, host: &str, token: &str) {
        if let Ok(mut m) = self.alpn.lock()
            && m.get(host).is_some_and(|a| a.token == token)
        {
            m.remove(host);
        }
        if valid_host(host) {
            let path = self.alpn_path(host);
            let ours = std::fs::read_to_string(&path).is_ok_and(|t| t.split_whitespace().next() == Some(token));
            if ours {
                let _ = std::fs::remove_file(path);
                self.unshare(format!("acme/challenges/tls-alpn-01/{host}"));
            }
        }
    }

    /// The key authorization for `token`, from memory or from the shared store.
    pub async fn http01(&self, token: &str) -> Option<String> {
        if !valid_token(token) {
            return None;
        }
        if let Some(k) = self.http.lock().ok().and_then(|m| m.get(token).cloned()) {
            return Some(k);
        }
        let path = self.http_path(token);
        self.fetch(&format!("acme/challenges/http-01/{token}"), &path).await;
        let bytes = tokio::fs::read(path).await.ok()?;
        String::from_utf8(bytes).ok()
    }

    /// Copies one answer from the shared store into `path` when the folder lacks it (with a
    /// shared store only), when another replica placed the order and the CA's validation came here before the change feed did. One fetch at a
    /// time (the CA validates from several places at once: the others wait for the first and
    /// find the file), and none for 100 ms after one that found nothing, so requests for
    /// answers nobody published cannot turn into a stream of Redis calls.
    async fn fetch(&self, name: &str, path: &Path) {
        let Some(shared) = &self.shared else { return };
        if path.exists() {
            return;
        }
        let mut last_miss = self.fetching.lock().await;
        if path.exists() || last_miss.is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(100)) {
            return;
        }
        match shared.pull_name(name).await {
            Ok(true) => {}
            Ok(false) => *last_miss = Some(std::time::Instant::now()),
            Err(e) => {
                *last_miss = Some(std::time::Instant::now());
                tracing::debug!(%name, error = %e, "cannot fetch a challenge answer from the shared store");
            }
        }
    }

    /// The challenge certificate for `host`, from memory or from the shared store.
    pub async fn tls_alpn01(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !valid_host(&host) {
            return None;
        }
        if let Some(a) = self.alpn.lock().ok().and_then(|m| m.get(&host).filter(|a| a.own).map(|a| a.key.clone())) {
            return Some(a);
        }
        // Another process published it: the file is the truth, the memory only a cache.
        let path = self.alpn_path(&host);
        self.fetch(&format!("acme/challenges/tls-alpn-01/{host}"), &path).await;
        let text = tokio::fs::read_to_string(self.alpn_path(&host)).await.ok()?;
        let (token, digest) = text.trim().split_once(' ')?;
        let (token, digest) = (token.to_string(), unhex(digest)?);
        let mut map = self.alpn.lock().ok()?;
        if let Some(a) = map.get(&host).filter(|a| a.digest == digest) {
            return Some(a.key.clone());
        }
        let key = alpn_certificate(&host, &digest).ok()?;
        map.insert(host, AlpnAnswer { token, digest, key: key.clone(), own: false });
        Some(key)
    }
}

impl AlpnChallenges for Challenges {
    fn certificate<'a>(&'a self, host: &'a str) -> futures_util::future::BoxFuture<'a, Option<Arc<CertifiedKey>>> {
        Box::pin(self.tls_alpn01(host))
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ChallengeError> {
    fsutil::write_private(path, bytes)
        .map_err(|source| ChallengeError::Write { path: path.display().to_string(), source })
}

/// The self-signed certificate RFC 8737 asks for: the hostname as its only SAN and the
/// critical `acmeIdentifier` extension holding the SHA-256 of the key authorization.
fn alpn_certificate(host: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, ChallengeError> {
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // `CertifiedKey::from_der` would refuse the critical extension (webpki does not know it).
    let signer = crate::crypto::provider().key_provider.load_private_key(der)?;
    Ok(Arc::new(CertifiedKey::new(vec![CertificateDer::from(cert.der().to_vec())], signer)))
}

/// ACME tokens are base64url; anything else never reaches the file system.
fn valid_token(token: &str) -> bool {
    (1..=256).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A lower-case DNS name, safe as a file name.
pub(crate) fn valid_host(host: &str) -> bool {
    (1..=253).contains(&host.len())
        && !host.starts_with('.')
        && !host.contains("..")
        && host.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_hosts_that_could_escape_the_folder_are_refused() {
        assert!(valid_token("aB3_-x"));
        for t in ["", "../x", "a/b", "a.b", "%2e%2e"] {
            assert!(!valid_token(t), "{t}");
        }
        assert!(valid_host("relay.example.com"));
        for h in ["", ".", "..", "../etc", "a/b", "A.example", "a..b"] {
            assert!(!valid_host(h), "{h}");
        }
    }

    #[tokio::test]
    async fn answers_come_from_the_shared_store_when_another_process_published_them() {
        crate::crypto::provider();
        let dir = tempfile::tempdir().unwrap();
        let publisher = Challenges::new(dir.path());
        let responder = Challenges::new(dir.path());
        publisher.publish_http01("tok-1", "tok-1.thumb").unwrap();
        publisher.publish_tls_alpn01("relay.test", "tok-a", &[7u8; 32]).unwrap();
        assert_eq!(responder.http01("tok-1").await.as_deref(), Some("tok-1.thumb"));
        let key = responder.tls_alpn01("relay.test").await.expect("alpn answer");
        assert_eq!(key.cert.len(), 1);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("acme/challenges/http-01/tok-1")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        publisher.withdraw_http01("tok-1");
        // A later order's answer for the same host is not withdrawn by the earlier order.
        publisher.publish_tls_alpn01("relay.test", "tok-b", &[8u8; 32]).unwrap();
        publisher.withdraw_tls_alpn01("relay.test", "tok-a");
        assert!(responder.tls_alpn01("relay.test").await.is_some());
        assert!(publisher.tls_alpn01("relay.test").await.is_some());
        publisher.withdraw_tls_alpn01("relay.test", "tok-b");
        assert_eq!(responder.http01("tok-1").await, None);
        assert!(responder.tls_alpn01("relay.test").await.is_none());
        assert_eq!(unhex(&hex(&[0, 255, 16])), Some(vec![0, 255, 16]));
    }
}
