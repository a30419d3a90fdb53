//! The routes over real TLS: what a browser and an application see from the relay, status,
//! headers and bytes. Every test starts its own relay (and, when the route goes upstream, a real
//! upstream server) on ephemeral loopback ports with a throwaway PKI.

use crate::common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use common::pki::Leaf;
use common::{Pki, RelayUnderTest, Reply, TlsClient, Upstream, UpstreamBehaviour};
use http::{Response, Version};
use http_body_util::Full;
use oauth_relay::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOST: &str = "auth.example.test";
const AURINKO: &str = "https://api.aurinko.io";
/// Authorize and callback both in `proxy` mode.
const BOTH_PROXIED: &str = "[site.authorize]\nmode = \"proxy\"\n[site.callback]\nmode = \"proxy\"\n";

/// What a test changes in a one-site configuration; everything else is what an Aurinko user
/// gets by default.
struct Conf<'a> {
    /// The site's `upstream`.
    upstream: &'a str,
    /// Extra lines of `[server]`.
    server: &'a str,
    /// Extra keys of the `[[site]]` table itself.
    site: &'a str,
    /// Tables after the site: `[site.callback]`, `[limits]`, ...
    tables: &'a str,
}

impl Default for Conf<'_> {
    fn default() -> Self {
        Conf { upstream: AURINKO, server: "", site: "", tables: "" }
    }
}

/// A test CA with the relay's certificate for [`HOST`] and an upstream's for `localhost`.
struct Kit {
    pki: Pki,
    relay_leaf: Leaf,
    upstream_leaf: Leaf,
}

impl Kit {
    fn new() -> Kit {
        let pki = Pki::new();
        let relay_leaf = pki.leaf("relay", &[HOST]);
        let upstream_leaf = pki.leaf("upstream", &["localhost"]);
        Kit { pki, relay_leaf, upstream_leaf }
    }

    fn toml(&self, c: &Conf) -> String {
        format!(
            "[server]\nhttps = [\"127.0.0.1:0\"]\n{server}\n\n\
             [[site]]\nname = \"auth\"\nhostnames = [\"{HOST}\"]\nupstream = \"{upstream}\"\n\
             upstream_ca_file = \"{ca}\"\n{site}\n\n\
             [site.tls]\nsource = \"files\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n{tables}\n",
            server = c.server,
            upstream = c.upstream,
            ca = self.pki.ca_path.display(),
            site = c.site,
            cert = self.relay_leaf.cert_path.display(),
            key = self.relay_leaf.key_path.display(),
            tables = c.tables,
        )
    }

    /// Starts a relay with `c` and an HTTP/1.1 client that trusts it.
    async fn relay(&self, c: Conf<'_>) -> Running {
        let relay = RelayUnderTest::start(&self.toml(&c)).await;
        let client = TlsClient::new(relay.https, self.pki.client_config(&[b"http/1.1"]));
        Running { relay, client }
    }

    /// An HTTPS upstream on `localhost` offering `alpn`, and its base URL.
    async fn upstream(&self, alpn: &[&[u8]], behaviour: UpstreamBehaviour) -> (Upstream, String) {
        let upstream = Upstream::start(Some(self.pki.server_config(&self.upstream_leaf, alpn)), behaviour).await;
        let url = format!("https://localhost:{}", upstream.addr.port());
        (upstream, url)
    }
}

/// A running relay and a client for it.
struct Running {
    relay: RelayUnderTest,
    client: TlsClient,
}

impl Running {
    async fn get(&self, target: &str) -> Reply {
        self.client.get(HOST, target).await
    }

    async fn send(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        self.client.send(HOST, method, target, headers, body).await
    }

    /// Writes `request` as raw bytes on a new TLS connection and reads until the relay closes it
    /// (send `Connection: close`). For framing the HTTP client would not produce.
    async fn raw(&self, request: &[u8]) -> String {
        let mut tls = self.client.connect(HOST).await.expect("handshake");
        tls.write_all(request).await.expect("write request");
        let mut reply = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 4096];
            // A close without close_notify is an error here; what was read before still counts.
            while let Ok(n @ 1..) = tls.read(&mut buf).await {
                reply.extend_from_slice(&buf[..n]);
            }
        });
        read.await.expect("the relay closes the connection within 10 s");
        String::from_utf8(reply).expect("utf-8 reply")
    }
}

fn form() -> [(&'static str, &'static str); 1] {
    [("content-type", "application/x-www-form-urlencoded")]
}

// ---- 1. Callback GET ----------------------------------------------------------------------

