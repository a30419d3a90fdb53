//! The limits over real sockets: oversized headers and queries (HTTP/1.1 and HTTP/2), slow
//! header senders, idle keep-alive connections and how they are closed, silent TLS clients, and
//! the cap on concurrent connections.
//!
//! The deadlines' logic (idle, header read, a request in flight, drain) is proven on a paused
//! clock in `src/server/deadline.rs`. The tests here check what that cannot: the configuration
//! reaching each connection, bytes counted through real TLS, how the connection ends
//! (`close_notify`, GOAWAY), the handshake deadline. Their deadlines are a few hundred
//! milliseconds, which is all the wiring needs; a paused clock cannot drive real sockets.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Pki, RelayUnderTest, TlsClient, Upstream, UpstreamBehaviour};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A relay for `auth.example.test` with the given `[limits]` lines and optional site lines.
async fn relay(pki: &Pki, limits: &str, site_extra: &str) -> (RelayUnderTest, TlsClient) {
    let toml = common::one_site_config(pki, "", limits, site_extra);
    let relay = RelayUnderTest::start(&toml).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    (relay, client)
}

/// Reads until the peer closes and returns how long that took; panics after `bound`.
async fn time_until_closed(read: impl tokio::io::AsyncRead + Unpin, bound: Duration) -> Duration {
    until_closed(read, bound).await.0
}

