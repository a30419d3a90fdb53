//! Headers the relay rewrites on their way through a forwarded route: the request's cookie
//! crumbs become one `Cookie` line; in the answer on a browser route (authorize and callback
//! in `proxy` mode), every cookie's `Domain` points at the relay, and a `Location` points at
//! the relay only when the relay forwards what it names. Everything else in those headers keeps
//! its bytes.
//!
//! The `Location` policy: a redirect that names one of the site's routes in `proxy` mode, on
//! the upstream that route forwards to, is rewritten onto the relay's public origin (the
//! browser stays on the customer's domain, and the relay forwards it there again). Any other
//! upstream page (a broker's login or consent page, an error page) keeps the upstream's origin:
//! the relay does not serve it, so a relay URL for it could only answer `404`. A relative
//! `Location`, which the browser would resolve against the relay, is first resolved against the
//! upstream URL it came from, then the same rule applies.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderValue};

use super::UpstreamBase;
use super::proxy::Forward;
use crate::config::{Mode, Site};

/// A browser route the relay forwards (`proxy` mode): where it goes upstream, and its path.
pub(super) struct ProxiedRoute {
    /// The upstream's `scheme://host[:port]`.
    origin: String,
    /// The upstream base's path, without its trailing `/` (usually empty).
    prefix: String,
    /// The route's path, normalised as request paths are (`path`).
    path: String,
}

impl ProxiedRoute {
    /// The site's browser routes in `proxy` mode, each with the upstream it forwards to.
    pub(super) fn of_site(site: &Site, callback: &UpstreamBase, authorize: &UpstreamBase) -> Vec<ProxiedRoute> {
        let route = |base: &UpstreamBase, path: &str| ProxiedRoute {
            origin: base.origin.clone(),
            prefix: base.prefix().to_string(),
            path: super::path::normalised_route(path),
        };
        let mut routes = Vec::new();
        if site.callback.mode == Mode::Proxy {
            routes.push(route(callback, &site.callback.path));
        }
        if site.authorize.mode == Mode::Proxy {
            routes.extend(site.authorize.paths.iter().map(|p| route(authorize, p)));
        }
        routes
    }

    /// The path and what follows it in `url`, when `url` names this route on its upstream.
    fn on_relay<'a>(&self, url: &'a str) -> Option<&'a str> {
        let rest = after_origin(url, &self.origin)?.strip_prefix(self.prefix.as_str())?;
        let path = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
        (super::path::normalise(path).ok()? == self.path).then_some(rest)
    }
}

impl Forward<'_> {
    /// Points `Location`s at the relay where it forwards them (see the module's policy) and
    /// cookie domains at the relay's host. `requested` is the upstream URL the answer came from.
    pub(super) fn rewrite_headers(&self, proxied: &[ProxiedRoute], requested: &http::Uri, headers: &mut HeaderMap) {
        let location = headers.get(header::LOCATION).and_then(|v| v.to_str().ok());
        if let Some(v) = location.and_then(|l| self.relay_location(proxied, requested, l)) {
            headers.insert(header::LOCATION, v);
        }
        if headers.contains_key(header::SET_COOKIE) {
            let cookies: Vec<HeaderValue> = headers
                .get_all(header::SET_COOKIE)
                .iter()
                .map(|v| v.to_str().ok().and_then(|s| rewrite_cookie_domain(s, self.host)).unwrap_or_else(|| v.clone()))
                .collect();
            headers.remove(header::SET_COOKIE);
            for c in cookies {
                headers.append(header::SET_COOKIE, c);
            }
        }
    }

    /// The `Location` the browser gets instead of `location`, if it gets another: on the
    /// relay's public origin for a route it forwards, absolute on the upstream for a relative
    /// reference to anything else; `None`: as it was.
    fn relay_location(&self, proxied: &[ProxiedRoute], requested: &http::Uri, location: &str) -> Option<HeaderValue> {
        let absolute = absolute_location(location, &self.base.origin, requested)?;
        let Some(rest) = proxied.iter().find_map(|r| r.on_relay(&absolute)) else {
            return match absolute {
                Cow::Owned(upstream) => HeaderValue::try_from(upstream).ok(),
                Cow::Borrowed(_) => None,
            };
        };
        let relay = if self.public_https_port == 443 {
            format!("https://{}{rest}", self.host)
        } else {
            format!("https://{}:{}{rest}", self.host, self.public_https_port)
        };
        HeaderValue::try_from(relay).ok()
    }
}