#[tokio::test]
async fn callback_query_is_relayed_byte_for_byte() {
    let kit = Kit::new();
    let relay = kit.relay(Conf::default()).await;
    for query in [
        "state=a+b%2Bc%20d&code=M.C5_BAY.2%2F%2F&scope=Mail.Read+offline_access&empty=&k=1&k=2&u=%C3%A9%E2%9C%93",
        "state=%2b%2B+%20%e2%9c%93&k=&k=&=v&flag&a=b;c=d&x=~!*'()",
        "error=access_denied&error_description=AADSTS65004%3A+User+declined+to+consent.&\
         error_uri=https%3A%2F%2Flogin.microsoftonline.com%2Ferror%3Fcode%3D65004&state=s1",
        "admin_consent=True&tenant=72f988bf-86f1-41af-91ab-2d7cd011db47&state=s%2B2",
        "code=0.AXo&session_state=9f1c&client_info=eyJ1aWQiOiIxIn0%3D&state=%F0%9F%94%91",
    ] {
        let reply = relay.get(&format!("/v1/auth/callback?{query}")).await;
        assert_eq!(reply.status, 302, "{query}");
        assert_eq!(reply.header("location"), format!("https://api.aurinko.io/v1/auth/callback?{query}"));
        assert_eq!(reply.header("referrer-policy"), "no-referrer");
        assert_eq!(reply.header("cache-control"), "no-store");
        assert_eq!(reply.header("strict-transport-security"), "max-age=31536000");
        assert_eq!(reply.header("content-length"), "0");
        assert_eq!(reply.body.len(), 0);
    }
}

#[tokio::test]
async fn callback_status_is_configurable_and_head_redirects_too() {
    let kit = Kit::new();
    for status in [303u16, 307] {
        let tables = format!("[site.callback]\nstatus = {status}\n");
        let relay = kit.relay(Conf { tables: &tables, ..Conf::default() }).await;
        let reply = relay.get("/v1/auth/callback?code=c&state=s").await;
        assert_eq!(reply.status, status);
        assert_eq!(reply.header("location"), "https://api.aurinko.io/v1/auth/callback?code=c&state=s");
    }
    let relay = kit.relay(Conf::default()).await;
    let reply = relay.send("HEAD", "/v1/auth/callback?code=c&state=s", &[], "").await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), "https://api.aurinko.io/v1/auth/callback?code=c&state=s");
    assert_eq!(reply.body.len(), 0);
}

// ---- 2. Callback POST (form_post) -----------------------------------------------------------

#[tokio::test]
async fn callback_form_post_is_re_posted_with_307() {
    let kit = Kit::new();
    let relay = kit.relay(Conf::default()).await;
    for content_type in ["application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=utf-8"] {
        let reply =
            relay.send("POST", "/v1/auth/callback", &[("content-type", content_type)], "code=c%2B1&state=s+1").await;
        assert_eq!(reply.status, 307, "{content_type}");
        // 307 keeps method and body: the browser re-posts the form it sent, untouched.
        assert_eq!(reply.header("location"), "https://api.aurinko.io/v1/auth/callback");
        assert_eq!(reply.header("cache-control"), "no-store");
        assert_eq!(reply.header("referrer-policy"), "no-referrer");
        assert_eq!(reply.body.len(), 0);
    }
    let reply = relay.send("POST", "/v1/auth/callback", &[("content-type", "application/json")], "{}").await;
    assert_eq!(reply.status, 415);
    assert_eq!(reply.text(), "expected application/x-www-form-urlencoded\n");
}

#[tokio::test]
async fn callback_form_post_on_http2_is_answered_once_its_body_is_in() {
    // Browsers send a form POST on HTTP/2 as HEADERS, then DATA. The relay reads the body before
    // answering, so the stream ends cleanly; answering first would end it with RST_STREAM, which
    // curl before 8.1 reports as a failed request.
    let kit = Kit::new();
    let relay = kit.relay(Conf::default()).await;
    let h2_client = TlsClient::new(relay.relay.https, kit.pki.client_config(&[b"h2"]));
    let tls = h2_client.connect(HOST).await.expect("handshake");
    let (mut h2, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://{HOST}/v1/auth/callback"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(())
        .unwrap();
    let (mut response, mut body) = h2.send_request(req, false).expect("send headers");
    let early = tokio::time::timeout(Duration::from_millis(300), &mut response).await;
    assert!(early.is_err(), "answered before the body came: {early:?}");
    body.send_data(Bytes::from_static(b"code=c%2B1&state=s+1"), true).expect("send body");
    let response = tokio::time::timeout(Duration::from_secs(10), response).await.expect("answer").expect("response");
    assert_eq!(response.status(), 307);
    assert_eq!(response.headers()["location"], "https://api.aurinko.io/v1/auth/callback");
    let mut answer = response.into_body();
    assert!(answer.is_end_stream(), "a 307 without a body");
    // The request's stream was not reset: the relay read all of it.
    let reset = std::future::poll_fn(|cx| match body.poll_reset(cx) {
        std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await;
    assert!(reset.is_none(), "the stream was reset: {reset:?}");
    assert!(answer.data().await.is_none());
}

#[tokio::test]
async fn callback_post_is_405_when_form_post_is_off() {
    let kit = Kit::new();
    let relay = kit.relay(Conf { tables: "[site.callback]\nform_post = false\n", ..Conf::default() }).await;
    let reply = relay.send("POST", "/v1/auth/callback", &form(), "code=c").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), "GET, HEAD");
    assert_eq!(reply.text(), "method not allowed\n");
}

// ---- 3. Fragment page -----------------------------------------------------------------------

/// The nonce of the page's one script element.
fn nonce_of(page: &str) -> &str {
    let start = page.find("nonce=\"").expect("a nonce attribute") + "nonce=\"".len();
    let len = page[start..].find('"').expect("closing quote");
    &page[start..start + len]
}

#[tokio::test]
async fn fragment_page_has_a_fresh_nonce_and_only_navigates_upstream() {
    let kit = Kit::new();
    let relay = kit.relay(Conf::default()).await;
    let first = relay.get("/v1/auth/callback").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(first.header("cache-control"), "no-store");
    assert_eq!(first.header("referrer-policy"), "no-referrer");
    let page = first.text();
    let nonce = nonce_of(page);
    assert!(nonce.len() >= 16, "nonce {nonce:?} is long enough to guess");
    assert_eq!(
        first.header("content-security-policy"),
        format!(
            "default-src 'none'; script-src 'nonce-{nonce}'; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'"
        )
    );
    assert_eq!(page.matches("<script").count(), 1);
    assert!(page.contains("window.location.replace(\"https://api.aurinko.io/v1/auth/callback\"+"), "{page}");
    assert!(page.contains("<p id=\"m\">Signing in\u{2026}</p>"), "a person sees what happens: {page}");
    assert_eq!(page.matches("://").count(), 1, "the upstream callback is the only URL: {page}");
    assert!(!page.contains("src=") && !page.contains("href="), "no external resources: {page}");

    let second = relay.get("/v1/auth/callback").await;
    assert_ne!(nonce_of(second.text()), nonce, "every page gets its own nonce");
}

#[tokio::test]
async fn fragment_page_target_keeps_the_upstream_base_path() {
    let kit = Kit::new();
    let relay = kit.relay(Conf { upstream: "https://broker.example/base", ..Conf::default() }).await;
    let reply = relay.get("/v1/auth/callback").await;
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains("(\"https://broker.example/base/v1/auth/callback\"+"), "{}", reply.text());
    let reply = relay.get("/v1/auth/callback?code=c").await;
    assert_eq!(reply.header("location"), "https://broker.example/base/v1/auth/callback?code=c");
}

