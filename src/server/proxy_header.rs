//! The PROXY protocol: the client's address as a TCP load balancer in front saw it.
//!
//! The relay terminates TLS itself (it must, to answer ACME challenges), so a load balancer in
//! front can only pass TCP through, and the relay's peer is then the balancer. HAProxy's PROXY
//! protocol (v1 text or v2 binary, as AWS NLB, HAProxy `send-proxy`, DigitalOcean, Hetzner and
//! Kubernetes load balancers send it) puts the client's address in front of the first TLS byte.
//! With `server.proxy_protocol_from` set, every connection to the public listeners must come
//! from one of those networks and start with such a header; its source address then stands for
//! the client in `X-Forwarded-For` and the logs. Anything else is closed before a byte is
//! answered, so a client that reaches the port directly cannot choose its own address.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use ppp::{HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest header read: a v1 header is at most 107 bytes, a v2 header 16 bytes plus its
/// addresses (at most 216) and the balancer's TLVs (AWS sends a VPC endpoint id, about 30).
const MAX_HEADER: usize = 1024;

/// How long to wait for the rest of a header that arrived in parts (senders are meant to send
/// it whole, so this is rare) before peeking again.
const PARTIAL_PAUSE: Duration = Duration::from_millis(5);

/// Why a connection was closed before its header was read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("peer is not in server.proxy_protocol_from")]
    Untrusted,
    #[error("connection does not start with a PROXY protocol header")]
    Missing,
    #[error("PROXY protocol header is longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("peer closed the connection before the PROXY protocol header ended")]
    Closed,
    #[error("no PROXY protocol header within the handshake timeout")]
    Timeout,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
}

impl ProxyHeaderError {
    /// Whether a configured balancer sent something else than a PROXY header: a configuration
    /// mistake on one side, worth a warning. (A balancer's TCP health check connects and closes
    /// without a byte, and a stranger is no news; neither is.)
    pub fn is_misconfiguration(&self) -> bool {
        matches!(self, ProxyHeaderError::Missing | ProxyHeaderError::TooLong)
    }

    /// The `reason` label of `oauth_relay_proxy_header_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyHeaderError::Untrusted => "untrusted",
            ProxyHeaderError::Missing => "missing",
            ProxyHeaderError::TooLong => "too_long",
            ProxyHeaderError::Closed => "closed",
            ProxyHeaderError::Timeout => "timeout",
            ProxyHeaderError::Io(_) => "io",
        }
    }
}

/// Reads the PROXY header at the start of `tcp`, taking exactly its bytes off the stream, and
/// returns the client's address: the header's source for a proxied TCP connection, `peer` for
/// the balancer's own connections (`LOCAL`, `UNKNOWN`: health checks). The caller bounds it.
pub async fn read(tcp: &mut TcpStream, peer: SocketAddr, from: &[IpNet]) -> Result<SocketAddr, ProxyHeaderError> {
    if !crate::config::in_networks(from, peer.ip()) {
        return Err(ProxyHeaderError::Untrusted);
    }
    let mut buf = vec![0u8; MAX_HEADER];
    let mut seen = 0;
    loop {
        // Peeking leaves the TLS bytes behind the header where the handshake will read them.
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        match parse(&buf[..n]) {
            Parsed::Header { len, client } => {
                tcp.read_exact(&mut buf[..len]).await?;
                return Ok(client.unwrap_or(peer));
            }
            Parsed::Incomplete if n == MAX_HEADER => return Err(ProxyHeaderError::TooLong),
            Parsed::Incomplete => {
                if n == seen {
                    // The bytes stay readable, so a peek would return at once: wait a little.
                    tokio::time::sleep(PARTIAL_PAUSE).await;
                }
                seen = n;
            }
            Parsed::Missing => return Err(ProxyHeaderError::Missing),
        }
    }
}

/// What the first bytes of a connection are.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A whole header of `len` bytes; the client's address unless it is the balancer's own
    /// connection.
    Header { len: usize, client: Option<SocketAddr> },
    /// The start of a header, or too few bytes to tell.
    Incomplete,
    /// Not a PROXY header.
    Missing,
}

/// Parses (with ppp) the header `bytes` start with.
fn parse(bytes: &[u8]) -> Parsed {
    // A v1 header ends with CRLF; until it has come, it is incomplete (ppp calls some cuts, as
    // one right after the source port, an invalid header).
    if bytes.starts_with(b"PROXY ") && !bytes.windows(2).any(|w| w == b"\r\n") {
        return Parsed::Incomplete;
    }
    match HeaderResult::parse(bytes) {
        HeaderResult::V1(Ok(h)) => Parsed::Header { len: h.header.len(), client: v1_source(&h.addresses) },
        HeaderResult::V2(Ok(h)) => Parsed::Header { len: h.len(), client: v2_source(&h) },
        incomplete if incomplete.is_incomplete() => Parsed::Incomplete,
        _ => Parsed::Missing,
    }
}

fn v1_source(a: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match a {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_source(h: &ppp::v2::Header<'_>) -> Option<SocketAddr> {
    if h.command != ppp::v2::Command::Proxy {
        return None;
    }
    match h.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::Unix(_) | ppp::v2::Addresses::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use proptest::prelude::*;

    use super::*;

    /// Any client and balancer address, v4 or v6 (a header carries one family).
    fn addresses() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>(), any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(a, p, b, q)| (SocketAddr::from((a, p)), SocketAddr::from((b, q)))),
            (any::<[u8; 16]>(), any::<u16>(), any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p, b, q)| {
                (SocketAddr::from((IpAddr::from(a), p)), SocketAddr::from((IpAddr::from(b), q)))
            }),
        ]
    }

    /// A v1 (text) or v2 (binary) header naming `client`.
    fn header(v2: bool, client: SocketAddr, balancer: SocketAddr) -> Vec<u8> {
        if v2 {
            let command = ppp::v2::Version::Two as u8 | ppp::v2::Command::Proxy as u8;
            ppp::v2::Builder::with_addresses(command, ppp::v2::Protocol::Stream, (client, balancer))
                .build()
                .expect("a v2 header")
        } else {
            ppp::v1::Addresses::from((client, balancer)).to_string().into_bytes()
        }
    }

    #[test]
    fn a_v1_header_cut_after_its_source_port_waits_for_the_rest() {
        assert_eq!(parse(b"PROXY TCP4 0.0.0.10 100.10.100.100 10000 "), Parsed::Incomplete);
        let whole = b"PROXY TCP4 0.0.0.10 100.10.100.100 10000 1000\r\n";
        let client = Some(SocketAddr::from(([0, 0, 0, 10], 10000)));
        assert_eq!(parse(whole), Parsed::Header { len: whole.len(), client });
    }

    proptest! {
        /// Whatever a connection starts with, parsing never panics, and a header it accepts
        /// lies within the bytes it was given.
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Parsed::Header { len, .. } = parse(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }

        /// A header followed by the TLS bytes: exactly the header is taken, and the client is
        /// the address it names; any shorter start of it waits for more.
        #[test]
        fn a_header_names_its_client_and_its_start_waits(
            (client, balancer) in addresses(),
            v2 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
            cut in any::<prop::sample::Index>(),
        ) {
            let head = header(v2, client, balancer);
            let mut bytes = head.clone();
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(parse(&bytes), Parsed::Header { len: head.len(), client: Some(client) });
            let short = cut.index(head.len());
            prop_assert_eq!(parse(&head[..short]), Parsed::Incomplete);
        }
    }
}
