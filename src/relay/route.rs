//! Which route a request takes: the site its Host (and SNI) names, then the route its path and
//! method pick, and whether the answer is ready now or needs a trip.

use std::net::IpAddr;

use http::{Method, Request, Response, StatusCode, header};
use http_body::Body;

use super::{ConnInfo, Relay, SiteRoutes, UpstreamBase, path, redirect};
use crate::config::Mode;
use crate::health;
use crate::response::{RelayBody, RouteName, method_not_allowed, method_not_allowed_value, plain, uncached_text};

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
        // Refused on both listeners, so no path the relay would refuse is redirected to it.
        let path = match path::normalise(req.uri().path()) {
            Ok(path) => path,
            Err(bad) => return (RouteName::None, now(req, plain(StatusCode::BAD_REQUEST, bad.body()))),
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
        let (route, action) = decide(&req, &path, &self.sites[site_ix]);
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

/// Where Microsoft Entra reads which app registrations may name a domain as their publisher
/// domain ("Verify a new domain" under the app's Branding).
const IDENTITY_ASSOCIATION: &str = "/.well-known/microsoft-identity-association.json";

/// The document Entra expects at [`IDENTITY_ASSOCIATION`] for `ids`, `None` when there are
/// none: `{"associatedApplications":[{"applicationId":"..."},...]}`.
pub(super) fn identity_association(ids: &[String]) -> Option<String> {
    if ids.is_empty() {
        return None;
    }
    let apps: Vec<_> = ids.iter().map(|id| serde_json::json!({ "applicationId": id })).collect();
    Some(serde_json::json!({ "associatedApplications": apps }).to_string())
}

/// Picks the route and what to do, from the normalised `path` and the method alone.
fn decide<B>(req: &Request<B>, path: &str, routes: &SiteRoutes) -> (RouteName, Action) {
    let site = &routes.site;
    let method = req.method();
    let get = method == Method::GET || method == Method::HEAD;
    if let Some(body) = routes.association.as_ref().filter(|_| path == IDENTITY_ASSOCIATION) {
        let answer = if get {
            // `application/json` exactly: Entra refuses other content types.
            uncached_text(StatusCode::OK, "application/json", body.clone())
        } else {
            method_not_allowed("GET, HEAD")
        };
        return (RouteName::DomainVerification, Action::Respond(answer));
    }
    if path == routes.callback_path {
        let cb = &site.callback;
        let post = method == Method::POST && cb.form_post;
        let action = match cb.mode {
            Mode::Redirect if get => Action::Respond(redirect::callback_get(req, routes)),
            Mode::Redirect if post => Action::Respond(redirect::callback_form_post(req, routes)),
            Mode::Proxy if get && redirect::wants_fragment_page(req, routes) => {
                Action::Respond(redirect::fragment_page_to_relay(routes))
            }
            Mode::Proxy if get => Action::Forward(Upstream::Callback),
            Mode::Proxy if post && redirect::is_form(req) => Action::Forward(Upstream::Callback),
            Mode::Proxy if post => Action::Respond(redirect::not_a_form()),
            _ => Action::Respond(method_not_allowed(routes.callback_allow)),
        };
        return (RouteName::Callback, action);
    }
    if let Some(ix) = routes.authorize_paths.iter().position(|p| p == path) {
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
    if let Some(code) = path.strip_prefix(routes.token_prefix.as_str()) {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body_util::Empty;
    use proptest::prelude::*;

    use super::*;
    use crate::acme::Challenges;
    use crate::config::Config;
    use crate::tls::CertStore;

    const HOST: &str = "auth.example.test";

    /// A relay for one site with the default routes, built as `app` builds it, without sockets.
    fn relay(extra: &str) -> Arc<Relay> {
        let toml = format!(
            "[server]\nhttps = [\"127.0.0.1:0\"]\nhttp = [\"127.0.0.1:0\"]\n\n[[site]]\nname = \"auth\"\n\
             hostnames = [\"{HOST}\"]\nupstream = \"https://api.aurinko.io\"\n[site.tls]\nsource = \"self-signed\"\n{extra}"
        );
        let config = Arc::new(Config::parse("t.toml", &toml).expect("valid config"));
        let challenges = Arc::new(Challenges::new(&config.server.storage));
        let store = Arc::new(CertStore::new(&config, challenges.clone()));
        let health = Arc::new(crate::health::Health::new(&config, store, None));
        Arc::new(Relay::new(config, challenges, health).expect("relay"))
    }

    /// What a request gets: the status and body of an answer now, or where it is forwarded
    /// (status 0) with the path and query it goes with.
    fn outcome(relay: &Relay, method: &str, target: &str, https: bool) -> (u16, String) {
        let req = Request::builder().method(method).uri(target).header(header::HOST, HOST);
        let req = req.body(Empty::<Bytes>::new()).expect("a valid request");
        let conn = ConnInfo::new("127.0.0.1:40000".parse().unwrap(), https, None);
        match relay.route(req, &conn).1 {
            Answer::Now(resp) => {
                let status = resp.status().as_u16();
                let body = match resp.headers().get(header::LOCATION) {
                    Some(location) => String::from_utf8(location.as_bytes().to_vec()).expect("UTF-8 in, UTF-8 out"),
                    None => body_text(resp),
                };
                (status, body)
            }
            Answer::Later(Trip::Forward { req, .. }) => (0, req.uri().path_and_query().unwrap().to_string()),
            Answer::Later(_) => panic!("{method} {target}: neither an answer nor forwarded"),
        }
    }

    fn body_text(resp: Response<RelayBody>) -> String {
        use http_body_util::BodyExt;
        let collected = futures_util::FutureExt::now_or_never(resp.into_body().collect()).expect("a ready body");
        String::from_utf8(collected.expect("body").to_bytes().to_vec()).expect("text")
    }

    fn answer(status: u16, body: &str) -> (u16, String) {
        (status, body.to_string())
    }

    #[test]
    fn paths_with_dot_segments_or_encoded_slashes_are_refused_before_routing() {
        let relay = relay("[site.token]\nmethods = [\"POST\", \"GET\"]\n");
        let encoded_slash = answer(400, "encoded / or \\ in the path\n");
        let dot = answer(400, "dot-segment in the path\n");
        for (target, expected) in [
            ("/v1/auth/token/..%2f..%2fadmin", &encoded_slash),
            ("/v1/auth/token/..%2F..%2Fadmin", &encoded_slash),
            ("/v1/auth/token/abc%5Cx", &encoded_slash),
            ("/v1/auth/token/..", &dot),
            ("/v1/auth/token/%2e%2E", &dot),
            ("/v1/auth/token/..;x=1", &dot),
            ("/v1/auth/./callback?code=c", &dot),
            ("/..", &dot),
            ("/%2e%2e", &dot),
        ] {
            assert_eq!(&outcome(&relay, "POST", target, true), expected, "{target}");
            assert_eq!(&outcome(&relay, "GET", target, false), expected, "{target} on plain HTTP");
        }
    }

    #[test]
    fn routes_match_the_normalised_path_and_forward_the_bytes_received() {
        let relay = relay("[site.authorize]\nmode = \"proxy\"\n");
        let not_found = answer(404, "not found\n");
        let cases = [
            ("POST", "/v1/auth/token/c%2bd%7E?x=%2F..", answer(0, "/v1/auth/token/c%2bd%7E?x=%2F..")),
            ("POST", "/v1/auth/%74oken/abc", answer(0, "/v1/auth/%74oken/abc")),
            (
                "GET",
                "/v1/auth/authorize?returnUrl=https%3A%2F%2Fa%2F..%2Fb",
                answer(0, "/v1/auth/authorize?returnUrl=https%3A%2F%2Fa%2F..%2Fb"),
            ),
            (
                "GET",
                "/v1/auth/c%61llback?code=a%2Fb&state=..",
                answer(302, "https://api.aurinko.io/v1/auth/callback?code=a%2Fb&state=.."),
            ),
            ("POST", "/v1/auth/token/...", answer(0, "/v1/auth/token/...")),
            // Not folded: doubled and trailing slashes, case.
            ("POST", "//v1/auth/token/x", not_found.clone()),
            ("POST", "/v1/auth//token/x", not_found.clone()),
            ("POST", "/v1/auth/token//x", not_found.clone()),
            ("POST", "/v1/auth/token/x/", not_found.clone()),
            ("GET", "/v1/auth/callback/?code=c", not_found.clone()),
            ("GET", "/V1/auth/callback?code=c", not_found.clone()),
            ("GET", "/v1/auth/authorize/", not_found),
        ];
        for (method, target, expected) in cases {
            assert_eq!(outcome(&relay, method, target, true), expected, "{method} {target}");
        }
    }

    /// Request targets as `http::Uri` accepts them: path pieces the rules are about, then maybe
    /// a query of any bytes a query may hold.
    fn target() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => Just("/"),
            2 => Just("."),
            1 => Just(".."),
            1 => Just(";"),
            1 => Just("%2e"),
            1 => Just("%2F"),
            1 => Just("%5c"),
            1 => Just("%61"),
            1 => Just("%"),
            1 => Just("\\"),
            1 => Just("\u{e9}"),
            3 => Just("v1/auth/token/"),
            2 => Just("v1/auth/callback"),
            2 => Just("v1/auth/authorize"),
            3 => Just("abc"),
        ];
        let path = proptest::collection::vec(piece, 0..10).prop_map(|p| format!("/{}", p.concat()));
        // Every byte `http::Uri` takes in a query: visible ASCII but `"`, `#`, `<` and `>`.
        let query = proptest::option::of("[!$-;=?-~]{0,24}");
        (path, query).prop_map(|(path, query)| match query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        })
    }

    proptest! {
        #[test]
        fn what_goes_upstream_is_the_target_as_received_and_never_a_refused_path(
            target in target(),
            method in prop_oneof![Just("GET"), Just("POST")],
        ) {
            let relay = relay_for_props();
            let uri: http::Uri = target.parse().expect("the strategy makes valid targets");
            let (status, what) = outcome(relay, method, &target, true);
            let refused = path::normalise(uri.path()).is_err();
            prop_assert_eq!(refused, status == 400, "{} {} -> {} {}", method, target, status, what);
            if status == 0 {
                prop_assert_eq!(&what, &target);
            }
        }
    }

    proptest! {
        #[test]
        fn redirects_carry_the_query_byte_for_byte(
            query in super::super::redirect::tests::QUERY,
            path in prop_oneof![Just("/v1/auth/callback"), Just("/v1/auth/authorizeUser")],
        ) {
            static REDIRECTING: std::sync::OnceLock<Arc<Relay>> = std::sync::OnceLock::new();
            let relay = REDIRECTING.get_or_init(|| relay(""));
            let target = format!("{path}?{query}");
            let (status, location) = outcome(relay, "GET", &target, true);
            if query.is_empty() && path == "/v1/auth/callback" {
                // No query: the fragment page.
                prop_assert_eq!(status, 200);
            } else {
                prop_assert_eq!((status, location), (302, format!("https://api.aurinko.io{target}")));
            }
            let (status, location) = outcome(relay, "GET", &target, false);
            prop_assert_eq!(status, 308);
            prop_assert!(location.starts_with("https://auth.example.test") && location.ends_with(&target), "{}", location);
        }
    }

    /// One relay for every case: building one costs a TLS client configuration.
    fn relay_for_props() -> &'static Relay {
        static RELAY: std::sync::OnceLock<Arc<Relay>> = std::sync::OnceLock::new();
        RELAY.get_or_init(|| relay("[site.authorize]\nmode = \"proxy\"\n[site.callback]\nmode = \"proxy\"\n"))
    }
}
