//! The routes over real TLS: what a browser and an application see from the relay.

mod common;

use common::{Pki, RelayUnderTest, TlsClient, Upstream, UpstreamBehaviour};

fn config(pki: &common::pki::Leaf, upstream: &str, ca: &std::path::Path, extra: &str) -> String {
    format!(
        r#"
[server]
https = ["127.0.0.1:0"]

[[site]]
name = "auth"
hostnames = ["auth.example.test"]
upstream = "{upstream}"
upstream_ca_file = "{ca}"
{extra}

[site.tls]
source = "files"
cert = "{cert}"
key = "{key}"
"#,
        cert = pki.cert_path.display(),
        key = pki.key_path.display(),
        ca = ca.display(),
    )
}

#[tokio::test]
async fn callback_query_is_relayed_byte_for_byte() {
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &["auth.example.test"]);
    let relay = RelayUnderTest::start(&config(&leaf, "https://api.aurinko.io", &pki.ca_path, "")).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    let query =
        "state=a+b%2Bc%20d&code=M.C5_BAY.2%2F%2F&scope=Mail.Read+offline_access&empty=&k=1&k=2&u=%C3%A9%E2%9C%93";
    let reply = client.get("auth.example.test", &format!("/v1/auth/callback?{query}")).await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), format!("https://api.aurinko.io/v1/auth/callback?{query}"));
    assert_eq!(reply.header("referrer-policy"), "no-referrer");
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(reply.header("strict-transport-security"), "max-age=31536000");
    assert_eq!(reply.body.len(), 0);
}

#[tokio::test]
async fn token_is_proxied_once_with_authorization_and_body() {
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &["auth.example.test"]);
    let up_leaf = pki.leaf("upstream", &["localhost"]);
    let upstream = Upstream::start(
        Some(pki.server_config(&up_leaf, &[b"h2", b"http/1.1"])),
        UpstreamBehaviour::fixed(
            200,
            &[("content-type", "application/json")],
            r#"{"accountId":123,"accessToken":"t"}"#,
        ),
    )
    .await;
    let up = format!("https://localhost:{}", upstream.addr.port());
    let relay = RelayUnderTest::start(&config(&leaf, &up, &pki.ca_path, "")).await;
    let client = TlsClient::new(relay.https, pki.client_config(&[b"http/1.1"]));
    let reply = client
        .send(
            "auth.example.test",
            "POST",
            "/v1/auth/token/abc123",
            &[("authorization", "Basic Y2xpZW50OnNlY3JldA=="), ("content-type", "application/x-www-form-urlencoded")],
            "grant_type=authorization_code",
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), r#"{"accountId":123,"accessToken":"t"}"#);
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(upstream.hits(), 1);
    let seen = upstream.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, "/v1/auth/token/abc123");
    assert_eq!(seen.headers["authorization"], "Basic Y2xpZW50OnNlY3JldA==");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-host"], "auth.example.test");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(&seen.body[..], b"grant_type=authorization_code");
}