// ---- 4. Authorize ---------------------------------------------------------------------------

#[tokio::test]
async fn authorize_redirects_every_path_with_the_raw_query() {
    let kit = Kit::new();
    let relay = kit.relay(Conf::default()).await;
    let query = "clientId=abc&serviceType=Office365&returnUrl=https%3A%2F%2Fapp.example%2Fdone&state=a+b%2B";
    for path in ["/v1/auth/authorize", "/v1/auth/authorizeDaemon", "/v1/auth/authorizeUser"] {
        let reply = relay.get(&format!("{path}?{query}")).await;
        assert_eq!(reply.status, 302, "{path}");
        assert_eq!(reply.header("location"), format!("https://api.aurinko.io{path}?{query}"));
        assert_eq!(reply.header("referrer-policy"), "no-referrer");
        assert_eq!(reply.body.len(), 0);
    }
    let reply = relay.send("POST", "/v1/auth/authorize", &form(), "").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), "GET, HEAD");
}

/// An upstream authorize endpoint: a redirect to its own callback (or, as the query's `to=`
/// says, to its own login page, absolute or relative, or to a third party) and two cookies
/// scoped to its own domain.
async fn authorize_upstream(kit: &Kit) -> (Upstream, String) {
    let origin = Arc::new(OnceLock::<String>::new());
    let own = origin.clone();
    let behaviour = UpstreamBehaviour::respond(move |rec| {
        let own = own.get().expect("origin set");
        let location = match rec.target.split_once("to=").map(|(_, to)| to) {
            Some("idp") => "https://login.microsoftonline.com/common/oauth2/v2.0/authorize?client_id=x".to_string(),
            Some("login") => format!("{own}/v1/auth/login?x=1"),
            Some("relative") => "/v1/auth/login?x=1".to_string(),
            _ => format!("{own}/v1/auth/callback?code=c%2B1&state=s%20'"),
        };
        Response::builder()
            .status(302)
            .header("location", location)
            .header("set-cookie", "sid=a%3Db; Domain=localhost; Path=/; Secure; HttpOnly; SameSite=None")
            .header("set-cookie", "lb=7; Path=/v1; domain=.localhost; Max-Age=60")
            .body(Full::new(Bytes::new()))
            .unwrap()
    });
    // HTTP/1.1 only, so the `Host` the relay sets is visible as a header.
    let (upstream, url) = kit.upstream(&[b"http/1.1"], behaviour).await;
    origin.set(url.clone()).unwrap();
    (upstream, url)
}

#[tokio::test]
async fn authorize_proxy_rewrites_location_and_cookie_domains() {
    let kit = Kit::new();
    let (upstream, url) = authorize_upstream(&kit).await;
    let relay = kit
        .relay(Conf { upstream: &url, server: "public_https_port = 443", tables: BOTH_PROXIED, ..Conf::default() })
        .await;
    let reply = relay.get("/v1/auth/authorizeUser?clientId=abc&state=s%2B1").await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), "https://auth.example.test/v1/auth/callback?code=c%2B1&state=s%20'");
    let cookies: Vec<&str> = reply.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(
        cookies,
        [
            "sid=a%3Db; Domain=auth.example.test; Path=/; Secure; HttpOnly; SameSite=None",
            "lb=7; Path=/v1; Domain=auth.example.test; Max-Age=60",
        ]
    );
    assert_eq!(reply.header("referrer-policy"), "no-referrer");

    assert_eq!(upstream.hits(), 1);
    let seen = upstream.last();
    assert_eq!(seen.target, "/v1/auth/authorizeUser?clientId=abc&state=s%2B1");
    assert_eq!(seen.headers["host"], format!("localhost:{}", upstream.addr.port()));
    assert_eq!(seen.headers["x-forwarded-host"], HOST);
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");

    let reply = relay.get("/v1/auth/authorize?to=idp").await;
    assert_eq!(reply.header("location"), "https://login.microsoftonline.com/common/oauth2/v2.0/authorize?client_id=x");
}