/// `location` as an absolute URL: borrowed when it already is one; an absolute path put after
/// the upstream's `origin` as it is (its bytes kept); any other relative reference resolved
/// against `requested` as RFC 3986 section 5 says. `None` for something that is neither.
fn absolute_location<'a>(location: &'a str, origin: &str, requested: &http::Uri) -> Option<Cow<'a, str>> {
    match url::Url::parse(location) {
        Ok(_) => Some(Cow::Borrowed(location)),
        Err(url::ParseError::RelativeUrlWithoutBase) if location.starts_with('/') && !location.starts_with("//") => {
            Some(Cow::Owned(format!("{origin}{location}")))
        }
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            let base = url::Url::parse(&requested.to_string()).ok()?;
            Some(Cow::Owned(base.join(location).ok()?.to_string()))
        }
        Err(_) => None,
    }
}

/// What follows `origin` (`scheme://host[:port]`) in `url`, when `url` is on that origin: the
/// scheme and host compared without regard to case (RFC 3986 section 6.2.2.1: `HTTPS://API.X`
/// is `https://api.x`), and the authority ending there (`https://a.example:8443` is not on
/// `https://a.example:84`, nor `https://a.example.evil` on `https://a.example`).
fn after_origin<'a>(url: &'a str, origin: &str) -> Option<&'a str> {
    let head = url.get(..origin.len())?;
    let rest = &url[origin.len()..];
    (head.eq_ignore_ascii_case(origin) && (rest.is_empty() || rest.starts_with(['/', '?', '#']))).then_some(rest)
}

/// Replaces the `Domain` attribute of a `Set-Cookie` value, keeping every other byte as sent.
/// Only the attribute list is touched (split on `;`), so attributes a cookie library might not
/// know (`Partitioned`, `Priority`) survive; `None` when there is no `Domain` to rewrite.
/// Attributes are read as RFC 6265 section 5.2 reads them: the name and value trimmed of spaces
/// and tabs, the name in any case (`domain = .x` is a `Domain`). An empty `Domain` is left as
/// it is: browsers ignore it, and a host-only cookie stays one.
fn rewrite_cookie_domain(cookie: &str, host: &str) -> Option<HeaderValue> {
    let mut changed = false;
    let mut out = String::with_capacity(cookie.len() + host.len());
    for (i, part) in cookie.split(';').enumerate() {
        if i > 0 {
            out.push(';');
        }
        if i > 0 && is_domain(part) {
            changed = true;
            out.push_str(" Domain=");
            out.push_str(host);
        } else {
            out.push_str(part);
        }
    }
    changed.then(|| HeaderValue::try_from(out).ok()).flatten()
}

/// Whether a cookie attribute is a non-empty `Domain`.
fn is_domain(attribute: &str) -> bool {
    const WSP: [char; 2] = [' ', '\t'];
    attribute.split_once('=').is_some_and(|(name, value)| {
        name.trim_matches(WSP).eq_ignore_ascii_case("domain") && !value.trim_matches(WSP).is_empty()
    })
}