/// Reads until the peer closes: how long that took, and how it closed (`Ok` for a clean end,
/// which over TLS means the relay sent `close_notify`); panics after `bound`.
async fn until_closed(mut read: impl tokio::io::AsyncRead + Unpin, bound: Duration) -> (Duration, std::io::Result<()>) {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let end = tokio::time::timeout(bound, async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the relay kept the connection open for {bound:?}"));
    (start.elapsed(), end)
}

#[tokio::test]
async fn oversized_header_gets_431() {
    let pki = Pki::new();
    let (_relay, client) = relay(&pki, "max_header_bytes = 8192", "").await;
    let big = "a".repeat(9000);
    let reply = client.send("auth.example.test", "GET", "/v1/auth/callback?x=1", &[("x-big", &big)], "").await;
    assert_eq!(reply.status, 431);
    // Just under the limit still passes.
    let fits = "a".repeat(7000);
    let reply = client.send("auth.example.test", "GET", "/v1/auth/callback?x=1", &[("x-big", &fits)], "").await;
    assert_eq!(reply.status, 302);
}

#[tokio::test]
async fn long_query_gets_414() {
    let pki = Pki::new();
    let (_relay, client) = relay(&pki, "max_query_bytes = 100", "").await;
    let at_limit = format!("state={}", "s".repeat(94));
    assert_eq!(at_limit.len(), 100);
    let reply = client.get("auth.example.test", &format!("/v1/auth/callback?{at_limit}")).await;
    assert_eq!(reply.status, 302);
    let reply = client.get("auth.example.test", &format!("/v1/auth/callback?{at_limit}x")).await;
    assert_eq!(reply.status, 414);
    assert_eq!(reply.text(), "query string too long\n");
}

#[tokio::test]
async fn slow_header_sender_is_cut_off() {
    let pki = Pki::new();
    let (_relay, client) = relay(&pki, "header_read_timeout = \"300ms\"", "").await;
    let tls = client.connect("auth.example.test").await.expect("handshake");
    let (read, mut write) = tokio::io::split(tls);
    let request = b"GET / HTTP/1.1\r\nHost: x";
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let trickle = tokio::spawn(async move {
        for b in request {
            if write.write_all(&[*b]).await.is_err() || write.flush().await.is_err() {
                return;
            }
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let took = time_until_closed(read, Duration::from_secs(5)).await;
    // Each byte arrives well within any per-read timeout; only a whole-header deadline cuts it.
    assert!(sent.load(Ordering::SeqCst) < request.len(), "cut off before the trickle ended");
    assert!(took >= Duration::from_millis(250), "not before the deadline: {took:?}");
    trickle.abort();
}

/// An HTTP/1.1 connection whose driver task ends when the relay closes it.
async fn keep_alive(
    client: &TlsClient,
) -> (hyper::client::conn::http1::SendRequest<Full<Bytes>>, tokio::task::JoinHandle<()>) {
    let tls = client.connect("auth.example.test").await.expect("handshake");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("h1");
    (
        sender,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

fn request(method: &str, target: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "auth.example.test")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_with_close_notify() {
    let pki = Pki::new();
    let (_relay, client) = relay(&pki, "idle_timeout = \"300ms\"", "").await;
    let mut tls = client.connect("auth.example.test").await.expect("handshake");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: auth.example.test\r\n\r\n").await.expect("write");
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await.expect("reply").expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"), "answered: {:?}", String::from_utf8_lossy(&buf[..n]));
    let (took, end) = until_closed(tls, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(250), "closed only once idle for 300 ms: {took:?}");
    // A clean end: rustls reports a close without `close_notify` as UnexpectedEof.
    end.expect("the relay ended TLS with close_notify");
}

#[tokio::test]
async fn idle_http2_connection_gets_goaway_even_while_the_client_pings() {
    // Browsers keep HTTP/2 connections open with PINGs; those are not requests and keep no
    // connection alive. The idle close is a GOAWAY, so the client's connection ends without error.
    let pki = Pki::new();
    let (relay, _) = relay(&pki, "idle_timeout = \"300ms\"", "").await;
    let tls =
        TlsClient::new(relay.https, pki.client_config(&[b"h2"])).connect("auth.example.test").await.expect("handshake");
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tls))
        .await
        .expect("h2");
    let conn = tokio::spawn(conn);
    let req = http::Request::get("https://auth.example.test/healthz").body(Full::new(Bytes::new())).unwrap();
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "ok");
    let start = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await.expect("closed within 5 s").expect("task");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(250), "closed only once idle for 300 ms: {took:?}");
    ended.expect("the connection ended with GOAWAY, not a reset");
}

#[tokio::test]
async fn http2_requests_meet_the_same_header_and_query_limits() {
    let pki = Pki::new();
    let (relay, _) = relay(&pki, "max_header_bytes = 8192\nmax_query_bytes = 100", "").await;
    let h2 = TlsClient::new(relay.https, pki.client_config(&[b"h2"]));
    let big = "a".repeat(9000);
    let reply = h2.send_h2("auth.example.test", "GET", "/v1/auth/callback?x=1", &[("x-big", &big)], "").await;
    // The relay's own answer, not HTTP/2's refused stream (which clients retry).
    assert_eq!((reply.status, reply.text()), (431, "request header fields too large\n"));
    let fits = "a".repeat(7000);
    let reply = h2.send_h2("auth.example.test", "GET", "/v1/auth/callback?x=1", &[("x-big", &fits)], "").await;
    assert_eq!(reply.status, 302);
    let at_limit = format!("state={}", "s".repeat(94));
    let reply = h2.send_h2("auth.example.test", "GET", &format!("/v1/auth/callback?{at_limit}"), &[], "").await;
    assert_eq!(reply.status, 302);
    let reply = h2.send_h2("auth.example.test", "GET", &format!("/v1/auth/callback?{at_limit}x"), &[], "").await;
    assert_eq!((reply.status, reply.text()), (414, "query string too long\n"));
}

#[tokio::test]
async fn request_in_flight_outlives_idle_and_header_deadlines() {
    let pki = Pki::new();
    let upstream = Upstream::start(None, UpstreamBehaviour::Silent).await;
    // The answer (the upstream's timeout, 504) comes three times the deadlines' length after the
    // request: long enough that either deadline would have cut the connection first.
    let site = format!("upstream = \"http://{}\"\nresponse_timeout = \"1s\"", upstream.addr);
    let (_relay, client) = relay(&pki, "idle_timeout = \"300ms\"\nheader_read_timeout = \"300ms\"", &site).await;
    let (mut sender, _conn) = keep_alive(&client).await;
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request("POST", "/v1/auth/token/c")))
        .await
        .expect("answer within 10 s")
        .expect("the connection was not cut while the request was in flight");
    assert_eq!(resp.status(), 504);
    assert!(start.elapsed() >= Duration::from_millis(950), "the upstream response timeout answered");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn silent_tls_client_hits_the_handshake_deadline() {
    let pki = Pki::new();
    let (relay, _client) = relay(&pki, "handshake_timeout = \"300ms\"", "").await;
    let tcp = TcpStream::connect(relay.https).await.expect("connect");
    let took = time_until_closed(tcp, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(250), "closed at the deadline, not before: {took:?}");
}

#[tokio::test]
async fn when_every_slot_is_held_by_idle_connections_they_make_room() {
    let pki = Pki::new();
    let (_relay, client) = relay(&pki, "max_connections = 2", "").await;
    let (mut first, first_conn) = keep_alive(&client).await;
    let (mut second, second_conn) = keep_alive(&client).await;
    for s in [&mut first, &mut second] {
        assert_eq!(s.send_request(request("GET", "/healthz")).await.expect("response").status(), 200);
    }
    // Both slots are held by idle keep-alive connections: they go, and a new client is served.
    let reply = tokio::time::timeout(Duration::from_secs(5), client.get("auth.example.test", "/healthz"))
        .await
        .expect("served within 5 s");
    assert_eq!((reply.status, reply.text()), (200, "ok"));
    for closed in [first_conn, second_conn] {
        tokio::time::timeout(Duration::from_secs(5), closed).await.expect("closed within 5 s").expect("task");
    }
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_while_every_slot_is_answering() {
    let pki = Pki::new();
    let slow = Upstream::start(
        None,
        UpstreamBehaviour::Delayed(
            Duration::from_millis(1500),
            Arc::new(|_| http::Response::new(Full::new(Bytes::from_static(b"{}")))),
        ),
    )
    .await;
    let site = format!("upstream = \"http://{}\"", slow.addr);
    let (_relay, client) = relay(&pki, "max_connections = 2", &site).await;
    let in_flight: Vec<_> = (0..2)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client.send("auth.example.test", "POST", &format!("/v1/auth/token/c{i}"), &[], "").await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = tokio::spawn({
        let client = client.clone();
        async move { client.get("auth.example.test", "/healthz").await }
    });
    // Both slots answer a request: the third connection is not even accepted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "the third connection was served while two requests were in flight");
    for t in in_flight {
        assert_eq!(t.await.expect("task").status, 200, "answers in flight are never cut for room");
    }
    let reply = tokio::time::timeout(Duration::from_secs(5), third).await.expect("served within 5 s").expect("task");
    assert_eq!((reply.status, reply.text()), (200, "ok"));
}

#[tokio::test]
async fn one_address_holds_at_most_max_connections_per_ip() {
    let pki = Pki::new();
    let (_relay, client) = relay(&pki, "max_connections_per_ip = 2", "").await;
    let (mut first, _a) = keep_alive(&client).await;
    let (_second, _b) = keep_alive(&client).await;
    // A third connection from 127.0.0.1 is closed before its handshake.
    assert!(client.connect("auth.example.test").await.is_err(), "a third connection from one address");
    // Another address is served, and the first two still are.
    let other = client.with_source("127.0.0.2".parse().unwrap());
    assert_eq!(other.get("auth.example.test", "/healthz").await.status, 200);
    assert_eq!(first.send_request(request("GET", "/healthz")).await.expect("response").status(), 200);
}

#[tokio::test]
async fn slow_header_after_an_idle_keep_alive_is_cut_at_the_header_deadline() {
    // The idle bound is long; a request that starts after some idle time still gets only the
    // header-read bound to finish its header, not what is left of the idle one.
    let pki = Pki::new();
    let (_relay, client) = relay(&pki, "idle_timeout = \"20s\"\nheader_read_timeout = \"300ms\"", "").await;
    let tls = client.connect("auth.example.test").await.expect("handshake");
    let (mut read, mut write) = tokio::io::split(tls);
    write.write_all(b"GET /healthz HTTP/1.1\r\nHost: auth.example.test\r\n\r\n").await.expect("write");
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), read.read(&mut buf)).await.expect("reply").expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"), "first request answered");
    tokio::time::sleep(Duration::from_millis(400)).await; // idle for longer than the header bound
    write.write_all(b"GET / HTTP/1.1\r\nHo").await.expect("partial header");
    let took = time_until_closed(read, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(250), "not before the header deadline: {took:?}");
    assert!(took < Duration::from_secs(3), "cut at the header deadline, not the idle one: {took:?}");
}

