//! The routes: callback relay, authorize fronting, token proxy, health, and the plain-HTTP
//! redirect. [`Relay::handle`] turns a request into a [`Reply`] (a response, or the trip that
//! brings one), so tests can call it without sockets; `server` feeds it from real connections.
//!
//! `route` picks the site and the route, on the path as `path` normalises it (or refuses it);
//! `redirect` builds the redirects; `proxy` forwards through `upstream`'s client, with the
//! headers `forwarded` writes about the client and those `rewrite` rewrites on the way.

mod connect;
mod forwarded;
mod path;
mod pool;
mod proxy;
mod redirect;
mod rewrite;
mod route;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode, header};

pub use upstream::{UpstreamBase, UpstreamClient, UpstreamError};

use crate::acme::Challenges;
use crate::config::{Config, Site};
use crate::flow::{FlowId, Flows};
use crate::health::Health;
use crate::metrics::UpstreamErrorKind;
use crate::response::{BodyEnd, OnEnd, RelayBody, Reply, RouteName, plain};
use route::{Answer, Trip, Upstream};

/// Where a request came from; filled in by the server for every connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// The client's IP as `X-Forwarded-For` text: formatted once per connection rather than for
    /// every forwarded request (a keep-alive token client sends many). Behind a trusted proxy,
    /// the client it names (see `forwarded`).
    pub client_ip: http::HeaderValue,
    /// Behind a trusted proxy: its `X-Forwarded-For` with the proxy appended, for the upstream.
    /// `None`: the upstream gets `client_ip` alone.
    pub forwarded_for: Option<http::HeaderValue>,
    /// True when the peer is in `server.trusted_proxies`: `client_ip` and `forwarded_for` come
    /// from its `X-Forwarded-For`, and its other forwarding headers go on to the upstream.
    pub trusted_proxy: bool,
    /// True on the HTTPS listeners.
    pub https: bool,
    /// The site chosen by SNI, when the client sent one.
    pub sni_site: Option<usize>,
}

impl ConnInfo {
    pub fn new(remote: SocketAddr, https: bool, sni_site: Option<usize>) -> ConnInfo {
        let client_ip = http::HeaderValue::try_from(remote.ip().to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        ConnInfo { remote, client_ip, forwarded_for: None, trusted_proxy: false, https, sni_site }
    }
}

/// What the access log needs to know about how a request went upstream.
#[derive(Debug, Default, Clone, Copy)]
pub struct UpstreamOutcome {
    pub status: Option<StatusCode>,
    pub latency_ms: Option<f64>,
}

/// A site compiled for request time: precomputed redirect targets and an upstream client.
struct SiteRoutes {
    site: Site,
    /// The route paths, normalised as request paths are before they are compared (`path`).
    callback_path: String,
    authorize_paths: Vec<String>,
    token_prefix: String,
    /// `{callback upstream}{callback path}`, the redirect target without query.
    callback_target: String,
    /// One target per authorize path, in the same order as `site.authorize.paths`.
    authorize_targets: Vec<String>,
    client: UpstreamClient,
    /// The upstreams of the callback, authorize and token routes, ready for forwarding.
    callback_base: UpstreamBase,
    authorize_base: UpstreamBase,
    token_base: UpstreamBase,
    /// The browser routes in `proxy` mode: where an upstream `Location` may be rewritten to.
    proxied: Vec<rewrite::ProxiedRoute>,
    /// The body of `/.well-known/microsoft-identity-association.json`, when the site lists
    /// `application_ids`.
    association: Option<String>,
    /// The `Allow` value of the callback route.
    callback_allow: &'static str,
    token_allow: http::HeaderValue,
}

/// The request router and its shared state.
pub struct Relay {
    sites: Vec<SiteRoutes>,
    default_site: Option<usize>,
    config: Arc<Config>,
    /// Pending ACME challenge answers, for HTTP-01 validations on the plain-HTTP listener.
    challenges: Arc<Challenges>,
    /// Flow ids for the access log (`None` when it is off).
    flows: Option<Arc<Flows>>,
    /// What `/healthz` and `/readyz` report on the public listeners.
    health: Arc<Health>,
}

impl Relay {
    /// Compiles the routes of every site; fails when an upstream CA file cannot be read.
    pub fn new(config: Arc<Config>, challenges: Arc<Challenges>, health: Arc<Health>) -> Result<Relay, UpstreamError> {
        let mut sites = Vec::new();
        for site in &config.sites {
            let target = |base: &url::Url, path: &str| format!("{}{path}", base.as_str().trim_end_matches('/'));
            let base =
                |url: &url::Url| UpstreamBase::new(url).ok_or_else(|| UpstreamError::Base { url: url.to_string() });
            let token_allow = site.token.methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
            let (callback_base, authorize_base) = (base(&site.callback.upstream)?, base(&site.authorize.upstream)?);
            sites.push(SiteRoutes {
                callback_path: path::normalised_route(&site.callback.path),
                authorize_paths: site.authorize.paths.iter().map(|p| path::normalised_route(p)).collect(),
                token_prefix: path::normalised_route(&site.token.path_prefix),
                callback_target: target(&site.callback.upstream, &site.callback.path),
                authorize_targets: site.authorize.paths.iter().map(|p| target(&site.authorize.upstream, p)).collect(),
                client: UpstreamClient::new(site, &config.outbound, &config.limits)?,
                proxied: rewrite::ProxiedRoute::of_site(site, &callback_base, &authorize_base),
                callback_base,
                authorize_base,
                token_base: base(&site.token.upstream)?,
                association: route::identity_association(&site.application_ids),
                callback_allow: if site.callback.form_post { "GET, HEAD, POST" } else { "GET, HEAD" },
                token_allow: http::HeaderValue::from_str(&token_allow).expect("method names are valid header text"),
                site: site.clone(),
            });
        }
        let default_site = config.sites.iter().position(|s| s.default);
        let flows = if config.log.access { Flows::for_key(config.log.flow_key.as_ref()) } else { None };
        Ok(Relay { sites, default_site, config, challenges, flows, health })
    }

