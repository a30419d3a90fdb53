//! How the relay reaches the outside: its upstreams, their readiness probes, `doctor` and the
//! ACME CA. Corporate networks often allow outbound HTTPS only through an HTTP proxy; like curl,
//! Caddy and Traefik, the relay then tunnels through it with `CONNECT`. The proxy comes from
//! `[outbound] proxy`, by default from the environment (`HTTPS_PROXY`, `HTTP_PROXY`,
//! `ALL_PROXY`, `NO_PROXY`). hyper-util reads the rules and speaks `CONNECT`; this module picks
//! the route per destination and bounds the whole connect.

mod trust;

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

pub use trust::{TrustError, error_chain, upstream_tls};

/// The variables read when `[outbound] proxy = "env"`, each upper case first as curl reads them.
const ENV: [(&str, &str); 4] = [
    ("HTTPS_PROXY", "https_proxy"),
    ("HTTP_PROXY", "http_proxy"),
    ("ALL_PROXY", "all_proxy"),
    ("NO_PROXY", "no_proxy"),
];

/// Why an outbound proxy setting cannot be used. The value shown never carries a password.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("{source_name}: {shown} is not a proxy URL ({reason})")]
    Invalid { source_name: String, shown: String, reason: String },
    #[error(
        "{source_name}: {shown} is a {scheme}:// proxy; the relay speaks to HTTP proxies only (http://host:port, \
         tunnelling with CONNECT)"
    )]
    Scheme { source_name: String, shown: String, scheme: String },
}

/// Where connections to the outside go. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Egress {
    inner: Option<Arc<Rules>>,
}

struct Rules {
    matcher: Matcher,
    /// From the environment: loopback destinations then stay direct, as in Go's proxy rules
    /// (Caddy, Traefik), so a machine-wide `HTTPS_PROXY` does not capture local upstreams.
    from_env: bool,
    /// What `check` prints: each proxy without its credentials, and the exceptions.
    shown: String,
    /// The settings as written, for telling two configurations apart on reload.
    key: String,
}

impl Egress {
    /// Every connection goes straight to its destination.
    pub fn direct() -> Egress {
        Egress { inner: None }
    }

    /// Everything through `url` except the destinations `no_proxy` names (curl's `NO_PROXY`
    /// syntax: host names and their subdomains, IP addresses, CIDR networks, `*`).
    pub fn proxy(url: &str, no_proxy: &str) -> Result<Egress, EgressError> {
        let Checked { normalized, shown } = checked(url, "[outbound] proxy")?;
        let matcher = Matcher::builder().all(normalized).no(no_proxy.to_string()).build();
        let shown = if no_proxy.trim().is_empty() { shown } else { format!("{shown}, except {}", no_proxy.trim()) };
        let key = format!("{url}\n{no_proxy}");
        Ok(Egress { inner: Some(Arc::new(Rules { matcher, from_env: false, shown, key })) })
    }