#[tokio::test]
async fn a_client_that_stops_reading_a_large_answer_is_cut_off_after_the_send_timeout() {
    let pki = Pki::new();
    // 32 MiB: more than the loopback socket buffers of both hops can hold.
    let big = Bytes::from(vec![b'x'; 32 << 20]);
    let upstream =
        Upstream::start(None, UpstreamBehaviour::respond(move |_| http::Response::new(Full::new(big.clone())))).await;
    let site = format!("upstream = \"http://{}\"", upstream.addr);
    let (relay, client) = relay(&pki, "send_timeout = \"300ms\"", &site).await;
    let mut tls = client.connect("auth.example.test").await.expect("handshake");
    tls.write_all(b"POST /v1/auth/token/c1 HTTP/1.1\r\nhost: auth.example.test\r\ncontent-length: 0\r\n\r\n")
        .await
        .expect("send the request");
    let mut head = [0u8; 64];
    tls.read_exact(&mut head).await.expect("the answer starts");
    assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&head));
    // The client stops reading: the relay's writes block, and after the send timeout it lets go.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fresh = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    assert_eq!(fresh.get("auth.example.test", "/healthz").await.status, 200, "others are served meanwhile");
    // What was already in the socket buffers arrives, then the end: far less than the answer.
    let mut received = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the relay kept the stalled connection open");
    assert!(received < 32 << 20, "the whole answer arrived ({received} bytes): nothing was cut off");
}

