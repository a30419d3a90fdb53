//! Which route a request takes: the site its Host (and SNI) names, then the route its path and
//! method pick, and whether the answer is ready now or needs a trip.

use std::net::IpAddr;

use http::{Method, Request, Response, StatusCode, header};
use http_body::Body;

use super::{ConnInfo, Relay, SiteRoutes, UpstreamBase, redirect};
use crate::config::Mode;
use crate::health;
use crate::response::{RelayBody, RouteName, method_not_allowed, method_not_allowed_value, plain};

impl Relay {
    /// Picks the route and answers, or says which trip gets the answer.
    pub(super) fn route<B: Body>(&self, req: Request<B>, conn: &ConnInfo) -> (RouteName, Answer<B>) {
        if let Some((route, r)) = health::answer(req.uri().path(), req.method(), &self.health) {
            return (route, now(req, r));
        }
        if !conn.https {
            if let Some(token) = req.uri().path().strip_prefix("/.well-known/acme-challenge/") {
                return (RouteName::AcmeChallenge, Answer::Later(Trip::AcmeHttp01(token.to_string())));
            }
        }
        let host = match request_host(&req) {
            Ok(host) => host,
            Err(why) => return (RouteName::None, now(req, plain(StatusCode::BAD_REQUEST, why))),
        };
        let Some((site_ix, by_name)) = self.site_for_host(&host, conn) else {
            return (RouteName::None, now(req, misdirected()));
        };
        if !conn.https {
            // Only configured names are redirect targets, never an arbitrary Host or IP.
            if !by_name {
                return (RouteName::None, now(req, misdirected()));
            }
            let to = redirect::to_https(&req, &host, self.config.server.public_https_port);
            return (RouteName::HttpsRedirect, now(req, to));
        }
        if req.uri().query().is_some_and(|q| q.len() > self.config.limits.max_query_bytes) {
            return (RouteName::None, now(req, plain(StatusCode::URI_TOO_LONG, "query string too long\n")));
        }
        let (route, action) = decide(&req, &self.sites[site_ix]);
        let answer = match action {
            Action::Respond(r) => now(req, r),
            Action::Forward(to) => Answer::Later(Trip::Forward { req, site: site_ix, to, host }),
        };
        (route, answer)
    }

    /// The site a request's Host names, checked against the SNI site of its connection.
    /// Returns the site and whether it was found by name (rather than as the default for an IP).
    fn site_for_host(&self, host: &str, conn: &ConnInfo) -> Option<(usize, bool)> {
        let by_name = self.sites.iter().position(|s| s.site.hostnames.iter().any(|h| host_matches(h, host)));
        let (site, named) = match by_name {
            Some(i) => (i, true),
            // An IP literal (a load balancer's probe, a benchmark) reaches the default site.
            None if host.parse::<IpAddr>().is_ok() || host.starts_with('[') => (self.default_site?, false),
            None => return None,
        };
        match conn.sni_site {
            Some(sni) if sni != site => None,
            _ => Some((site, named)),
        }
    }
}

/// A route's answer: ready now, or at the end of a trip.
pub(super) enum Answer<B> {
    Now(Response<RelayBody>),
    Later(Trip<B>),
}

/// An answer that does not need the request: ready now, unless the request's body is still
/// arriving, which is then read first (a `Discard` trip).
fn now<B: Body>(req: Request<B>, resp: Response<RelayBody>) -> Answer<B> {
    let body = req.into_body();
    if body.is_end_stream() { Answer::Now(resp) } else { Answer::Later(Trip::Discard { rest: body, resp }) }
}

/// Where a request goes for its answer.
// Moved once, into the trip's box: boxing the request as well would cost every forwarded
// request an allocation for the sake of the rare challenge.
#[allow(clippy::large_enum_variant)]
pub(super) enum Trip<B> {
    /// To site `site`'s upstream `to`, with the request's Host.
    Forward { req: Request<B>, site: usize, to: Upstream, host: String },
    /// To the challenge store, for an HTTP-01 token.
    AcmeHttp01(String),
    /// Nowhere: the answer `resp` is known, but the rest of the request's body is read first.
    Discard { rest: B, resp: Response<RelayBody> },
}

/// Which of a site's upstreams a forwarded request goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Upstream {
    Callback,
    Authorize,
    Token,
}

impl SiteRoutes {
    pub(super) fn base(&self, to: Upstream) -> &UpstreamBase {
        match to {
            Upstream::Callback => &self.callback_base,
            Upstream::Authorize => &self.authorize_base,
            Upstream::Token => &self.token_base,
        }
    }
}

