//! A test certificate authority and leaf certificates, written to a temp folder.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;

/// A CA whose root tests trust, and a folder to put PEM files in.
pub struct Pki {
    pub dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
    pub ca_path: PathBuf,
}

/// A leaf certificate issued by [`Pki`].
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// Hex serial (lower case, no colons) as the relay reports it.
    pub serial: String,
}

impl Pki {
    pub fn new() -> Pki {
        oauth_relay::crypto::provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.distinguished_name.push(DnType::CommonName, "oauth-relay test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("ca cert");
        let ca_pem = cert.pem();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &ca_pem).expect("write ca");
        Pki { issuer: Issuer::new(params, key), dir, ca_pem, ca_path }
    }

    /// Issues a leaf for `names` (DNS names or IP literals) and writes it as `{file}.crt/.key`.
    pub fn leaf(&self, file: &str, names: &[&str]) -> Leaf {
        let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        self.issue(file, params)
    }

    /// Like [`Pki::leaf`], valid only from `not_before` to `not_after` (e.g. already expired, to
    /// exercise readiness).
    pub fn leaf_with_validity(
        &self,
        file: &str,
        names: &[&str],
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        self.issue(file, params)
    }

    fn issue(&self, file: &str, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let serial = {
            use x509_parser::prelude::*;
            let (_, x) = X509Certificate::from_der(cert.der()).expect("parse leaf");
            x.raw_serial_as_string().replace(':', "")
        };
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let cert_path = self.dir.path().join(format!("{file}.crt"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_path, &cert_pem).expect("write cert");
        std::fs::write(&key_path, &key_pem).expect("write key");
        Leaf { cert_pem, key_pem, cert_path, key_path, serial }
    }

    /// A rustls client configuration that trusts only this CA.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        self.client_config_for(rustls::DEFAULT_VERSIONS, alpn)
    }

    /// [`Pki::client_config`] speaking only these TLS `versions`.
    pub fn client_config_for(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        self.client_config_with(oauth_relay::crypto::provider(), versions, alpn)
    }

    /// [`Pki::client_config_for`] with another crypto provider (fewer key exchange groups, say).
    pub fn client_config_with(
        &self,
        provider: Arc<rustls::crypto::CryptoProvider>,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.expect("ca pem")).expect("add root");
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    /// A rustls server configuration for an upstream test server.
    pub fn server_config(&self, leaf: &Leaf, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let chain =
            CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().expect("chain");
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
        let mut cfg = rustls::ServerConfig::builder_with_provider(oauth_relay::crypto::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server cert");
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }
}