/// Writes `request` whole on a fresh TLS connection, then reads the answer's status line: a
/// client that sends everything before it reads, as most do.
async fn send_all_then_read(client: &TlsClient, request: Vec<u8>) -> std::io::Result<String> {
    let tls = client.connect("auth.example.test").await?;
    let (mut read, mut write) = tokio::io::split(tls);
    tokio::time::timeout(Duration::from_secs(10), write.write_all(&request)).await.expect("written within 10 s")?;
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), read.read(&mut head)).await.expect("answer within 10 s")?;
    Ok(String::from_utf8_lossy(&head[..n]).lines().next().unwrap_or_default().to_string())
}

#[tokio::test]
async fn a_client_still_sending_a_refused_request_reads_its_status_not_a_reset() {
    let pki = Pki::new();
    let (_relay, client) = relay(&pki, "max_header_bytes = 8192", "").await;
    // A small send buffer, as on a real network: the client is still sending when the relay
    // answers, and a close with its bytes unread would reset the connection under it.
    let client = client.with_send_buffer(8192);
    // A 200 KB header block: the relay answers 431 after the first 8 KB.
    let mut huge = b"GET /healthz HTTP/1.1\r\nhost: auth.example.test\r\n".to_vec();
    for i in 0..2000 {
        huge.extend_from_slice(format!("x-filler-{i}: {}\r\n", "a".repeat(90)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    let status = send_all_then_read(&client, huge).await.expect("no broken pipe or reset");
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
    // A body over the limit, declared and sent in full: 413, read after the whole body went out.
    let mut post =
        b"POST /v1/auth/token/c HTTP/1.1\r\nhost: auth.example.test\r\ncontent-length: 200000\r\n\r\n".to_vec();
    post.extend_from_slice(&vec![b'b'; 200_000]);
    let status = send_all_then_read(&client, post).await.expect("no broken pipe or reset");
    assert_eq!(status, "HTTP/1.1 413 Payload Too Large");
}

#[tokio::test]
async fn the_admin_listener_answers_while_every_public_slot_is_busy() {
    let pki = Pki::new();
    let slow = Upstream::start(
        None,
        UpstreamBehaviour::Delayed(
            Duration::from_secs(2),
            Arc::new(|_| http::Response::new(Full::new(Bytes::from_static(b"{}")))),
        ),
    )
    .await;
    let site = format!("upstream = \"http://{}\"", slow.addr);
    let toml = common::one_site_config(&pki, "admin = \"127.0.0.1:0\"", "max_connections = 1", &site);
    let relay = RelayUnderTest::start(&toml).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    let busy = tokio::spawn(async move { client.send("auth.example.test", "POST", "/v1/auth/token/c", &[], "").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admin = relay.admin.expect("admin listener");
    let reply = tokio::time::timeout(Duration::from_secs(1), common::client::plain_get(admin, "localhost", "/healthz"))
        .await
        .expect("the admin listener has slots of its own");
    assert_eq!((reply.status, reply.text()), (200, "ok"));
    assert_eq!(busy.await.expect("task").status, 200);
}