/// A broker page the relay does not forward (its login page) stays on the broker's origin: on
/// the relay it would be a `404`. A relative `Location` to it, which the browser would resolve
/// against the relay, is made absolute on the broker.
#[tokio::test]
async fn authorize_proxy_leaves_redirects_to_unrouted_broker_pages_on_the_broker() {
    let kit = Kit::new();
    let (_upstream, url) = authorize_upstream(&kit).await;
    let relay = kit.relay(Conf { upstream: &url, tables: BOTH_PROXIED, ..Conf::default() }).await;
    for to in ["login", "relative"] {
        let reply = relay.get(&format!("/v1/auth/authorize?to={to}")).await;
        assert_eq!((reply.status, reply.header("location")), (302, format!("{url}/v1/auth/login?x=1").as_str()));
        let landed = relay.get("/v1/auth/login?x=1").await;
        assert_eq!(landed.status, 404, "the relay does not serve the login page");
    }
    // The callback, in redirect mode, is not forwarded by the relay: it stays on the broker too.
    let split =
        kit.relay(Conf { upstream: &url, tables: "[site.authorize]\nmode = \"proxy\"\n", ..Conf::default() }).await;
    let reply = split.get("/v1/auth/authorize?clientId=abc").await;
    assert_eq!(reply.header("location"), format!("{url}/v1/auth/callback?code=c%2B1&state=s%20'"));
}

/// Scheme and host are case-insensitive (RFC 3986 section 6.2.2.1), and a `Set-Cookie`
/// attribute's name and value are trimmed and its name read in any case (RFC 6265 section 5.2):
/// an upstream that writes `HTTPS://LOCALHOST:port` or `domain = x` is rewritten all the same.
#[tokio::test]
async fn authorize_proxy_rewrites_locations_and_domains_in_any_case_and_spacing() {
    let kit = Kit::new();
    let origin = Arc::new(OnceLock::<String>::new());
    let own = origin.clone();
    let behaviour = UpstreamBehaviour::respond(move |_| {
        Response::builder()
            .status(302)
            .header("location", format!("{}/v1/auth/callback?x=A%2Fb", own.get().unwrap().to_ascii_uppercase()))
            .header("set-cookie", "sid=1; DOMAIN = localhost ; Path=/; Secure")
            .header("set-cookie", "lb=2; Path=/;\tdomain\t=\t.localhost")
            .header("set-cookie", "hostonly=3; Domain=; Path=/")
            .body(Full::new(Bytes::new()))
            .unwrap()
    });
    let (_upstream, url) = kit.upstream(&[b"http/1.1"], behaviour).await;
    origin.set(url.clone()).unwrap();
    let relay = kit
        .relay(Conf { upstream: &url, server: "public_https_port = 443", tables: BOTH_PROXIED, ..Conf::default() })
        .await;
    let reply = relay.get("/v1/auth/authorize?clientId=abc").await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), "https://auth.example.test/v1/auth/callback?x=A%2Fb");
    let cookies: Vec<&str> = reply.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(
        cookies,
        [
            "sid=1; Domain=auth.example.test; Path=/; Secure",
            "lb=2; Path=/; Domain=auth.example.test",
            "hostonly=3; Domain=; Path=/"
        ]
    );
}

/// An HTTP/2 browser sends each cookie as a field of its own (RFC 9113 section 8.2.3); an
/// HTTP/1.1 upstream gets them as one `Cookie` line, in their order.
#[tokio::test]
async fn authorize_proxy_joins_http2_cookie_crumbs_into_one_line() {
    let kit = Kit::new();
    let (upstream, url) = authorize_upstream(&kit).await;
    let relay = kit.relay(Conf { upstream: &url, tables: BOTH_PROXIED, ..Conf::default() }).await;
    let h2 = TlsClient::new(relay.relay.https, kit.pki.client_config(&[b"h2"]));
    let crumbs = [("cookie", "sid=a%3Db"), ("cookie", "lb=7"), ("cookie", "theme=dark")];
    let reply = h2.send_h2(HOST, "GET", "/v1/auth/authorizeUser?clientId=abc", &crumbs, "").await;
    assert_eq!(reply.status, 302);
    let seen = upstream.last();
    assert_eq!(seen.version, Version::HTTP_11);
    let lines: Vec<&str> = seen.headers.get_all("cookie").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(lines, ["sid=a%3Db; lb=7; theme=dark"]);

    // One cookie, over HTTP/1.1: as it was.
    relay.send("GET", "/v1/auth/authorizeUser?clientId=abc", &[("cookie", "sid=1; lb=2")], "").await;
    assert_eq!(upstream.last().headers["cookie"], "sid=1; lb=2");
    assert_eq!(upstream.last().headers.get_all("cookie").iter().count(), 1);
}

