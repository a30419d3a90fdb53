//! Behind a TCP load balancer: with `server.proxy_protocol_from`, every connection to the public
//! listeners starts with a PROXY protocol header (v1 text or v2 binary, built here with the
//! `ppp` crate), and its source address is the client the upstream hears about in
//! `X-Forwarded-For`. Connections without one, or from elsewhere, are closed unanswered.
//! Behind an HTTP proxy (`server.trusted_proxies`): its `X-Forwarded-For` names the client, and
//! nobody else's is believed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::common;
use common::process::ChildGuard;
use common::{Pki, RelayUnderTest, TlsClient, Upstream, UpstreamBehaviour};
use ppp::v2::{Builder, Command, Protocol, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "auth.example.test";
const V1: &[u8] = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n";

/// A relay with these `[server]` lines (who may name the client), in front of a plain HTTP
/// upstream that records what it receives.
struct Behind {
    /// Holds the certificate files the relay reads.
    _pki: Pki,
    relay: RelayUnderTest,
    upstream: Upstream,
    client: TlsClient,
}

async fn behind(server: &str) -> Behind {
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &[HOST]);
    let upstream =
        Upstream::start(None, UpstreamBehaviour::fixed(200, &[("content-type", "application/json")], "{}")).await;
    let toml = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nhttp = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n\
         {server}\n\n[limits]\nhandshake_timeout = \"1s\"\n{site}",
        site = common::files_site("auth", &[HOST], &leaf, &format!("upstream = \"http://{}\"", upstream.addr)),
    );
    let relay = RelayUnderTest::start(&toml).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    Behind { _pki: pki, relay, upstream, client }
}

/// A v2 header for a proxied TCP connection from `source`, with an AWS-style TLV after the
/// addresses, as an NLB sends it.
fn v2(source: &str) -> Vec<u8> {
    let source: SocketAddr = source.parse().unwrap();
    let destination: SocketAddr = if source.is_ipv4() { "192.0.2.1:443" } else { "[2001:db8::1]:443" }.parse().unwrap();
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (source, destination))
        .write_tlv(0xEA, b"\x01vpce-0123456789abcdef0")
        .unwrap()
        .build()
        .unwrap()
}

/// What the relay sends back on a plain TCP connection after `bytes`, until it closes (at most
/// 5 s): empty when it closes without answering.
async fn raw_reply(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = tcp.read(&mut buf).await {
            reply.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the relay closes the connection within 5 s");
    reply
}

/// `oauth_relay_proxy_header_failures_total` by reason, scraped from the admin listener. The
/// registry is process-wide, so tests running beside this one can only add to the counts.
async fn proxy_failures(admin: SocketAddr) -> BTreeMap<String, u64> {
    let counts = common::client::scrape(admin, "oauth_relay_proxy_header_failures_total", "reason").await;
    let reasons: Vec<&str> = counts.keys().map(String::as_str).collect();
    assert_eq!(reasons, ["closed", "io", "missing", "timeout", "too_long", "untrusted"], "exported from the start");
    counts
}

/// How much each reason grew from `before` to `after`.
fn grown(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, reason: &str) -> u64 {
    after[reason] - before[reason]
}

#[tokio::test]
async fn a_trusted_http_proxy_names_the_client_and_nobody_else_does() {
    let token = |b: &Behind, xff: &'static str| {
        let client = b.client.clone();
        async move {
            let headers = [("authorization", "Basic dXNlcjpwYXNz"), ("x-forwarded-for", xff)];
            client.send(HOST, "POST", "/v1/auth/token/abc", &headers, "").await
        }
    };
    // The client wrote 1.2.3.4 itself; the trusted proxy (the test client, on 127.0.0.1)
    // appended the address it saw, with the port as Azure Application Gateway writes it.
    let b = behind("trusted_proxies = [\"127.0.0.0/8\"]").await;
    assert_eq!(token(&b, "1.2.3.4, 203.0.113.7:5123").await.status, 200);
    assert_eq!(b.upstream.last().headers["x-forwarded-for"], "1.2.3.4, 203.0.113.7:5123, 127.0.0.1");

    // Without it, a client's own X-Forwarded-For is replaced by its address.
    let b = behind("").await;
    assert_eq!(token(&b, "1.2.3.4").await.status, 200);
    assert_eq!(b.upstream.last().headers["x-forwarded-for"], "127.0.0.1");
    let b = behind("trusted_proxies = [\"10.0.0.0/8\"]").await;
    assert_eq!(token(&b, "1.2.3.4").await.status, 200);
    assert_eq!(b.upstream.last().headers["x-forwarded-for"], "127.0.0.1");
}