/// Joins every `Cookie` field into one, `; ` between them (RFC 9113 section 8.2.3). An HTTP/2
/// client sends each cookie as a field of its own; an HTTP/1.1 upstream expects one line and
/// many read only the first, losing the session. Nothing is allocated for one field or none.
pub fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for crumb in headers.get_all(header::COOKIE).iter().filter(|c| !c.is_empty()) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    // Valid field values joined by `; ` are a valid field value.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cookies(h: &HeaderMap) -> Vec<&str> {
        h.get_all(header::COOKIE).iter().map(|v| v.to_str().unwrap()).collect()
    }

    #[test]
    fn cookie_crumbs_become_one_line_in_their_order() {
        let mut h = HeaderMap::new();
        for c in ["sid=a%3Db", "", "lb=7", "theme=dark; lang=en"] {
            h.append(header::COOKIE, HeaderValue::from_static(c));
        }
        h.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        join_cookie_crumbs(&mut h);
        assert_eq!(cookies(&h), ["sid=a%3Db; lb=7; theme=dark; lang=en"]);
        assert_eq!(h.len(), 2);

        let mut one = HeaderMap::new();
        one.append(header::COOKIE, HeaderValue::from_static("sid=1"));
        join_cookie_crumbs(&mut one);
        assert_eq!(cookies(&one), ["sid=1"]);
    }

    #[test]
    fn cookie_domain_is_rewritten_and_the_rest_kept() {
        let v = rewrite_cookie_domain("sid=a%3Db; Path=/; Domain=.aurinko.io; Secure; Partitioned", "auth.example.com");
        assert_eq!(v.unwrap(), "sid=a%3Db; Path=/; Domain=auth.example.com; Secure; Partitioned");
        assert!(rewrite_cookie_domain("domain=x; Path=/", "h").is_none(), "a cookie named domain is not an attribute");
    }

    #[test]
    fn a_domain_attribute_is_found_in_any_case_and_spacing() {
        for (cookie, expected) in [
            ("a=1; Domain =x", Some("a=1; Domain=h")),
            ("a=1;domain= .x ;Path=/", Some("a=1; Domain=h;Path=/")),
            ("a=1; DOMAIN\t=\tx; Secure", Some("a=1; Domain=h; Secure")),
            ("a=1;  dOmAiN=x", Some("a=1; Domain=h")),
            ("a=1; Domain=", None),
            ("a=1; Domain = ", None),
            ("a=1; Domain", None),
            ("a=1; Domains=x; XDomain=y", None),
        ] {
            assert_eq!(rewrite_cookie_domain(cookie, "h").as_ref().map(|v| v.to_str().unwrap()), expected, "{cookie}");
        }
    }

    #[test]
    fn only_a_location_naming_a_proxied_route_on_its_upstream_goes_to_the_relay() {
        let route = ProxiedRoute {
            origin: "https://broker.example:8443".into(),
            prefix: "/base".into(),
            path: "/v1/auth/callback".into(),
        };
        for (location, expected) in [
            ("https://broker.example:8443/base/v1/auth/callback?code=a%2Bb#f", Some("/v1/auth/callback?code=a%2Bb#f")),
            ("HTTPS://Broker.Example:8443/base/v1/auth/c%61llback", Some("/v1/auth/c%61llback")),
            ("https://broker.example:8443/base/v1/auth/callback/", None),
            ("https://broker.example:8443/base/v1/auth/login?x=1", None),
            ("https://broker.example:8443/v1/auth/callback", None),
            ("https://broker.example:8443/basev1/auth/callback", None),
            ("https://broker.example/base/v1/auth/callback", None),
            ("https://login.microsoftonline.com/base/v1/auth/callback", None),
        ] {
            assert_eq!(route.on_relay(location), expected, "{location}");
        }
    }

    #[test]
    fn relative_locations_are_resolved_on_the_upstream_and_keep_their_bytes() {
        let requested: http::Uri = "https://broker.example/base/v1/auth/authorize?x=1".parse().unwrap();
        let origin = "https://broker.example";
        for (location, expected) in [
            ("https://idp.example/a?b='c'", Some("https://idp.example/a?b='c'")),
            ("/v1/auth/login?next=%2F&q='x'", Some("https://broker.example/v1/auth/login?next=%2F&q='x'")),
            ("login?x=1", Some("https://broker.example/base/v1/auth/login?x=1")),
            ("//other.example/x", Some("https://other.example/x")),
            ("http://[::1", None),
        ] {
            assert_eq!(absolute_location(location, origin, &requested).as_deref(), expected, "{location}");
        }
    }

    #[test]
    fn a_location_on_the_upstream_origin_is_found_in_any_case() {
        let origin = "https://broker.example:8443";
        for (location, rest) in [
            ("https://broker.example:8443/x?y=Z#F", Some("/x?y=Z#F")),
            ("HTTPS://BROKER.EXAMPLE:8443/Login", Some("/Login")),
            ("Https://Broker.Example:8443", Some("")),
            ("https://broker.example:8443?q", Some("?q")),
            ("https://broker.example:84430/x", None),
            ("https://broker.example:8443.evil/x", None),
            ("https://broker.example:8443@evil/x", None),
            ("http://broker.example:8443/x", None),
            ("/relative", None),
            ("https://broker.exampl\u{e9}:8443/x", None),
        ] {
            assert_eq!(after_origin(location, origin), rest, "{location}");
        }
    }

    /// `text` with each ASCII letter in the case `upper` picks.
    fn recased(text: &str, upper: &[bool]) -> String {
        text.chars()
            .zip(upper.iter().chain(std::iter::repeat(&false)))
            .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
            .collect()
    }

    /// A cookie attribute as header text (no `;`), often a `Domain` in some case and spacing.
    fn attribute() -> impl Strategy<Value = String> {
        prop_oneof![
            "[\t -:<-~]{0,16}",
            ("[ \t]{0,2}", "[dD][oO][mM][aA][iI][nN]", "[ \t]{0,2}", "[ \t]{0,2}", "[\t -:<-~]{0,12}")
                .prop_map(|(a, name, b, c, value)| format!("{a}{name}{b}={c}{value}")),
        ]
    }

    /// A `Set-Cookie` value as header text: a name-value pair, then attributes.
    fn set_cookie() -> impl Strategy<Value = String> {
        ("[\t -:<-~]{0,12}", proptest::collection::vec(attribute(), 0..6))
            .prop_map(|(pair, attributes)| std::iter::once(pair).chain(attributes).collect::<Vec<_>>().join(";"))
    }

    proptest! {
        #[test]
        fn location_rewriting_keeps_what_follows_the_origin(
            upper in proptest::collection::vec(any::<bool>(), 40),
            rest in prop_oneof![Just(String::new()), "[/?#][!-~]{0,30}"],
            origin in prop_oneof![Just("https://broker.example"), Just("http://127.0.0.1:8080"), Just("https://[::1]:8443")],
        ) {
            let location = format!("{}{rest}", recased(origin, &upper));
            prop_assert_eq!(after_origin(&location, origin), Some(rest.as_str()));
            // On the relay's origin it is left alone: rewriting twice is rewriting once.
            let relay = format!("https://auth.example.test{rest}");
            prop_assert_eq!(after_origin(&relay, origin), None);
        }

        #[test]
        fn location_rewriting_never_panics_nor_takes_another_origin(
            location in prop_oneof!["\\PC{0,40}", "[Hh][Tt][Tt][Pp][Ss]://[!-~]{0,30}"],
        ) {
            let origin = "https://broker.example";
            if let Some(rest) = after_origin(&location, origin) {
                prop_assert!(location.to_ascii_lowercase().starts_with(origin));
                prop_assert!(rest.is_empty() || rest.starts_with(['/', '?', '#']));
                prop_assert_eq!(&location[origin.len()..], rest);
                let relay = format!("https://auth.example.test{rest}");
                prop_assert!(HeaderValue::try_from(relay).is_ok());
            }
        }

        #[test]
        fn cookie_rewriting_touches_only_the_domain(
            cookie in set_cookie(),
            host in "[a-z0-9]{1,8}(\\.[a-z0-9]{1,8}){0,2}",
        ) {
            let Some(out) = rewrite_cookie_domain(&cookie, &host) else {
                prop_assert!(!cookie.split(';').skip(1).any(is_domain));
                return Ok(());
            };
            let out = out.to_str().expect("text stays text").to_string();
            let (before, after): (Vec<&str>, Vec<&str>) = (cookie.split(';').collect(), out.split(';').collect());
            prop_assert_eq!(before.len(), after.len());
            prop_assert_eq!(before[0], after[0]);
            for (b, a) in before.iter().zip(&after).skip(1) {
                if is_domain(b) {
                    prop_assert_eq!(*a, format!(" Domain={host}"));
                } else {
                    prop_assert_eq!(a, b);
                }
            }
            // A second pass changes nothing.
            let again = rewrite_cookie_domain(&out, &host).expect("the Domain is still there");
            prop_assert_eq!(again.to_str().unwrap(), out.as_str());
        }

        #[test]
        fn cookie_rewriting_never_panics(pair in "\\PC{0,12}", attributes in proptest::collection::vec(
            prop_oneof!["\\PC{0,12}", "\\PC{0,3}[dD][oO][mM][aA][iI][nN]\\PC{0,3}=\\PC{0,8}"], 0..5,
        ), host in "\\PC{0,20}") {
            let cookie = std::iter::once(pair).chain(attributes).collect::<Vec<_>>().join(";");
            let _ = rewrite_cookie_domain(&cookie, &host);
        }
    }
}