#[tokio::test]
async fn authorize_proxy_location_carries_a_non_default_public_port() {
    let kit = Kit::new();
    let (_upstream, url) = authorize_upstream(&kit).await;
    let relay = kit
        .relay(Conf { upstream: &url, server: "public_https_port = 8443", tables: BOTH_PROXIED, ..Conf::default() })
        .await;
    let reply = relay.get("/v1/auth/authorize?clientId=abc").await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), "https://auth.example.test:8443/v1/auth/callback?code=c%2B1&state=s%20'");
}

#[test]
fn check_warns_about_mode_combinations_that_cannot_work() {
    let kit = Kit::new();
    let warnings =
        |tables: &str| Config::parse("t.toml", &kit.toml(&Conf { tables, ..Conf::default() })).unwrap().warnings;
    let split = warnings("[site.authorize]\nmode = \"proxy\"\n");
    assert_eq!(split.len(), 1, "{split:?}");
    assert_eq!(split[0].key, "site[0].authorize.mode");
    assert!(split[0].message.contains("two domains"), "{}", split[0].message);
    assert_eq!(warnings("[site.callback]\nmode = \"proxy\"\n").len(), 1);
    assert!(warnings(BOTH_PROXIED).is_empty());

    // Fragment response mode cannot work through a proxied callback without the page.
    let no_page =
        warnings("[site.authorize]\nmode = \"proxy\"\n[site.callback]\nmode = \"proxy\"\nfragment_page = false\n");
    assert_eq!(no_page.len(), 1, "{no_page:?}");
    assert_eq!(no_page[0].key, "site[0].callback.fragment_page");
    assert!(no_page[0].message.contains("never reaches the broker"), "{}", no_page[0].message);
    assert!(warnings("[site.callback]\nfragment_page = false\n").is_empty(), "a redirect keeps the fragment");
}

// ---- 5. Callback proxy mode -----------------------------------------------------------------

#[tokio::test]
async fn callback_proxy_forwards_query_and_form_body_verbatim() {
    let kit = Kit::new();
    let (upstream, url) = kit.upstream(&[b"h2", b"http/1.1"], UpstreamBehaviour::fixed(200, &[], "signed in\n")).await;
    let relay = kit.relay(Conf { upstream: &url, tables: BOTH_PROXIED, ..Conf::default() }).await;
    let query = "code=c%2B1&state=a+b%20c&k=&k=2";
    let reply = relay.get(&format!("/v1/auth/callback?{query}")).await;
    assert_eq!((reply.status, reply.text()), (200, "signed in\n"));
    assert_eq!(upstream.last().target, format!("/v1/auth/callback?{query}"));
    assert_eq!(upstream.last().method, "GET");

    let body = "code=c%2B1&state=a+b%20c&session_state=x";
    let reply = relay.send("POST", "/v1/auth/callback", &form(), body).await;
    assert_eq!((reply.status, reply.text()), (200, "signed in\n"));
    let seen = upstream.last();
    assert_eq!((seen.method.as_str(), seen.target.as_str()), ("POST", "/v1/auth/callback"));
    assert_eq!(seen.headers["content-type"], "application/x-www-form-urlencoded");
    assert_eq!(&seen.body[..], body.as_bytes());
    assert_eq!(upstream.hits(), 2);
}

/// Fragment response mode in proxy mode: the callback with no query gets the fragment page,
/// which goes on to the relay's own callback (same origin) with the fragment as its query; that
/// request is forwarded. Nothing reaches the broker without a query.
#[tokio::test]
async fn callback_proxy_serves_the_fragment_page_which_comes_back_to_the_relay() {
    let kit = Kit::new();
    let (upstream, url) = kit.upstream(&[b"http/1.1"], UpstreamBehaviour::fixed(200, &[], "signed in\n")).await;
    let relay = kit.relay(Conf { upstream: &url, tables: BOTH_PROXIED, ..Conf::default() }).await;
    for target in ["/v1/auth/callback", "/v1/auth/callback?"] {
        let page = relay.get(target).await;
        assert_eq!((page.status, page.header("content-type")), (200, "text/html; charset=utf-8"), "{target}");
        assert!(page.text().contains("window.location.replace(\"/v1/auth/callback\"+\"?\"+f)"), "{}", page.text());
        assert!(!page.text().contains("://"), "no other origin: {}", page.text());
        assert!(page.text().contains("Signing in\u{2026}"), "{}", page.text());
    }
    assert_eq!(upstream.hits(), 0);
    let reply = relay.get("/v1/auth/callback?code=c%2B1&state=s").await;
    assert_eq!((reply.status, reply.text()), (200, "signed in\n"));
    assert_eq!(upstream.last().target, "/v1/auth/callback?code=c%2B1&state=s");
}

// ---- 5b. Publisher domain verification --------------------------------------------------------

