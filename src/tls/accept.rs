//! The TLS handshake for one connection: read the ClientHello, refuse names we do not serve with
//! an `unrecognized_name` alert, then finish the handshake, all under one deadline.

use std::sync::Arc;
use std::time::Duration;

use rustls::AlertDescription;
use rustls::internal::msgs::enums::AlertLevel;
use rustls::internal::msgs::message::{Message, PlainMessage};
use rustls::server::{Acceptor, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use super::CertStore;

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
pub struct Handshake<IO> {
    pub stream: TlsStream<IO>,
    /// Index of the site whose certificate was served.
    pub site: usize,
    /// The SNI hostname the client sent (`None`: default site by IP or no SNI).
    pub server_name: Option<Arc<str>>,
    /// True when ALPN picked HTTP/2.
    pub h2: bool,
}

/// Runs the whole handshake within `deadline`.
pub async fn accept<IO>(
    io: IO,
    store: &CertStore,
    config: &Arc<ServerConfig>,
    deadline: Duration,
) -> Result<Handshake<IO>, HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(deadline, handshake(io, store, config)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout(deadline)),
    }
}

async fn handshake<IO>(io: IO, store: &CertStore, config: &Arc<ServerConfig>) -> Result<Handshake<IO>, HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let start = LazyConfigAcceptor::new(Acceptor::default(), io).await?;
    let hello = start.client_hello();
    // RFC 8737: a ClientHello offering `acme-tls/1` is a CA validating TLS-ALPN-01.
    let acme_name = hello
        .alpn()
        .is_some_and(|mut p| p.any(|p| p == crate::acme::ACME_TLS_ALPN))
        .then(|| hello.server_name().map(str::to_string))
        .flatten();
    if let Some(name) = acme_name {
        if let Some(key) = store.challenges().tls_alpn01(&name).await {
            let mut stream = start.into_stream(crate::acme::challenge_server_config(key)).await?;
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
            // rustls would answer `access_denied`; RFC 6066 says `unrecognized_name`.
            let alert = Message::build_alert(AlertLevel::Fatal, AlertDescription::UnrecognisedName);
            let bytes = PlainMessage::from(alert).into_unencrypted_opaque().encode();
            let _ = io.write_all(&bytes).await;
            let _ = io.shutdown().await;
            return Err(err);
        }
    };
    let stream = start.into_stream(config.clone()).await?;
    let h2 = stream.get_ref().1.alpn_protocol() == Some(super::ALPN_H2);
    Ok(Handshake { stream, site, server_name, h2 })
}
