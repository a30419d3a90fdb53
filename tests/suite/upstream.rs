//! What the relay does with an upstream that breaks HTTP, against a rogue upstream
//! (`common::rogue`) that answers with raw bytes: a token answer reaches only the request that
//! caused it. By default each HTTP/1.1 exchange has a connection of its own; with
//! `upstream_keepalive = true` a well-behaved upstream keeps one connection for requests one
//! after another, and a connection that received bytes nobody asked for is never used again.

use crate::common;

use std::time::Duration;

use common::rogue::{Rogue, Step, answer};
use common::{Pki, RelayUnderTest, TlsClient};

const HOST: &str = "auth.example.test";

/// A relay in front of an upstream and a client for it (the PKI's files live as long).
struct Kit {
    _pki: Pki,
    _relay: RelayUnderTest,
    client: TlsClient,
}

/// A relay in front of `upstream` (a base URL) with these `[limits]` lines and these extra site
/// lines, trusting `pki`'s CA.
async fn kit_with(pki: Pki, upstream: &str, limits: &str, extra: &str) -> Kit {
    let site = format!("upstream = \"{upstream}\"\nupstream_ca_file = \"{}\"\n{extra}", pki.ca_path.display());
    let relay = RelayUnderTest::start(&common::one_site_config(&pki, "", limits, &site)).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    Kit { _pki: pki, _relay: relay, client }
}

/// A relay in front of `rogue` as configured by default.
async fn kit(rogue: &Rogue) -> Kit {
    kit_with(Pki::new(), &format!("http://{}", rogue.addr), "", "").await
}

const KEEPALIVE: &str = "upstream_keepalive = true";

/// A relay in front of `rogue` that keeps its HTTP/1.1 upstream connections.
async fn kit_keepalive(rogue: &Rogue) -> Kit {
    kit_with(Pki::new(), &format!("http://{}", rogue.addr), "", KEEPALIVE).await
}

impl Kit {
    /// The token exchange for `code`: status and body.
    async fn token(&self, code: &str) -> (u16, String) {
        let reply = self.client.send(HOST, "POST", &format!("/v1/auth/token/{code}"), &[], "").await;
        (reply.status, reply.text().to_string())
    }
}

/// The code a token request carries in its path.
fn code_of(target: &str) -> &str {
    target.rsplit('/').next().unwrap_or_default()
}