/// One policy for every header that names the client: `X-Forwarded-For/-Proto/-Host` and
/// `X-Real-IP` are the relay's own; `Forwarded` and the other `X-Forwarded-*` go on only from a
/// trusted proxy, as it sent them.
#[tokio::test]
async fn forwarding_headers_come_from_the_relay_or_a_trusted_proxy() {
    let claims = [
        ("authorization", "Basic dXNlcjpwYXNz"),
        ("x-forwarded-for", "1.2.3.4, 203.0.113.7"),
        ("forwarded", "for=1.2.3.4, for=203.0.113.7;proto=https"),
        ("x-real-ip", "1.2.3.4"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-port", "8443"),
        ("x-forwarded-prefix", "/admin"),
    ];
    let sent = |b: &Behind| {
        let client = b.client.clone();
        async move { client.send(HOST, "POST", "/v1/auth/token/abc", &claims, "").await }
    };
    let forwarding = |b: &Behind| {
        let seen = b.upstream.last().headers;
        let mut names: Vec<(String, String)> = seen
            .iter()
            .filter(|(n, _)| n.as_str().starts_with("x-forwarded-") || *n == "x-real-ip" || *n == "forwarded")
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        names.sort();
        assert_eq!(seen["authorization"], "Basic dXNlcjpwYXNz", "other headers go on");
        names
    };
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    };

    // A client that is no trusted proxy names itself in nothing the upstream reads.
    let b = behind("").await;
    assert_eq!(sent(&b).await.status, 200);
    let own = [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-host", HOST),
        ("x-forwarded-proto", "https"),
        ("x-real-ip", "127.0.0.1"),
    ];
    assert_eq!(forwarding(&b), pairs(&own));

    // A trusted proxy's Forwarded and X-Forwarded-Port/-Prefix go on; X-Real-IP is the client
    // the relay found in its X-Forwarded-For, as the access line says.
    let b = behind("trusted_proxies = [\"127.0.0.0/8\"]").await;
    assert_eq!(sent(&b).await.status, 200);
    let vouched = [
        ("forwarded", "for=1.2.3.4, for=203.0.113.7;proto=https"),
        ("x-forwarded-for", "1.2.3.4, 203.0.113.7, 127.0.0.1"),
        ("x-forwarded-host", HOST),
        ("x-forwarded-port", "8443"),
        ("x-forwarded-prefix", "/admin"),
        ("x-forwarded-proto", "https"),
        ("x-real-ip", "203.0.113.7"),
    ];
    assert_eq!(forwarding(&b), pairs(&vouched));
}

#[tokio::test]
async fn the_proxy_headers_source_is_the_forwarded_client() {
    let b = behind("proxy_protocol_from = [\"127.0.0.0/8\"]").await;
    let token = |client: TlsClient| async move {
        client.send(HOST, "POST", "/v1/auth/token/abc", &[("authorization", "Basic dXNlcjpwYXNz")], "").await
    };

    // v1, as HAProxy's `send-proxy` writes it.
    let reply = token(b.client.with_preamble(&[V1])).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "{}");
    assert_eq!(b.upstream.last().headers["x-forwarded-for"], "203.0.113.7");

    // v2 over IPv6 with a TLV, as an NLB writes it.
    let header = v2("[2001:db8::7]:40000");
    let reply = token(b.client.with_preamble(&[&header])).await;
    assert_eq!(reply.status, 200);
    assert_eq!(b.upstream.last().headers["x-forwarded-for"], "2001:db8::7");

    // A header that arrives in two parts, 50 ms apart.
    let header = v2("198.51.100.9:40000");
    let reply = token(b.client.with_preamble(&[&header[..10], &header[10..]])).await;
    assert_eq!(reply.status, 200);
    assert_eq!(b.upstream.last().headers["x-forwarded-for"], "198.51.100.9");

    // The balancer's own connections (health checks) say LOCAL or UNKNOWN: the peer stands.
    let local =
        Builder::with_addresses(Version::Two | Command::Local, Protocol::Unspecified, ppp::v2::Addresses::Unspecified)
            .build()
            .unwrap();
    for header in [&local[..], b"PROXY UNKNOWN\r\n"] {
        let reply = token(b.client.with_preamble(&[header])).await;
        assert_eq!(reply.status, 200);
        assert_eq!(b.upstream.last().headers["x-forwarded-for"], "127.0.0.1");
    }
    assert_eq!(b.upstream.hits(), 5);

    // The plain-HTTP listener reads the header too.
    let mut request = V1.to_vec();
    request.extend_from_slice(
        b"GET /v1/auth/callback?code=c HTTP/1.1\r\nHost: auth.example.test\r\nConnection: close\r\n\r\n",
    );
    let reply = String::from_utf8(raw_reply(b.relay.http.unwrap(), &request).await).unwrap();
    assert!(reply.starts_with("HTTP/1.1 308 Permanent Redirect\r\n"), "{reply}");
    assert!(
        reply.contains(&format!(
            "\r\nlocation: https://auth.example.test:{}/v1/auth/callback?code=c\r\n",
            b.relay.https.port()
        )),
        "{reply}"
    );

    // The admin listener does not: it is for the operator, not the balancer.
    let reply = common::client::plain_get(b.relay.admin.unwrap(), "localhost", "/healthz").await;
    assert_eq!((reply.status, reply.text()), (200, "ok"));
}