/// Entra's "Verify a new domain" reads this document on the domain, exactly in this shape and
/// as `application/json`; without `application_ids` the relay serves no such path.
#[tokio::test]
async fn microsoft_identity_association_lists_the_configured_application_ids() {
    let kit = Kit::new();
    let ids = "application_ids = [\"6731DE76-14A6-49AE-97BC-6EBA6914391E\", \"0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d\"]";
    let relay = kit.relay(Conf { site: ids, ..Conf::default() }).await;
    let reply = relay.get("/.well-known/microsoft-identity-association.json").await;
    assert_eq!((reply.status, reply.header("content-type")), (200, "application/json"));
    assert_eq!(
        reply.text(),
        r#"{"associatedApplications":[{"applicationId":"6731de76-14a6-49ae-97bc-6eba6914391e"},{"applicationId":"0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"}]}"#
    );
    let parsed: serde_json::Value = serde_json::from_str(reply.text()).unwrap();
    assert_eq!(parsed["associatedApplications"][1]["applicationId"], "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d");
    let post = relay.send("POST", "/.well-known/microsoft-identity-association.json", &[], "").await;
    assert_eq!((post.status, post.header("allow")), (405, "GET, HEAD"));

    let plain = kit.relay(Conf::default()).await;
    assert_eq!(plain.get("/.well-known/microsoft-identity-association.json").await.status, 404);

    let bad = kit.toml(&Conf { site: "application_ids = [\"not-a-guid\"]", ..Conf::default() });
    let err = Config::parse("t.toml", &bad).unwrap_err().to_string();
    assert!(err.contains("site[0].application_ids[0]: `not-a-guid` is not an application (client) id"), "{err}");
}

// ---- 6. Token -------------------------------------------------------------------------------

#[tokio::test]
async fn token_is_proxied_once_with_authorization_and_body() {
    let kit = Kit::new();
    let json = r#"{"accountId":123,"accessToken":"t"}"#;
    let (upstream, url) = kit
        .upstream(&[b"h2", b"http/1.1"], UpstreamBehaviour::fixed(200, &[("content-type", "application/json")], json))
        .await;
    let relay = kit.relay(Conf { upstream: &url, ..Conf::default() }).await;
    let reply = relay
        .send(
            "POST",
            "/v1/auth/token/abc123",
            &[("authorization", "Basic Y2xpZW50OnNlY3JldA=="), ("content-type", "application/x-www-form-urlencoded")],
            "grant_type=authorization_code",
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), json);
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(upstream.hits(), 1);
    let seen = upstream.last();
    assert_eq!(seen.version, Version::HTTP_2, "the upstream offered h2");
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, "/v1/auth/token/abc123");
    assert_eq!(seen.headers["authorization"], "Basic Y2xpZW50OnNlY3JldA==");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-host"], "auth.example.test");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(&seen.body[..], b"grant_type=authorization_code");
}

#[tokio::test]
async fn token_401_is_passed_through_and_never_cached() {
    let kit = Kit::new();
    let headers = [("www-authenticate", "Basic realm=\"aurinko\""), ("cache-control", "max-age=60")];
    let (upstream, url) = kit
        .upstream(&[b"h2", b"http/1.1"], UpstreamBehaviour::fixed(401, &headers, r#"{"code":"unauthorized"}"#))
        .await;
    let relay = kit.relay(Conf { upstream: &url, ..Conf::default() }).await;
    let reply = relay.send("POST", "/v1/auth/token/abc", &[("authorization", "Basic eDp5")], "").await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.header("www-authenticate"), "Basic realm=\"aurinko\"");
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(reply.text(), r#"{"code":"unauthorized"}"#);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn token_is_not_retried_when_the_upstream_fails() {
    let kit = Kit::new();
    let (upstream, url) = kit.upstream(&[b"h2", b"http/1.1"], UpstreamBehaviour::fixed(500, &[], "boom\n")).await;
    let relay = kit.relay(Conf { upstream: &url, ..Conf::default() }).await;
    let reply = relay.send("POST", "/v1/auth/token/single-use", &form(), "a=1").await;
    assert_eq!((reply.status, reply.text()), (500, "boom\n"));
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(upstream.hits(), 1, "a code is single-use: one attempt only");
}

#[tokio::test]
async fn token_works_over_http2_end_to_end() {
    let kit = Kit::new();
    let (upstream, url) = kit.upstream(&[b"h2"], UpstreamBehaviour::fixed(200, &[], "{}")).await;
    let relay = kit.relay(Conf { upstream: &url, ..Conf::default() }).await;
    let h2 = TlsClient::new(relay.relay.https, kit.pki.client_config(&[b"h2"]));
    let reply = h2.send_h2(HOST, "POST", "/v1/auth/token/abc", &[], "grant_type=authorization_code").await;
    assert_eq!((reply.status, reply.text()), (200, "{}"));
    assert_eq!(reply.header("cache-control"), "no-store");
    let seen = upstream.last();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.target, "/v1/auth/token/abc");
    assert_eq!(&seen.body[..], b"grant_type=authorization_code");
}

#[tokio::test]
async fn token_body_over_the_limit_is_413_and_never_sent() {
    let kit = Kit::new();
    let (upstream, url) = kit.upstream(&[b"h2", b"http/1.1"], UpstreamBehaviour::fixed(200, &[], "{}")).await;
    let relay =
        kit.relay(Conf { upstream: &url, tables: "[limits]\nmax_body_bytes = 1024\n", ..Conf::default() }).await;
    let head = |framing: &str| {
        format!("POST /v1/auth/token/abc HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n{framing}\r\n\r\n")
    };
    let too_large = "HTTP/1.1 413 Payload Too Large\r\n";

    // A declared length over the limit is refused before any body byte is sent.
    let reply = relay.raw(head("Content-Length: 1025").as_bytes()).await;
    assert!(reply.starts_with(too_large), "{reply}");
    assert!(reply.ends_with("\r\n\r\nrequest body too large\n"), "{reply}");

    let chunked =
        |len: usize| format!("{}{len:x}\r\n{}\r\n0\r\n\r\n", head("Transfer-Encoding: chunked"), "a".repeat(len));
    let reply = relay.raw(chunked(1025).as_bytes()).await;
    assert!(reply.starts_with(too_large), "{reply}");
    assert!(reply.ends_with("\r\n\r\nrequest body too large\n"), "{reply}");
    assert_eq!(upstream.hits(), 0);

    let reply = relay.raw(chunked(1024).as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "exactly the limit passes: {reply}");
    assert_eq!(upstream.last().body.len(), 1024);
}

#[tokio::test]
async fn token_on_a_closed_upstream_port_is_502_without_detail() {
    let kit = Kit::new();
    let port = common::process::free_addr().port();
    let url = format!("https://127.0.0.1:{port}");
    let relay = kit.relay(Conf { upstream: &url, ..Conf::default() }).await;
    let reply = relay.send("POST", "/v1/auth/token/abc", &form(), "a=1").await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.text(), "upstream unreachable\n");
    assert!(!reply.text().contains(&port.to_string()));
    assert_eq!(reply.header("cache-control"), "no-store");
}