/// The token answer the rogue gives for `code`.
fn token_for(code: &str) -> String {
    format!(r#"{{"code":"{code}"}}"#)
}

#[tokio::test]
async fn by_default_each_exchange_has_a_connection_of_its_own() {
    let rogue = Rogue::start(|target| vec![Step::write(answer("200 OK", &token_for(code_of(target))))]).await;
    let kit = kit(&rogue).await;
    for i in 0..5 {
        let code = format!("c{i}");
        assert_eq!(kit.token(&code).await, (200, token_for(&code)));
    }
    assert_eq!(rogue.connections(), 5);
    for head in rogue.heads() {
        assert!(head.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{head}");
    }
}

#[tokio::test]
async fn with_keepalive_requests_one_after_another_share_one_upstream_connection() {
    // Alternately a Content-Length and a chunked answer: both end cleanly, so the connection
    // goes back to the idle list after each.
    let rogue = Rogue::start(|target| {
        let code = code_of(target);
        let body = token_for(code);
        if code.ends_with(['0', '2', '4', '6', '8']) {
            vec![Step::write(answer("200 OK", &body))]
        } else {
            let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
            vec![Step::write(format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"))]
        }
    })
    .await;
    let kit = kit_keepalive(&rogue).await;
    for i in 0..20 {
        let code = format!("c{i}");
        assert_eq!(kit.token(&code).await, (200, token_for(&code)));
    }
    assert_eq!(rogue.connections(), 1, "every answer ended cleanly, so one connection served all");
    assert!(!rogue.heads()[0].to_ascii_lowercase().contains("connection: close"));
}

/// Twenty token exchanges one after another, each with its own code: each caller gets the
/// answer to its own request, and each connection that carried a second answer was closed.
async fn each_caller_gets_its_own_token(kit: &Kit, rogue: &Rogue) {
    for i in 0..20 {
        let code = format!("c{i}");
        assert_eq!(kit.token(&code).await, (200, token_for(&code)), "caller {i}");
        // The script, stray answer included, has been played before the next caller comes.
        rogue.wait_played(i + 1).await;
    }
    let codes: Vec<String> = (0..20).map(|i| format!("/v1/auth/token/c{i}")).collect();
    assert_eq!(rogue.targets(), codes, "each request went upstream once");
    assert_eq!(rogue.connections(), 20, "no connection that received an unasked answer was used again");
}

/// The answer to `target`, then a second one that nobody asked for, `pause` later.
fn two_answers(target: &str, pause: Option<Duration>) -> Vec<Step> {
    let code = code_of(target);
    let first = answer("200 OK", &token_for(code));
    let stray = answer("200 OK", &token_for(&format!("stray-after-{code}")));
    match pause {
        None => vec![Step::write(first + &stray)],
        Some(pause) if pause.is_zero() => vec![Step::write(first), Step::write(stray)],
        Some(pause) => vec![Step::write(first), Step::Sleep(pause), Step::write(stray)],
    }
}

#[tokio::test]
async fn with_keepalive_a_second_answer_in_the_same_write_reaches_nobody() {
    let rogue = Rogue::start(|target| two_answers(target, None)).await;
    each_caller_gets_its_own_token(&kit_keepalive(&rogue).await, &rogue).await;
}

#[tokio::test]
async fn with_keepalive_a_second_answer_on_an_idle_connection_reaches_nobody() {
    let rogue = Rogue::start(|target| two_answers(target, Some(Duration::from_millis(20)))).await;
    each_caller_gets_its_own_token(&kit_keepalive(&rogue).await, &rogue).await;
}

#[tokio::test]
async fn with_keepalive_a_second_answer_on_an_idle_tls_connection_reaches_nobody() {
    let pki = Pki::new();
    let leaf = pki.leaf("upstream", &["localhost"]);
    let rogue =
        Rogue::start_tls(pki.server_config(&leaf, &[b"http/1.1"]), |t| two_answers(t, Some(Duration::from_millis(20))))
            .await;
    let url = format!("https://localhost:{}", rogue.addr.port());
    let kit = kit_with(pki, &url, "", KEEPALIVE).await;
    each_caller_gets_its_own_token(&kit, &rogue).await;
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// A new HTTP/1.1 connection to the relay.
async fn h1_to_relay(client: &TlsClient) -> Sender {
    let tls = client.connect(HOST).await.expect("handshake");
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.expect("h1");
    tokio::spawn(conn);
    sender
}

/// One token exchange for `code` on `sender`: the response head within 10 s.
async fn post_token(sender: &mut Sender, code: &str) -> http::Response<hyper::body::Incoming> {
    let req = http::Request::post(format!("/v1/auth/token/{code}"))
        .header("host", HOST)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("in time")
        .expect("a response head")
}

/// Token exchanges for `codes`, one after another on one keep-alive connection to the relay:
/// status and body of each.
async fn on_one_connection(kit: &Kit, codes: &[String]) -> Vec<(u16, String)> {
    use http_body_util::BodyExt;
    let mut sender = h1_to_relay(&kit.client).await;
    let mut replies = Vec::new();
    for code in codes {
        sender.ready().await.expect("the relay keeps the connection");
        let resp = post_token(&mut sender, code).await;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        replies.push((status, String::from_utf8(body.to_vec()).unwrap()));
    }
    replies
}

/// `c0` to `c19`.
fn twenty_codes() -> Vec<String> {
    (0..20).map(|i| format!("c{i}")).collect()
}

#[tokio::test]
async fn with_keepalive_a_second_answer_in_its_own_write_reaches_nobody_back_to_back() {
    let rogue = Rogue::start(|target| two_answers(target, Some(Duration::ZERO))).await;
    let kit = kit_keepalive(&rogue).await;
    let want: Vec<(u16, String)> = twenty_codes().iter().map(|c| (200, token_for(c))).collect();
    assert_eq!(on_one_connection(&kit, &twenty_codes()).await, want);
}

#[tokio::test]
async fn by_default_a_second_answer_arriving_late_reaches_nobody_back_to_back() {
    // The case no HTTP/1.1 connection can detect: the second answer comes a moment after the
    // first, when the next caller's request may already be on its way. Each exchange has its
    // own connection, so it has nowhere to go.
    for pause in [Duration::ZERO, Duration::from_millis(1), Duration::from_millis(3)] {
        let rogue = Rogue::start(move |target| two_answers(target, Some(pause))).await;
        let kit = kit(&rogue).await;
        let want: Vec<(u16, String)> = twenty_codes().iter().map(|c| (200, token_for(c))).collect();
        assert_eq!(on_one_connection(&kit, &twenty_codes()).await, want, "second answer {pause:?} late");
        assert_eq!(rogue.connections(), 20);
    }
}

/// What the rogue answers to the token request for `code`: the answer that breaks HTTP in the
/// way the code names, else the token for it.
fn broken(code: &str) -> Vec<Step> {
    let raw = match code {
        "both-lengths" => {
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_string()
        }
        "switching" => {
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n".to_string()
        }
        "status-600" => answer("600 Beyond", &token_for(code)),
        "status-099" => answer("099 Below", &token_for(code)),
        "head-200k" => {
            format!("HTTP/1.1 200 OK\r\nX-Padding: {}\r\nContent-Length: 2\r\n\r\n{{}}", "a".repeat(200 * 1024))
        }
        "interim" => format!(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n\
             HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n{}",
            answer("200 OK", &token_for(code))
        ),
        "head-12k" => format!(
            "HTTP/1.1 200 OK\r\nX-Padding: {}\r\nContent-Length: {}\r\n\r\n{}",
            "a".repeat(12 * 1024),
            token_for(code).len(),
            token_for(code)
        ),
        _ => answer("200 OK", &token_for(code)),
    };
    vec![Step::write(raw)]
}

/// What the client gets for an answer the relay refuses.
const REFUSED: (u16, &str) = (502, "invalid upstream response\n");

#[tokio::test]
async fn answers_that_break_http_are_502_and_the_next_caller_gets_its_own() {
    let rogue = Rogue::start(|target| broken(code_of(target))).await;
    let kit = kit_keepalive(&rogue).await;
    let cases = ["both-lengths", "switching", "status-600", "status-099", "head-200k"];
    // Each refused answer, then a good one, on one client connection: the refused answer's
    // framing never leaks into what the client reads next.
    let codes: Vec<String> = cases.iter().flat_map(|c| [c.to_string(), format!("after-{c}")]).collect();
    let want: Vec<(u16, String)> = cases
        .iter()
        .flat_map(|c| [(REFUSED.0, REFUSED.1.to_string()), (200, token_for(&format!("after-{c}")))])
        .collect();
    assert_eq!(on_one_connection(&kit, &codes).await, want);
    // The bytes and headers of a refusal.
    let reply = kit.client.send(HOST, "POST", "/v1/auth/token/both-lengths", &[], "").await;
    assert_eq!((reply.status, reply.text()), REFUSED);
    assert_eq!(reply.header("content-length"), "26");
    assert_eq!(reply.header("transfer-encoding"), "");
    assert_eq!(reply.header("cache-control"), "no-store");
    // A refused answer's connection is closed: each good answer after one came on a new
    // connection, and the last refusal had the last connection.
    assert_eq!(rogue.connections(), cases.len() + 1);
}

#[tokio::test]
async fn interim_answers_are_read_past_and_a_head_under_the_bound_passes() {
    let rogue = Rogue::start(|target| broken(code_of(target))).await;
    let kit = kit_keepalive(&rogue).await;
    let reply = kit.client.send(HOST, "POST", "/v1/auth/token/interim", &[], "").await;
    assert_eq!((reply.status, reply.text()), (200, token_for("interim").as_str()));
    assert_eq!(reply.header("link"), "", "the 103's fields stay with the 103");
    let reply = kit.client.send(HOST, "POST", "/v1/auth/token/head-12k", &[], "").await;
    assert_eq!((reply.status, reply.text()), (200, token_for("head-12k").as_str()));
    assert_eq!(reply.header("x-padding").len(), 12 * 1024);
    assert_eq!(rogue.connections(), 1, "both answers ended cleanly");
}

#[tokio::test]
async fn the_head_bound_is_max_header_bytes() {
    let rogue = Rogue::start(|target| broken(code_of(target))).await;
    let kit = kit_with(Pki::new(), &format!("http://{}", rogue.addr), "max_header_bytes = 8192", "").await;
    let reply = kit.client.send(HOST, "POST", "/v1/auth/token/head-12k", &[], "").await;
    assert_eq!((reply.status, reply.text()), REFUSED);
}

#[tokio::test]
async fn a_body_cut_off_before_its_length_is_502() {
    let rogue =
        Rogue::start(|_| vec![Step::write("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"code\":"), Step::Close])
            .await;
    let kit = kit(&rogue).await;
    assert_eq!(kit.token("c1").await, (502, "upstream unreachable\n".to_string()));
}

/// The relay binary with its log, in front of `rogue`, and a client for it.
async fn logged_relay(pki: &Pki, rogue: &Rogue) -> (common::process::RelayProcess, TlsClient) {
    let store = format!("storage = \"{}\"", pki.dir.path().join("store").display());
    let site = format!("upstream = \"http://{}\"", rogue.addr);
    let config = pki.dir.path().join("relay.toml");
    std::fs::write(&config, common::one_site_config(pki, &store, "", &site)).expect("write the config");
    let mut relay = common::process::RelayProcess::serve(&config, &[], |_| {});
    let client = TlsClient::new(relay.https_addr().await, pki.client_config(&[b"http/1.1"]));
    (relay, client)
}

/// A token exchange whose answer is read as far as it goes: its status, and whether its body
/// came whole.
async fn streamed_token(client: &TlsClient, code: &str) -> (u16, bool) {
    use http_body_util::BodyExt;
    let mut sender = h1_to_relay(client).await;
    let resp = post_token(&mut sender, code).await;
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect()).await.expect("in time");
    (status, body.is_ok())
}

#[tokio::test]
async fn a_streamed_answer_the_upstream_cuts_off_is_logged_as_cut_off() {
    // A chunked answer (streamed to the client as it comes) that ends cleanly for `whole` and
    // breaks off after its first chunk otherwise.
    let rogue = Rogue::start(|target| {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        let first = format!("{head}9\r\n{{\"code\":\"\r\n");
        if code_of(target) == "whole" {
            vec![Step::write(first + "7\r\nwhole\"}\r\n0\r\n\r\n")]
        } else {
            vec![Step::write(first), Step::Sleep(Duration::from_millis(50)), Step::Close]
        }
    })
    .await;
    let pki = Pki::new();
    let (mut relay, client) = logged_relay(&pki, &rogue).await;

    assert_eq!(streamed_token(&client, "whole").await, (200, true));
    let line = relay.wait_line("the access line of the whole answer", Duration::from_secs(10), |l| {
        l.contains(" access: ") && l.contains(" route=token ")
    });
    let line = line.await;
    assert!(line.contains(" status=200 ") && !line.contains("aborted"), "{line}");

    assert_eq!(streamed_token(&client, "cut").await, (200, false), "the client sees the cut, not a short body");
    let line = relay.wait_line("the access line of the cut answer", Duration::from_secs(10), |l| {
        l.contains(" access: ") && l.contains(" route=token ") && l.contains("aborted")
    });
    let line = line.await;
    assert!(line.contains(" status=200 ") && line.ends_with(" aborted=\"upstream\""), "{line}");
    relay.wait_for("the upstream answer broke off in its body").await;
}
