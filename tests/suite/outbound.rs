//! Reaching the upstream through an outbound HTTP proxy (`[outbound]`): a real tinyproxy
//! between the relay and a real HTTPS upstream. The token exchange goes through a `CONNECT`
//! tunnel with TLS end to end, the proxy's credentials go with it, `no_proxy` destinations go
//! direct, a refusing or silent proxy is a bounded 502, and `doctor` checks the upstream the same
//! way.

use crate::common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{Pki, RelayUnderTest, TlsClient, Upstream, UpstreamBehaviour};
use oauth_relay::doctor::{Level, upstream};
use oauth_relay::egress::Egress;
use url::Url;

const HOST: &str = "auth.example.test";
const TOKEN: &str = r#"{"accessToken":"t"}"#;

/// A relay whose token route goes to an HTTPS upstream on 127.0.0.1, with these `[outbound]`
/// lines (and extra `[[site]]` lines), and an admin listener for its metrics.
struct Kit {
    _pki: Pki,
    upstream: Upstream,
    relay: RelayUnderTest,
    client: TlsClient,
}

async fn kit(outbound: &str, site_extra: &str) -> Kit {
    let pki = Pki::new();
    let leaf = pki.leaf("upstream", &["127.0.0.1"]);
    let upstream = Upstream::start(
        Some(pki.server_config(&leaf, &[b"h2", b"http/1.1"])),
        UpstreamBehaviour::fixed(200, &[("content-type", "application/json")], TOKEN),
    )
    .await;
    let site = format!(
        "upstream = \"https://{}\"\nupstream_ca_file = \"{}\"\n{site_extra}",
        upstream.addr,
        pki.ca_path.display()
    );
    let toml =
        format!("{}\n[outbound]\n{outbound}\n", common::one_site_config(&pki, "admin = \"127.0.0.1:0\"", "", &site));
    let relay = RelayUnderTest::start(&toml).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    Kit { _pki: pki, upstream, relay, client }
}

impl Kit {
    async fn token(&self) -> common::Reply {
        self.client.send(HOST, "POST", "/v1/auth/token/abc", &[("authorization", "Basic YXBwOnNlY3JldA==")], "").await
    }
}

#[tokio::test]
async fn the_token_exchange_goes_through_the_proxy_with_tls_end_to_end() {
    let proxy = Proxy::start(None).await;
    let kit = kit(&format!("proxy = \"{}\"", proxy.url(None)), "").await;
    let reply = kit.token().await;
    assert_eq!((reply.status, reply.text()), (200, TOKEN));
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(kit.upstream.hits(), 1);
    assert_eq!(kit.upstream.last().headers["authorization"], "Basic YXBwOnNlY3JldA==");
    // One tunnel to the upstream's address; the upstream's TLS ran inside it.
    assert_eq!(proxy.connects(), vec![kit.upstream.addr.to_string()]);
}

#[tokio::test]
async fn the_proxy_gets_its_credentials_and_a_refusal_is_a_502() {
    let proxy = Proxy::start(Some(("relay", "proxy-s3cret"))).await;
    let kit = kit(&format!("proxy = \"{}\"", proxy.url(Some(("relay", "proxy-s3cret")))), "").await;
    assert_eq!(kit.token().await.status, 200);
    assert_eq!(proxy.connects().len(), 1);

    let wrong = self::kit(&format!("proxy = \"{}\"", proxy.url(Some(("relay", "wrong")))), "").await;
    let admin = wrong.relay.admin.expect("admin listener");
    let before = proxy_errors(admin).await;
    let reply = wrong.token().await;
    assert_eq!((reply.status, reply.text()), (502, "upstream unreachable\n"));
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(wrong.upstream.hits(), 0, "nothing reached the upstream");
    // Counted as the proxy's failure, not the upstream's (the registry is process-wide, so
    // tests running beside this one can only add to it).
    assert!(proxy_errors(admin).await > before);
}

/// `oauth_relay_upstream_errors_total{kind="proxy"}`.
async fn proxy_errors(admin: std::net::SocketAddr) -> u64 {
    common::client::scrape(admin, "oauth_relay_upstream_errors_total", "kind").await["proxy"]
}