    /// The configuration this relay serves.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Answers one request. Never fails: every problem becomes a short, specific response.
    ///
    /// Routing runs here, not in the returned future, so a redirect is answered (and the request
    /// dropped) before hyper reads on: nothing then holds the bytes of the request head, and
    /// hyper reuses its read buffer instead of allocating a fresh one per request.
    pub fn handle<B>(self: &Arc<Self>, req: Request<B>, conn: &ConnInfo) -> Reply
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // Behind a trusted HTTP proxy, the client it names in `X-Forwarded-For`.
        let behind = conn.behind_proxy(req.headers(), &self.config.server.trusted_proxies);
        let conn = behind.as_ref().unwrap_or(conn);
        let received = Received {
            at: Instant::now(),
            method: req.method().clone(),
            // Only with `[log] redact = false` (local debugging): the path and query as received.
            raw_uri: (!self.config.log.redact).then(|| req.uri().to_string()),
            // The flow id is read from the query (or the token's path) once the route is known.
            flow_uri: self.flows.is_some().then(|| req.uri().clone()),
        };
        match self.route(req, conn) {
            (route, Answer::Now(resp)) => {
                Reply::ready(self.finish(received, route, resp, UpstreamOutcome::default(), conn))
            }
            (route, Answer::Later(trip)) => {
                let (relay, conn) = (self.clone(), conn.clone());
                Reply::Later(Box::pin(async move {
                    let mut upstream = UpstreamOutcome::default();
                    let resp = relay.travel(trip, &conn, &mut upstream).await;
                    relay.finish(received, route, resp, upstream, &conn)
                }))
            }
        }
    }

    /// What every response gets on its way out: the HTTPS headers, its metrics, its access line.
    fn finish(
        &self,
        received: Received,
        route: RouteName,
        mut resp: Response<RelayBody>,
        upstream: UpstreamOutcome,
        conn: &ConnInfo,
    ) -> Response<RelayBody> {
        if conn.https {
            let h = resp.headers_mut();
            h.insert(header::REFERRER_POLICY, http::HeaderValue::from_static("no-referrer"));
            if let Some(hsts) = &self.config.server.hsts {
                h.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
            }
        }
        let metrics = crate::metrics::global();
        metrics.request(route, resp.status(), received.at.elapsed());
        if let Some(ms) = upstream.latency_ms {
            metrics.upstream_latency(route, Duration::try_from_secs_f64(ms / 1000.0).unwrap_or_default());
        }
        let log = self.config.log.access;
        let flow = if log { received.flow_uri.as_ref().and_then(|u| self.flow_id(route, u)) } else { None };
        let status = resp.status();
        if resp.body().is_streamed() {
            // Its access line is written, and a cut-off counted, once the body has ended.
            let client = conn.client_ip.clone();
            let written: OnEnd = Box::new(move |end| {
                body_ended(route, end);
                if log {
                    let (client, raw_uri) = (client.to_str().unwrap_or("?"), received.raw_uri.as_deref());
                    access_log(client, &received.method, route, status, received.at, upstream, raw_uri, flow, end);
                }
            });
            if let Some(complete) = resp.body_mut().on_end(written) {
                complete(BodyEnd::Complete);
            }
        } else if log {
            let (client, raw_uri) = (conn.client_ip.to_str().unwrap_or("?"), received.raw_uri.as_deref());
            access_log(
                client,
                &received.method,
                route,
                status,
                received.at,
                upstream,
                raw_uri,
                flow,
                BodyEnd::Complete,
            );
        }
        resp
    }

