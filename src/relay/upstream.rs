//! The client toward the upstream broker: hyper-util's pooled client over hyper-rustls (web PKI
//! roots plus an optional extra CA), HTTP/2 when the upstream offers it, keep-alive, a connect
//! timeout, and an outbound proxy where one is configured. One per site, since sites may trust
//! different CAs.

use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Site;
use crate::egress::{Egress, EgressConnector, TrustError, upstream_tls};

/// Why an upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("{url}: an upstream URL needs a host")]
    Base { url: String },
}

/// An upstream base URL (`upstream` of a route) taken apart once, so a forwarded request's URI
/// is put together from parts instead of formatted and parsed again on every request.
#[derive(Debug)]
pub struct UpstreamBase {
    /// `scheme://host[:port]`, what upstream `Location`s are recognised by.
    pub origin: String,
    scheme: Scheme,
    authority: Authority,
    /// The base's path without its trailing `/` (usually empty).
    prefix: String,
}

impl UpstreamBase {
    /// Takes `url` apart; `None` if it has no host (config validation refuses those, and
    /// credentials, queries and fragments in it).
    pub fn new(url: &url::Url) -> Option<UpstreamBase> {
        let scheme = Scheme::try_from(url.scheme()).ok()?;
        let host = url.host_str()?;
        let authority = match url.port() {
            Some(port) => Authority::try_from(format!("{host}:{port}")).ok()?,
            None => Authority::try_from(host).ok()?,
        };
        let prefix = url.path().trim_end_matches('/').to_string();
        Some(UpstreamBase { origin: url.origin().ascii_serialization(), scheme, authority, prefix })
    }

    /// The upstream URI for a request's path and query: the base's path, then the request's
    /// bytes as received.
    pub fn uri(&self, pq: Option<PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = pq.unwrap_or_else(|| PathAndQuery::from_static("/"));
        let pq = if self.prefix.is_empty() { pq } else { PathAndQuery::try_from(format!("{}{pq}", self.prefix))? };
        Uri::builder().scheme(self.scheme.clone()).authority(self.authority.clone()).path_and_query(pq).build()
    }
}

/// A pooled HTTP(S) client for one site's upstream.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    pub(super) inner: Client<HttpsConnector<EgressConnector>, Full<Bytes>>,
    pub(super) response_timeout: Duration,
}

impl UpstreamClient {
    /// Builds the client for `site`: its CA file, connect and response timeouts, reached as
    /// `egress` says (directly or through a proxy).
    pub fn new(site: &Site, egress: &Egress) -> Result<UpstreamClient, UpstreamError> {
        let tls = upstream_tls(site.upstream_ca_file.as_deref(), &[])?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(site.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(egress.connector(http, site.connect_timeout));
        let inner = Client::builder(TokioExecutor::new())
            // A request's head and its (small, already gathered) body in one buffer: one
            // send(2) instead of a writev(2), whose file layer and vector copy-in cost more
            // than copying a token request's few hundred bytes.
            .http1_writev(false)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(50))
            .build(connector);
        Ok(UpstreamClient { inner, response_timeout: site.response_timeout })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(base: &str, pq: &str) -> String {
        let base = UpstreamBase::new(&url::Url::parse(base).unwrap()).unwrap();
        base.uri(Some(PathAndQuery::try_from(pq).unwrap())).unwrap().to_string()
    }

    #[test]
    fn the_request_bytes_follow_the_base_path() {
        assert_eq!(
            uri("https://api.aurinko.io", "/v1/auth/token/c%2Bd?x=a+b"),
            "https://api.aurinko.io/v1/auth/token/c%2Bd?x=a+b"
        );
        assert_eq!(
            uri("http://127.0.0.1:8080/broker/", "/v1/auth/token/c"),
            "http://127.0.0.1:8080/broker/v1/auth/token/c"
        );
        assert_eq!(uri("http://[::1]:8080/b", "/t?q"), "http://[::1]:8080/b/t?q");
        let base = UpstreamBase::new(&url::Url::parse("https://h:8443/").unwrap()).unwrap();
        assert_eq!(base.origin, "https://h:8443");
    }
}
