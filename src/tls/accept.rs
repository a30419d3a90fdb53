//! The TLS handshake for one connection: read the ClientHello, answer a CA's TLS-ALPN-01
//! validation, refuse names we do not serve with an `unrecognized_name` alert, then finish the
//! handshake, all under one deadline.

use std::sync::Arc;
use std::time::Duration;

use rustls::server::{Acceptor, ServerConfig};
use rustls::{AlertDescription, ContentType, ProtocolVersion};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;

use super::challenge::{ACME_TLS_ALPN, challenge_server_config};
use super::{CertStore, Gather};

/// An established TLS connection, over the stream that gathers its first writes.
pub type TlsStream = tokio_rustls::server::TlsStream<Gather>;

/// Why a handshake did not complete; each is a handshake-failure reason in logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake did not finish within {0:?}")]
    Timeout(Duration),
    #[error("no SNI and no default site")]
    NoSni,
    #[error("SNI names no configured site")]
    UnknownSni,
    /// Not a failure: a CA's TLS-ALPN-01 validation was answered and the connection closed.
    #[error("ACME TLS-ALPN-01 challenge answered")]
    AcmeChallenge,
    #[error("TLS handshake failed: {0}")]
    Io(#[from] std::io::Error),
}

impl HandshakeError {
    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Timeout(_) => "timeout",
            HandshakeError::NoSni => "no_sni",
            HandshakeError::UnknownSni => "unknown_sni",
            HandshakeError::AcmeChallenge => "acme_tls_alpn",
            HandshakeError::Io(e) => match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::PeerIncompatible(_)) => "protocol_version",
                Some(_) => "tls_error",
                None => "io",
            },
        }
    }
}

/// A finished handshake.
pub struct Handshake {
    pub stream: TlsStream,
    /// Index of the site whose certificate was served.
    pub site: usize,
    /// The SNI hostname the client sent (`None`: default site by IP or no SNI).
    pub server_name: Option<Arc<str>>,
    /// True when ALPN picked HTTP/2.
    pub h2: bool,
}

/// Runs the whole handshake on `tcp` within `deadline`.
pub async fn accept(
    tcp: TcpStream,
    store: &CertStore,
    config: &Arc<ServerConfig>,
    deadline: Duration,
) -> Result<Handshake, HandshakeError> {
    match tokio::time::timeout(deadline, handshake(Gather::new(tcp), store, config)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout(deadline)),
    }
}

async fn handshake(io: Gather, store: &CertStore, config: &Arc<ServerConfig>) -> Result<Handshake, HandshakeError> {
    let start = LazyConfigAcceptor::new(Acceptor::default(), io).await?;
    let hello = start.client_hello();
    // RFC 8737: a ClientHello offering `acme-tls/1` is a CA validating TLS-ALPN-01.
    let acme_name = hello
        .alpn()
        .is_some_and(|mut p| p.any(|p| p == ACME_TLS_ALPN))
        .then(|| hello.server_name().map(str::to_string))
        .flatten();
    if let Some(name) = acme_name {
        if let Some(key) = store.challenges().certificate(&name).await {
            let mut stream = start.into_stream(challenge_server_config(key)).await?;
            let _ = stream.shutdown().await;
            tracing::info!(hostname = %name, "answered an ACME TLS-ALPN-01 validation");
            return Err(HandshakeError::AcmeChallenge);
        }
    }
    let hello = start.client_hello();
    let server_name: Option<Arc<str>> = hello.server_name().map(Arc::from);
    let sni = server_name.is_some();
    let site = match store.lookup(hello.server_name()) {
        Some(slot) => slot.site,
        None => {
            let err = if sni { HandshakeError::UnknownSni } else { HandshakeError::NoSni };
            let mut io = start.io;
            let _ = io.write_all(&unrecognized_name()).await;
            let _ = io.shutdown().await;
            return Err(err);
        }
    };
    let mut stream = start.into_stream(config.clone()).await?;
    stream.get_mut().0.handshake_done();
    let h2 = stream.get_ref().1.alpn_protocol() == Some(super::ALPN_H2);
    Ok(Handshake { stream, site, server_name, h2 })
}

/// A fatal `unrecognized_name` alert in a plaintext record (RFC 8446 sections 5.1 and 6), the
/// answer RFC 6066 gives a ClientHello naming a host the server does not serve. rustls sends
/// only the alerts it picks itself (`access_denied` when no certificate resolves), so this one
/// record is put together from its public enums: content type, record version, length 2,
/// level fatal (2), description.
fn unrecognized_name() -> [u8; 7] {
    let [major, minor] = u16::from(ProtocolVersion::TLSv1_2).to_be_bytes();
    [u8::from(ContentType::Alert), major, minor, 0, 2, 2, u8::from(AlertDescription::UnrecognisedName)]
}