/// `421` for a Host this relay does not serve (or, on plain HTTP, serves only as a default).
fn misdirected() -> Response<RelayBody> {
    plain(StatusCode::MISDIRECTED_REQUEST, "this relay does not serve that host\n")
}

/// What a request on a site's HTTPS listener gets: an answer now, or a trip upstream.
enum Action {
    Respond(Response<RelayBody>),
    Forward(Upstream),
}

/// Picks the route and what to do, from the path and method alone.
fn decide<B>(req: &Request<B>, routes: &SiteRoutes) -> (RouteName, Action) {
    let site = &routes.site;
    let (path, method) = (req.uri().path(), req.method());
    let get = method == Method::GET || method == Method::HEAD;
    if path == site.callback.path {
        let cb = &site.callback;
        let post = method == Method::POST && cb.form_post;
        let action = match cb.mode {
            Mode::Redirect if get => Action::Respond(redirect::callback_get(req, routes)),
            Mode::Redirect if post => Action::Respond(redirect::callback_form_post(req, routes)),
            Mode::Proxy if get => Action::Forward(Upstream::Callback),
            Mode::Proxy if post && redirect::is_form(req) => Action::Forward(Upstream::Callback),
            Mode::Proxy if post => Action::Respond(redirect::not_a_form()),
            _ => Action::Respond(method_not_allowed(routes.callback_allow)),
        };
        return (RouteName::Callback, action);
    }
    if let Some(ix) = site.authorize.paths.iter().position(|p| p == path) {
        let az = &site.authorize;
        let action = match az.mode {
            Mode::Redirect if get => {
                Action::Respond(redirect::to_upstream(&routes.authorize_targets[ix], req.uri().query(), az.status))
            }
            Mode::Proxy if get => Action::Forward(Upstream::Authorize),
            _ => Action::Respond(method_not_allowed("GET, HEAD")),
        };
        return (RouteName::Authorize, action);
    }
    if let Some(code) = path.strip_prefix(site.token.path_prefix.as_str()) {
        if !code.is_empty() && !code.contains('/') {
            let action = if site.token.methods.contains(method) {
                Action::Forward(Upstream::Token)
            } else {
                Action::Respond(method_not_allowed_value(routes.token_allow.clone()))
            };
            return (RouteName::Token, action);
        }
    }
    (RouteName::None, Action::Respond(plain(StatusCode::NOT_FOUND, "not found\n")))
}

/// The request's host without port, lower-cased: the URI authority (HTTP/2, or an HTTP/1.1
/// absolute-form target, whose `Host` RFC 9112 section 3.2.2 says to ignore) or `Host`; else
/// the body of the `400` that says why there is none.
///
/// An HTTP/2 authority is already parsed by hyper. A `Host` header is only split from its port
/// here, not parsed further: the result is never used except to compare with configured
/// hostnames or to parse as an IP address, so a malformed value simply matches nothing (421).
/// Refused whatever they say, as a proxy in front may have routed by the other value: two
/// `Host` lines (RFC 9112 section 3.2; nginx answers 400 too), and an HTTP/2 `Host` that names
/// another host than `:authority` (RFC 9113 section 8.3.1).
fn request_host<B>(req: &Request<B>) -> Result<String, &'static str> {
    const MISSING: &str = "missing or invalid Host header\n";
    let mut lines = req.headers().get_all(header::HOST).iter();
    let line = lines.next();
    if lines.next().is_some() {
        return Err("more than one Host header\n");
    }
    let host = match req.uri().authority() {
        Some(a) => {
            if let Some(v) = line.filter(|_| req.version() == http::Version::HTTP_2) {
                let named = v.to_str().map(without_port).map_err(|_| MISSING)?;
                if !named.trim_end_matches('.').eq_ignore_ascii_case(a.host().trim_end_matches('.')) {
                    return Err("Host names another host than :authority\n");
                }
            }
            a.host()
        }
        None => without_port(line.and_then(|v| v.to_str().ok()).ok_or(MISSING)?),
    };
    let host = host.trim_end_matches('.');
    if host.is_empty() { Err(MISSING) } else { Ok(host.to_ascii_lowercase()) }
}

/// A `Host` value without its `:port` (an IPv6 literal keeps its brackets).
fn without_port(raw: &str) -> &str {
    match raw.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    }
}

/// Whether a configured hostname (maybe `*.example.com`) matches a request host.
fn host_matches(configured: &str, host: &str) -> bool {
    match configured.strip_prefix("*.") {
        Some(parent) => host.split_once('.').is_some_and(|(_, rest)| rest == parent),
        None => configured == host,
    }
}