#[tokio::test]
async fn connections_without_a_header_or_from_elsewhere_are_closed_unanswered() {
    let b = behind("proxy_protocol_from = [\"127.0.0.0/8\"]").await;
    let before = proxy_failures(b.relay.admin.unwrap()).await;
    // A client that reaches the port directly: its ClientHello is not a PROXY header.
    let err = b.client.connect(HOST).await.expect_err("no handshake without a header");
    assert!(matches!(err.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset), "{err:?}");
    let http = b.relay.http.unwrap();
    assert_eq!(raw_reply(http, b"GET /healthz HTTP/1.1\r\nHost: auth.example.test\r\n\r\n").await, b"");
    // A header that never ends is cut off at 1 KiB, and one that stops short at the deadline.
    let mut long = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
    long.resize(2000, 0);
    let started = std::time::Instant::now();
    assert_eq!(raw_reply(http, &long).await, b"");
    // Closed by the deadline, it would have taken at least the deadline since the connect.
    assert!(started.elapsed() < Duration::from_secs(1), "closed at the 1 KiB cap, not at the 1 s deadline");
    assert_eq!(raw_reply(http, &V1[..20]).await, b"");
    assert_eq!(b.upstream.hits(), 0);
    let after = proxy_failures(b.relay.admin.unwrap()).await;
    assert!(grown(&before, &after, "missing") >= 2, "{before:?} -> {after:?}");
    assert!(grown(&before, &after, "too_long") >= 1, "{before:?} -> {after:?}");
    assert!(grown(&before, &after, "timeout") >= 1, "{before:?} -> {after:?}");

    // A peer outside the configured networks is closed even with a good header.
    let b = behind("proxy_protocol_from = [\"192.0.2.0/24\", \"2001:db8::/32\"]").await;
    let mut request = V1.to_vec();
    request.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: auth.example.test\r\n\r\n");
    assert_eq!(raw_reply(b.relay.http.unwrap(), &request).await, b"");
    assert!(b.client.with_preamble(&[V1]).connect(HOST).await.is_err());
    let untrusted = proxy_failures(b.relay.admin.unwrap()).await;
    assert!(grown(&after, &untrusted, "untrusted") >= 2, "{after:?} -> {untrusted:?}");
}

/// Debian's HAProxy in TCP mode in front of the relay, as a production balancer would be, with
/// `send-proxy-v2` (and `send-proxy`, v1): the address the browser connected from reaches the
/// upstream. The client connects from 127.0.0.3, so the relay's peer (HAProxy, 127.0.0.1) and
/// the client differ.
#[tokio::test]
async fn haproxy_in_front_passes_the_client_address_on() {
    let b = behind("proxy_protocol_from = [\"127.0.0.1\"]").await;
    for send_proxy in ["send-proxy-v2", "send-proxy"] {
        let port = common::pebble::free_port();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                 frontend front\n  bind 127.0.0.2:{port}\n  default_backend relay\n\
                 backend relay\n  server relay {relay} {send_proxy}\n",
                relay = b.relay.https,
            ),
        )
        .unwrap();
        let haproxy = std::process::Command::new("haproxy")
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run haproxy (scripts/test installs Debian's haproxy)");
        let _haproxy = ChildGuard(haproxy);
        let front: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(front).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "haproxy listens on {front} within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let client = TlsClient { addr: front, ..b.client.clone() }.with_source("127.0.0.3".parse().unwrap());
        let reply = client.send(HOST, "POST", "/v1/auth/token/abc", &[], "").await;
        assert_eq!(reply.status, 200, "{send_proxy}");
        assert_eq!(b.upstream.last().headers["x-forwarded-for"], "127.0.0.3", "{send_proxy}");
    }
    assert_eq!(b.upstream.hits(), 2);
}