#[tokio::test]
async fn token_on_a_silent_upstream_is_504() {
    let kit = Kit::new();
    let (upstream, url) = kit.upstream(&[b"h2", b"http/1.1"], UpstreamBehaviour::Silent).await;
    let relay = kit.relay(Conf { upstream: &url, site: "response_timeout = \"300ms\"", ..Conf::default() }).await;
    let reply = relay.send("POST", "/v1/auth/token/abc", &form(), "a=1").await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.text(), "upstream did not answer in time\n");
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn token_methods_and_paths() {
    let kit = Kit::new();
    let (upstream, url) = kit.upstream(&[b"h2", b"http/1.1"], UpstreamBehaviour::fixed(200, &[], "{}")).await;
    let relay = kit.relay(Conf { upstream: &url, ..Conf::default() }).await;
    let reply = relay.get("/v1/auth/token/abc").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), "POST");
    for path in ["/v1/auth/token/", "/v1/auth/token/a/b"] {
        let reply = relay.send("POST", path, &form(), "a=1").await;
        assert_eq!((reply.status, reply.text()), (404, "not found\n"), "{path}");
    }
    assert_eq!(upstream.hits(), 0);

    let relay = kit
        .relay(Conf { upstream: &url, tables: "[site.token]\nmethods = [\"POST\", \"GET\"]\n", ..Conf::default() })
        .await;
    let reply = relay.get("/v1/auth/token/abc").await;
    assert_eq!((reply.status, reply.text()), (200, "{}"));
    assert_eq!((upstream.last().method.as_str(), upstream.last().target.as_str()), ("GET", "/v1/auth/token/abc"));
}

// ---- 7. Hosts, unknown paths and methods ----------------------------------------------------

#[tokio::test]
async fn host_header_picks_the_site() {
    let kit = Kit::new();
    let relay = kit.relay(Conf::default()).await;
    let reply = relay.send("GET", "/v1/auth/callback?code=c", &[("host", "evil.example")], "").await;
    assert_eq!((reply.status, reply.text()), (421, "this relay does not serve that host\n"));
    let reply = relay.send("GET", "/v1/auth/callback?code=c", &[("host", "auth.example.test:8443")], "").await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), "https://api.aurinko.io/v1/auth/callback?code=c");
    let reply = relay.get("/v1/auth/nope").await;
    assert_eq!((reply.status, reply.text()), (404, "not found\n"));
    let reply = relay.send("DELETE", "/v1/auth/callback", &[], "").await;
    assert_eq!((reply.status, reply.text()), (405, "method not allowed\n"));
    assert_eq!(reply.header("allow"), "GET, HEAD, POST");
}

/// RFC 9112 section 3.2: two `Host` lines are a bad request, even when one names this site
/// (a proxy in front may have routed by the other); an absolute-form target's authority wins
/// over `Host` (section 3.2.2). Over HTTP/2 a `Host` naming another host than `:authority` is
/// malformed (RFC 9113 section 8.3.1); the same host with its port, in capitals, is not.
#[tokio::test]
async fn two_host_lines_are_a_bad_request() {
    let kit = Kit::new();
    let relay = kit.relay(Conf::default()).await;
    for hosts in [[HOST, "evil.example"], ["evil.example", HOST], [HOST, HOST]] {
        let reply = relay.send("GET", "/v1/auth/callback?code=c", &[("host", hosts[0]), ("host", hosts[1])], "").await;
        assert_eq!((reply.status, reply.text()), (400, "more than one Host header\n"), "{hosts:?}");
    }
    let reply = relay.send("GET", "/v1/auth/callback?code=c", &[("host", "")], "").await;
    assert_eq!((reply.status, reply.text()), (400, "missing or invalid Host header\n"));
    let absolute = format!(
        "GET https://{HOST}/v1/auth/callback?code=c HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    );
    let reply = relay.raw(absolute.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 302 Found\r\n"), "{reply}");
    assert!(reply.contains("\r\nlocation: https://api.aurinko.io/v1/auth/callback?code=c\r\n"), "{reply}");

    let h2 = TlsClient::new(relay.relay.https, kit.pki.client_config(&[b"h2"]));
    let reply = h2.send_h2(HOST, "GET", "/v1/auth/callback?code=c", &[("host", "evil.example")], "").await;
    assert_eq!((reply.status, reply.text()), (400, "Host names another host than :authority\n"));
    let reply = h2.send_h2(HOST, "GET", "/v1/auth/callback?code=c", &[("host", "AUTH.example.test:443")], "").await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), "https://api.aurinko.io/v1/auth/callback?code=c");
}