    /// The rules in the environment as `get` reads it (`std::env::var` in the relay); direct
    /// when no proxy variable is set.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Egress, EgressError> {
        let read = |(upper, lower): (&'static str, &'static str)| {
            [upper, lower]
                .into_iter()
                .find_map(|n| get(n).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).map(|v| (n, v)))
        };
        let [https, http, all, no] = ENV.map(read);
        let mut shown = Vec::new();
        let mut normalized = |v: &Option<(&str, String)>| -> Result<String, EgressError> {
            let Some((name, value)) = v else { return Ok(String::new()) };
            let c = checked(value, name)?;
            shown.push(format!("{name}={}", c.shown));
            Ok(c.normalized)
        };
        let (https_url, http_url, all_url) = (normalized(&https)?, normalized(&http)?, normalized(&all)?);
        if shown.is_empty() {
            return Ok(Egress::direct());
        }
        let value = |v: &Option<(&str, String)>| v.as_ref().map(|(_, v)| v.clone()).unwrap_or_default();
        let matcher = Matcher::builder().https(https_url).http(http_url).all(all_url).no(value(&no)).build();
        if let Some((name, v)) = &no {
            shown.push(format!("{name}={v}"));
        }
        let shown = format!("{} (from the environment; loopback direct)", shown.join(" "));
        let key = format!("env\n{}\n{}\n{}\n{}", value(&https), value(&http), value(&all), value(&no));
        Ok(Egress { inner: Some(Arc::new(Rules { matcher, from_env: true, shown, key })) })
    }

    /// The proxy a connection to `dst` goes through, if any.
    pub fn route(&self, dst: &Uri) -> Option<Intercept> {
        let rules = self.inner.as_ref()?;
        if rules.from_env && is_loopback(dst.host()?) {
            return None;
        }
        rules.matcher.intercept(dst)
    }

    /// How `dst` is reached, for `check` and `doctor`: "direct" or the proxy, without credentials.
    pub fn describe(&self, dst: &Uri) -> String {
        match self.route(dst) {
            None => "direct".into(),
            Some(proxy) => format!("through the proxy {}", without_path(proxy.uri())),
        }
    }

    /// Whether every connection goes straight to its destination.
    pub fn is_direct(&self) -> bool {
        self.inner.is_none()
    }

    /// The rules as `check` prints them.
    pub fn summary(&self) -> &str {
        self.inner.as_ref().map_or("direct", |r| &r.shown)
    }

    /// A connector for hyper-util's client: `http`'s connections, tunnelled where a proxy
    /// applies, each bounded by `timeout` from the first SYN to the end of the proxy's answer.
    pub fn connector(&self, http: HttpConnector, timeout: Duration) -> EgressConnector {
        EgressConnector { http, egress: self.clone(), timeout }
    }

    /// One TCP connection to `dst` (tunnelled where a proxy applies) for a caller that speaks
    /// TLS and HTTP on it itself, bounded by `timeout`.
    pub async fn connect(&self, dst: &Uri, timeout: Duration) -> Result<TcpStream, BoxError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        self.connector(http, timeout).call(dst.clone()).await.map(TokioIo::into_inner)
    }
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.summary())
    }
}

impl PartialEq for Egress {
    fn eq(&self, other: &Egress) -> bool {
        self.inner.as_ref().map(|r| &r.key) == other.inner.as_ref().map(|r| &r.key)
    }
}

impl Eq for Egress {}

/// A connector error, as hyper-util's client takes it.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// See [`Egress::connector`].
#[derive(Clone)]
pub struct EgressConnector {
    http: HttpConnector,
    egress: Egress,
    timeout: Duration,
}

/// The connect took longer than its bound (TCP, and with a proxy its `CONNECT` answer too).
#[derive(Debug, thiserror::Error)]
#[error("no connection within {0:?}")]
pub struct ConnectTimeout(Duration);

/// The way through the proxy failed: reaching it, its answer to `CONNECT` (a refusal such as
/// 407 or 403), or its silence. Tells the logs and the `proxy` error metric which hop broke.
#[derive(Debug, thiserror::Error)]
#[error("through the proxy {proxy}")]
pub struct ProxyError {
    /// The proxy, without credentials.
    proxy: String,
    #[source]
    source: BoxError,
}

impl Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let timeout = self.timeout;
        match self.egress.route(&dst) {
            None => Box::pin(bounded(timeout, self.http.call(dst))),
            Some(proxy) => {
                let shown = without_path(proxy.uri());
                let mut tunnel = Tunnel::new(proxy.uri().clone(), self.http.clone());
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                // hyper-util's tunnel assumes port 443 when the URI has none.
                let tunnelling = bounded(timeout, tunnel.call(with_port(dst)));
                Box::pin(async move { tunnelling.await.map_err(|source| ProxyError { proxy: shown, source }.into()) })
            }
        }
    }
}