#[tokio::test]
async fn no_proxy_destinations_are_reached_directly() {
    let proxy = Proxy::start(None).await;
    let kit = kit(&format!("proxy = \"{}\"\nno_proxy = [\"10.0.0.0/8\", \"127.0.0.1\"]", proxy.url(None)), "").await;
    assert_eq!(kit.token().await.status, 200);
    assert_eq!(kit.upstream.hits(), 1);
    assert_eq!(proxy.connects(), Vec::<String>::new());
}

#[tokio::test]
async fn a_silent_proxy_is_cut_at_the_connect_timeout() {
    // Accepts the TCP connection and never answers the CONNECT: only a bound on the whole
    // connect, not just on TCP's, ends the wait before the (long) response timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let kit =
        kit(&format!("proxy = \"http://{addr}\""), "connect_timeout = \"500ms\"\nresponse_timeout = \"20s\"").await;
    let start = Instant::now();
    let reply = kit.token().await;
    let took = start.elapsed();
    assert_eq!((reply.status, reply.text()), (502, "upstream unreachable\n"));
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "cut at the connect timeout: {took:?}"
    );
    hold.abort();
}

#[tokio::test]
async fn the_outbound_setting_takes_a_reload() {
    // Through the proxy, then `direct` after a reload: the next token exchange goes straight to
    // the upstream on a new connection (the upstream client and its pool come with the config).
    let proxy = Proxy::start(None).await;
    let pki = Pki::new();
    let leaf = pki.leaf("upstream", &["127.0.0.1"]);
    let upstream = Upstream::start(
        Some(pki.server_config(&leaf, &[b"http/1.1"])),
        UpstreamBehaviour::fixed(200, &[("content-type", "application/json")], TOKEN),
    )
    .await;
    let site = format!("upstream = \"https://{}\"\nupstream_ca_file = \"{}\"", upstream.addr, pki.ca_path.display());
    let path = pki.dir.path().join("relay.toml");
    let write = |outbound: &str| {
        let toml = format!("{}\n[outbound]\n{outbound}\n", common::one_site_config(&pki, "", "", &site));
        std::fs::write(&path, toml).expect("write config");
    };
    write(&format!("proxy = \"{}\"", proxy.url(None)));
    let mut relay = RelayUnderTest::load(&path).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    let token = || client.send(HOST, "POST", "/v1/auth/token/abc", &[], "");

    assert_eq!(token().await.status, 200);
    assert_eq!(proxy.connects().len(), 1);
    write("proxy = \"direct\"");
    relay.reload.reload().await.expect("reload");
    assert_eq!(token().await.status, 200);
    assert_eq!(upstream.hits(), 2);
    assert_eq!(proxy.connects().len(), 1, "the second exchange went direct");
    relay.stop().await;
}

#[tokio::test]
async fn doctor_checks_the_upstream_through_the_proxy() {
    let proxy = Proxy::start(None).await;
    let pki = Pki::new();
    let leaf = pki.leaf("upstream", &["127.0.0.1"]);
    let up =
        Upstream::start(Some(pki.server_config(&leaf, &[b"http/1.1"])), UpstreamBehaviour::fixed(200, &[], "")).await;
    let url = Url::parse(&format!("https://{}", up.addr)).unwrap();
    let egress = Egress::proxy(&proxy.url(None), "").unwrap();
    let f = upstream::check(&url, Some(&pki.ca_path), &egress, Duration::from_secs(5)).await;
    assert_eq!(f.level, Level::Ok, "{f:?}");
    let through = format!("https://{} (through the proxy http://{}): TLS 1.3, ", up.addr, proxy.addr);
    assert!(f.message.starts_with(&through), "{f:?}");
    assert_eq!(proxy.connects(), vec![up.addr.to_string()]);

    // The proxy is there but the upstream is not: the finding says which route failed.
    let closed = common::process::free_addr();
    let url = Url::parse(&format!("https://{closed}")).unwrap();
    let f = upstream::check(&url, Some(&pki.ca_path), &egress, Duration::from_secs(5)).await;
    assert_eq!(f.level, Level::Error, "{f:?}");
    let prefix = format!("https://{closed} (through the proxy http://{}) cannot be reached: ", proxy.addr);
    assert!(f.message.starts_with(&prefix), "{f:?}");
}