#[tokio::test]
async fn sni_of_one_site_with_host_of_another_is_421() {
    let kit = Kit::new();
    let other = kit.pki.leaf("other", &["other.example.test"]);
    let site = |name: &str, leaf: &Leaf| {
        format!(
            "[[site]]\nname = \"{name}\"\nhostnames = [\"{name}.example.test\"]\n\
             [site.tls]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n",
            leaf.cert_path.display(),
            leaf.key_path.display()
        )
    };
    let toml =
        format!("[server]\nhttps = [\"127.0.0.1:0\"]\n{}{}", site("auth", &kit.relay_leaf), site("other", &other));
    let relay = RelayUnderTest::start(&toml).await;
    let client = TlsClient::new(relay.https, kit.pki.client_config(&[b"http/1.1"]));
    let ok = client.get("other.example.test", "/v1/auth/callback?code=c").await;
    assert_eq!(ok.status, 302, "each site answers on its own name");
    let crossed = client.send(HOST, "GET", "/v1/auth/callback?code=c", &[("host", "other.example.test")], "").await;
    assert_eq!((crossed.status, crossed.text()), (421, "this relay does not serve that host\n"));
}

/// A path whose meaning depends on how a server resolves dot-segments or decodes `%2f` is
/// refused before anything goes upstream, over HTTP/1.1 and HTTP/2 alike; doubled and trailing
/// slashes are not folded into a route; what is relayed keeps every byte it came with.
#[tokio::test]
async fn dot_segments_and_encoded_slashes_never_reach_the_upstream() {
    let kit = Kit::new();
    let (upstream, url) = kit.upstream(&[b"http/1.1"], UpstreamBehaviour::fixed(200, &[], "{}")).await;
    let relay = kit.relay(Conf { upstream: &url, ..Conf::default() }).await;
    let h2 = TlsClient::new(relay.relay.https, kit.pki.client_config(&[b"h2"]));
    let dot = (400, "dot-segment in the path\n");
    let encoded = (400, "encoded / or \\ in the path\n");
    for (target, expected) in [
        ("/v1/auth/token/..%2f..%2fadmin", encoded),
        ("/v1/auth/token/..%2F..%2Fadmin", encoded),
        ("/v1/auth/token/abc%5c..%5cadmin", encoded),
        ("/v1/auth/token/..", dot),
        ("/v1/auth/token/%2e%2E", dot),
        ("/v1/auth/token/..;jsessionid=1", dot),
        ("/v1/auth/token/x/../../admin", dot),
        ("/..", dot),
        ("/%2e%2e", dot),
        ("/v1\\auth\\token\\x", (400, "backslash in the path\n")),
        ("//v1/auth/token/x", (404, "not found\n")),
        ("/v1/auth/token/x/", (404, "not found\n")),
    ] {
        let reply = relay.send("POST", target, &form(), "a=1").await;
        assert_eq!((reply.status, reply.text()), expected, "HTTP/1.1 {target}");
        assert_eq!(reply.header("content-type"), "text/plain; charset=utf-8", "{target}");
        let reply = h2.send_h2(HOST, "POST", target, &form(), "a=1").await;
        assert_eq!((reply.status, reply.text()), expected, "HTTP/2 {target}");
    }
    assert_eq!(upstream.hits(), 0);

    // Dots and encoded slashes elsewhere are no dot-segments: relayed byte for byte, query too.
    for target in
        ["/v1/auth/token/a..b%2Bc%7e...", "/v1/auth/token/abc?next=..%2F..%2Fadmin&x=/../", "/v1/auth/%74oken/c"]
    {
        let reply = relay.send("POST", target, &form(), "a=1").await;
        assert_eq!(reply.status, 200, "{target}");
        assert_eq!(upstream.last().target, target);
    }
    let reply = relay.get("/v1/auth/callback?code=..%2F..%2Fa&state=/../").await;
    assert_eq!(reply.header("location"), format!("{url}/v1/auth/callback?code=..%2F..%2Fa&state=/../"));
}

// ---- 8. Plain http:// upstream --------------------------------------------------------------

#[tokio::test]
async fn token_reaches_a_plain_http_upstream() {
    let kit = Kit::new();
    let upstream = Upstream::start(None, UpstreamBehaviour::fixed(200, &[], r#"{"ok":true}"#)).await;
    let url = format!("http://127.0.0.1:{}", upstream.addr.port());
    let relay = kit.relay(Conf { upstream: &url, ..Conf::default() }).await;
    let reply = relay.send("POST", "/v1/auth/token/abc", &[("authorization", "Basic eDp5")], "a=1").await;
    assert_eq!((reply.status, reply.text()), (200, r#"{"ok":true}"#));
    let seen = upstream.last();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.headers["host"], format!("127.0.0.1:{}", upstream.addr.port()));
    assert_eq!(seen.headers["authorization"], "Basic eDp5");
    assert_eq!(&seen.body[..], b"a=1");
}