/// `connecting`, or [`ConnectTimeout`] once `timeout` has passed.
async fn bounded<T, E: Into<BoxError>>(
    timeout: Duration,
    connecting: impl Future<Output = Result<T, E>>,
) -> Result<T, BoxError> {
    match tokio::time::timeout(timeout, connecting).await {
        Ok(done) => done.map_err(Into::into),
        Err(_) => Err(ConnectTimeout(timeout).into()),
    }
}

/// A proxy URL that passed [`checked`].
struct Checked {
    /// As the `url` crate writes it (scheme lower case, `http://` added): what hyper-util is
    /// given, since it takes any value it cannot parse for "no proxy" without a word.
    normalized: String,
    /// Without credentials, for `check` and the logs.
    shown: String,
}

/// `url` checked as an HTTP proxy URL (curl's rules: no scheme means `http://`).
fn checked(url: &str, source_name: &str) -> Result<Checked, EgressError> {
    let url = url.trim();
    let full = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    let invalid = |reason: &str, shown: String| EgressError::Invalid {
        source_name: source_name.to_string(),
        shown,
        reason: reason.to_string(),
    };
    let parsed = url::Url::parse(&full).map_err(|e| invalid(&e.to_string(), "the value".into()))?;
    let shown = redacted(&parsed);
    if parsed.scheme() != "http" {
        return Err(EgressError::Scheme {
            source_name: source_name.to_string(),
            shown,
            scheme: parsed.scheme().to_string(),
        });
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host", shown));
    }
    if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("a proxy URL has no path, query or fragment", shown));
    }
    let normalized = parsed.to_string();
    // hyper-util parses it as an `http::Uri`; what that refuses would silently mean "no proxy".
    normalized.parse::<Uri>().map_err(|e| invalid(&e.to_string(), shown.clone()))?;
    Ok(Checked { normalized, shown })
}

/// `scheme://[user:***@]host:port`: what may be logged of a proxy URL.
fn redacted(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().map(|p| format!(":{p}")).unwrap_or_default();
    let user = match (url.username(), url.password()) {
        ("", None) => String::new(),
        (user, None) => format!("{user}@"),
        (user, Some(_)) => format!("{user}:***@"),
    };
    format!("{}://{user}{host}{port}", url.scheme())
}

fn without_path(uri: &Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let authority = uri.authority().map_or("", |a| a.as_str());
    format!("{scheme}://{authority}")
}

/// `dst` with its scheme's default port written out.
fn with_port(dst: Uri) -> Uri {
    if dst.port().is_some() {
        return dst;
    }
    let port = if dst.scheme_str() == Some("http") { 80 } else { 443 };
    let Some(host) = dst.host() else { return dst };
    let authority = format!("{host}:{port}");
    let mut parts = dst.clone().into_parts();
    match authority.parse() {
        Ok(a) => {
            parts.authority = Some(a);
            Uri::from_parts(parts).unwrap_or(dst)
        }
        Err(_) => dst,
    }
}