    /// Makes a trip: to the upstream, to the challenge store, or through the rest of a body.
    async fn travel<B>(&self, trip: Trip<B>, conn: &ConnInfo, upstream: &mut UpstreamOutcome) -> Response<RelayBody>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match trip {
            Trip::Forward { req, site, to, host } => {
                let routes = &self.sites[site];
                self.forward(req, routes, routes.base(to), host, conn, upstream, to == Upstream::Token).await
            }
            Trip::AcmeHttp01(token) => self.acme_http01(&token).await,
            Trip::Discard { rest, resp } => {
                // A form POST on HTTP/2 often comes as HEADERS, then DATA. Answering before the
                // body is in ends the stream with RST_STREAM(NO_ERROR), which RFC 9113 allows
                // but curl before 8.1 and other clients report as a failed request; so the body
                // is read first, within the body limit and the header-read deadline.
                let limits = &self.config.limits;
                discard(rest, limits.max_body_bytes, limits.header_read_timeout).await;
                resp
            }
        }
    }

    /// The access line's `flow`: authorize and callback by their `state`, the token exchange by
    /// the code a callback carried.
    fn flow_id(&self, route: RouteName, uri: &http::Uri) -> Option<FlowId> {
        let flows = self.flows.as_ref()?;
        match route {
            RouteName::Authorize => flows.authorize(uri.query()),
            RouteName::Callback => flows.callback(uri.query()),
            RouteName::Token => flows.token(uri.path().rsplit('/').next()?),
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward<B>(
        &self,
        req: Request<B>,
        routes: &SiteRoutes,
        base: &UpstreamBase,
        host: String,
        conn: &ConnInfo,
        outcome: &mut UpstreamOutcome,
        token: bool,
    ) -> Response<RelayBody>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let ctx = proxy::Forward {
            client: &routes.client,
            site: &routes.site,
            base,
            host: &host,
            conn,
            limits: &self.config.limits,
            rewrite: (!token).then_some(routes.proxied.as_slice()),
            public_https_port: self.config.server.public_https_port,
        };
        let mut resp = ctx.send(req, outcome).await;
        if token {
            resp.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
        }
        resp
    }
}

/// What is kept of a request for its metrics and access line once it has moved on.
struct Received {
    at: Instant,
    method: Method,
    raw_uri: Option<String>,
    flow_uri: Option<http::Uri>,
}

/// A streamed upstream answer that broke off after its head went out (the client got its
/// status, then a cut connection): counted as an upstream error and logged.
fn body_ended(route: RouteName, end: BodyEnd) {
    let kind = match end {
        BodyEnd::UpstreamCut => UpstreamErrorKind::Request,
        BodyEnd::UpstreamStalled => UpstreamErrorKind::Timeout,
        BodyEnd::Complete | BodyEnd::ClientGone => return,
    };
    crate::metrics::global().upstream_error(kind);
    tracing::warn!(route = route.as_str(), kind = kind.as_str(), "the upstream answer broke off in its body");
}

/// One access-log line. Never carries any header value, nor (unless `raw_uri` is given because
/// the operator set `[log] redact = false`) the path's code or the query. `client` is the
/// client's address (a PROXY protocol header's source behind a load balancer). A streamed answer
/// is logged when its body ends; `aborted` says who broke it off, if anyone did.
#[allow(clippy::too_many_arguments)]
fn access_log(
    client: &str,
    method: &Method,
    route: RouteName,
    status: StatusCode,
    started: Instant,
    up: UpstreamOutcome,
    raw_uri: Option<&str>,
    flow: Option<FlowId>,
    end: BodyEnd,
) {
    let aborted = match end {
        BodyEnd::Complete => None,
        BodyEnd::UpstreamCut | BodyEnd::UpstreamStalled => Some("upstream"),
        BodyEnd::ClientGone => Some("client"),
    };
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(
        target: "access",
        client = %client,
        method = %method,
        route = %route.as_str(),
        status = status.as_u16(),
        latency_ms = format_args!("{latency_ms:.3}"),
        upstream_status = up.status.map(|s| s.as_u16()),
        upstream_ms = up.latency_ms.map(|l| tracing::field::display(format!("{l:.3}"))),
        uri = raw_uri,
        flow = flow.map(tracing::field::display),
        aborted,
    );
}

impl Relay {
    /// HTTP-01: the key authorization for a pending token, as `text/plain`, else 404.
    async fn acme_http01(&self, token: &str) -> Response<RelayBody> {
        match self.challenges.http01(token).await {
            Some(key_authorization) => {
                let mut r = Response::new(RelayBody::full(key_authorization));
                r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
                r
            }
            None => plain(StatusCode::NOT_FOUND, "no such challenge\n"),
        }
    }
}

/// Reads and drops a request body the answer does not need, up to `max` bytes and for at most
/// `within`; what is left after that is not waited for (HTTP/2 then resets the rest of the
/// stream, HTTP/1.1 closes the connection).
async fn discard<B>(body: B, max: u64, within: Duration)
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<crate::response::BodyError>,
{
    use http_body_util::{BodyExt, Limited};
    // `Limited` fails the read past `max` bytes, which ends the loop.
    let mut body = Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX));
    let _ = tokio::time::timeout(within, async { while let Some(Ok(_)) = body.frame().await {} }).await;
}