/// Whether `host` (a URL's host, IPv6 in brackets or not) is this machine: a loopback address,
/// `localhost` or a name under it.
pub fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost") || bare.to_ascii_lowercase().ends_with(".localhost"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    fn route(e: &Egress, dst: &str) -> Option<String> {
        e.route(&dst.parse().unwrap()).map(|p| p.uri().to_string())
    }

    #[test]
    fn the_environment_is_read_as_curl_reads_it_with_loopback_direct() {
        let e = Egress::from_env(env(&[
            ("https_proxy", "proxy.corp:3128"),
            ("HTTP_PROXY", "http://plain.corp:8080"),
            ("NO_PROXY", "internal.corp, 10.0.0.0/8"),
        ]))
        .unwrap();
        assert_eq!(route(&e, "https://api.aurinko.io/v1").as_deref(), Some("http://proxy.corp:3128/"));
        assert_eq!(route(&e, "http://api.aurinko.io/").as_deref(), Some("http://plain.corp:8080/"));
        assert_eq!(route(&e, "https://broker.internal.corp/"), None);
        assert_eq!(route(&e, "https://10.1.2.3:8443/"), None);
        assert_eq!(route(&e, "https://127.0.0.1:8443/"), None);
        assert_eq!(route(&e, "https://[::1]:8443/"), None);
        assert_eq!(route(&e, "https://localhost:8443/"), None);
        assert_eq!(
            e.summary(),
            "https_proxy=http://proxy.corp:3128 HTTP_PROXY=http://plain.corp:8080 NO_PROXY=internal.corp, \
             10.0.0.0/8 (from the environment; loopback direct)"
        );
        let none = Egress::from_env(env(&[("NO_PROXY", "x"), ("HTTPS_PROXY", " ")])).unwrap();
        assert_eq!((none.summary(), route(&none, "https://api.aurinko.io/")), ("direct", None));
    }

    #[test]
    fn an_explicit_proxy_takes_loopback_too_and_never_shows_its_password() {
        let e = Egress::proxy("http://relay:s3cret@127.0.0.1:3128", "").unwrap();
        assert_eq!(route(&e, "http://127.0.0.1:18080/").as_deref(), Some("http://127.0.0.1:3128/"));
        assert_eq!(e.summary(), "http://relay:***@127.0.0.1:3128");
        let d = e.describe(&"https://api.aurinko.io/".parse().unwrap());
        assert_eq!(d, "through the proxy http://127.0.0.1:3128");
        let e = Egress::proxy(" http://127.0.0.1:3128\n", "").unwrap();
        assert_eq!(route(&e, "https://api.aurinko.io/").as_deref(), Some("http://127.0.0.1:3128/"), "trimmed");
        let e = Egress::from_env(env(&[("HTTPS_PROXY", "http://proxy.corp:3128 ")])).unwrap();
        assert_eq!(route(&e, "https://api.aurinko.io/").as_deref(), Some("http://proxy.corp:3128/"), "trimmed");
        let e = Egress::proxy("HTTP://Proxy.Corp:3128", "").unwrap();
        assert_eq!(route(&e, "https://api.aurinko.io/").as_deref(), Some("http://proxy.corp:3128/"), "normalized");
        let e = Egress::proxy("http://127.0.0.1:3128", "127.0.0.1").unwrap();
        assert_eq!(route(&e, "http://127.0.0.1:18080/"), None);
        assert_eq!(e.summary(), "http://127.0.0.1:3128, except 127.0.0.1");
    }

    #[test]
    fn unusable_proxies_are_named_without_their_credentials() {
        let err = Egress::proxy("socks5://u:pw@proxy:1080", "").unwrap_err().to_string();
        assert_eq!(
            err,
            "[outbound] proxy: socks5://u:***@proxy:1080 is a socks5:// proxy; the relay speaks to HTTP proxies \
             only (http://host:port, tunnelling with CONNECT)"
        );
        let err = Egress::from_env(env(&[("HTTPS_PROXY", "https://u:pw@proxy:443")])).unwrap_err().to_string();
        assert!(err.starts_with("HTTPS_PROXY: https://u:***@proxy:443 is a https:// proxy"), "{err}");
        let err = Egress::proxy("http://proxy:3128/path", "").unwrap_err().to_string();
        assert_eq!(
            err,
            "[outbound] proxy: http://proxy:3128 is not a proxy URL (a proxy URL has no path, query or fragment)"
        );
        assert!(!Egress::proxy("http://:pw@:3128", "").unwrap_err().to_string().contains("pw"));
    }

    #[test]
    fn a_tunnel_names_the_port_the_scheme_implies() {
        assert_eq!(with_port("http://a.example/x".parse().unwrap()).to_string(), "http://a.example:80/x");
        assert_eq!(with_port("https://a.example".parse().unwrap()).to_string(), "https://a.example:443/");
        assert_eq!(with_port("https://[::1]:8443/".parse().unwrap()).to_string(), "https://[::1]:8443/");
    }
}
