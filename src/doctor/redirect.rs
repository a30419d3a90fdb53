//! Redirect URIs against Microsoft Entra's restrictions ("Redirect URI (reply URL) restrictions
//! and limitations", learn.microsoft.com/entra/identity-platform/reply-url):
//!
//! - the scheme must be `https` (Entra's `http://localhost` exception never applies: the relay
//!   always serves HTTPS);
//! - at most 256 characters;
//! - none of the characters `! $ ' ( ) , ;`;
//! - no wildcards (Entra refuses them for new app registrations);
//! - a query string is accepted only for apps that sign in work or school accounts only, and is
//!   rejected for apps that also allow personal Microsoft accounts;
//! - Entra compares case-sensitively and as a whole string: `/Callback`, `/callback` and
//!   `/callback/` are three different registrations. The relay routes the configured path
//!   exactly, so the URI must be registered exactly as printed.
//!
//! A fragment is refused too (RFC 6749 section 3.1.2: a redirect URI has no fragment).

use url::Url;

use super::Finding;
use crate::config::Site;

const CHECK: &str = "redirect-uri";
/// Entra's maximum length of one redirect URI.
pub const MAX_LEN: usize = 256;
/// Characters Entra does not accept anywhere in a redirect URI.
pub const FORBIDDEN: [char; 7] = ['!', '$', '\'', '(', ')', ',', ';'];

/// Every redirect URI of `site`, plus a warning for wildcard hostnames (their names in use must
/// be registered one by one).
pub fn check_site(site: &Site, public_https_port: u16) -> Vec<Finding> {
    let mut out = Vec::new();
    for uri in site.redirect_uris(public_https_port) {
        out.extend(check(&uri));
    }
    for h in site.hostnames.iter().filter(|h| h.starts_with("*.")) {
        out.push(Finding::warning(
            CHECK,
            format!("site {}: `{h}` is a wildcard; Entra accepts no wildcard redirect URIs", site.name),
            format!("register https://NAME{} for each name under `{h}` that is in use", site.callback.path),
        ));
    }
    out
}

/// `uri` against each of Entra's rules: one finding per broken rule, or one `ok` finding.
pub fn check(uri: &str) -> Vec<Finding> {
    let rules: [fn(&str) -> Option<Finding>; 8] =
        [scheme, length, forbidden_chars, wildcard, query, fragment, path_case, trailing_slash];
    let problems: Vec<Finding> = rules.iter().filter_map(|rule| rule(uri)).collect();
    if problems.is_empty() {
        vec![Finding::ok(CHECK, format!("{uri} meets Microsoft Entra's redirect URI rules ({} characters)", uri.len()))]
    } else {
        problems
    }
}

/// The path as written in `uri` (after the authority, before `?` or `#`), case preserved.
fn raw_path(uri: &str) -> &str {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    rest.find('/').map_or("", |i| &rest[i..])
}

fn scheme(uri: &str) -> Option<Finding> {
    match Url::parse(uri) {
        Ok(u) if u.scheme() == "https" => None,
        Ok(u) => Some(Finding::error(
            CHECK,
            format!("{uri}: scheme `{}`; Entra requires https for web redirect URIs", u.scheme()),
            "serve the callback over HTTPS and register the https:// URI",
        )),
        Err(e) => Some(Finding::error(
            CHECK,
            format!("{uri} is not an absolute URI: {e}"),
            "register an absolute https:// URI",
        )),
    }
}

fn length(uri: &str) -> Option<Finding> {
    let n = uri.chars().count();
    (n > MAX_LEN).then(|| {
        Finding::error(
            CHECK,
            format!("{uri}: {n} characters; Entra accepts at most {MAX_LEN}"),
            "shorten the hostname or `callback.path`",
        )
    })
}

fn forbidden_chars(uri: &str) -> Option<Finding> {
    let found: Vec<String> = FORBIDDEN.iter().filter(|c| uri.contains(**c)).map(|c| c.to_string()).collect();
    (!found.is_empty()).then(|| {
        Finding::error(
            CHECK,
            format!("{uri}: contains {}; Entra does not accept ! $ ' ( ) , ; in redirect URIs", found.join(" ")),
            format!("remove {} from `callback.path`", found.join(" ")),
        )
    })
}

fn wildcard(uri: &str) -> Option<Finding> {
    uri.contains('*').then(|| {
        Finding::error(
            CHECK,
            format!("{uri}: contains a wildcard `*`; Entra accepts no wildcard redirect URIs"),
            "register one URI per hostname in use",
        )
    })
}

fn query(uri: &str) -> Option<Finding> {
    uri.split('#').next().is_some_and(|u| u.contains('?')).then(|| {
        Finding::warning(
            CHECK,
            format!(
                "{uri}: has a query string; Entra accepts it only for apps that sign in work or school accounts \
                 only, and rejects it for apps that allow personal Microsoft accounts"
            ),
            "drop the query from the redirect URI (carry data in `state` instead)",
        )
    })
}

fn fragment(uri: &str) -> Option<Finding> {
    uri.contains('#').then(|| {
        Finding::error(
            CHECK,
            format!("{uri}: has a fragment; a redirect URI must not (RFC 6749 3.1.2)"),
            "remove the `#...` part",
        )
    })
}

fn path_case(uri: &str) -> Option<Finding> {
    let path = raw_path(uri);
    path.chars().any(|c| c.is_ascii_uppercase()).then(|| {
        Finding::warning(
            CHECK,
            format!(
                "{uri}: the path `{path}` has upper-case letters; Entra compares redirect URIs case-sensitively \
                 and the relay routes only this exact case"
            ),
            "register the URI exactly as printed below (copy, do not retype), or use a lower-case `callback.path`",
        )
    })
}

fn trailing_slash(uri: &str) -> Option<Finding> {
    let path = raw_path(uri);
    if path.is_empty() {
        return Some(Finding::warning(
            CHECK,
            format!("{uri}: has no path; Entra returns such URIs with a trailing `/` added"),
            format!("register {uri}/ and set `callback.path = \"/\"`, or use a path such as /v1/auth/callback"),
        ));
    }
    (path.len() > 1 && path.ends_with('/')).then(|| {
        Finding::warning(
            CHECK,
            format!(
                "{uri}: the path ends with `/`; Entra matches the whole string, so `{path}` and `{}` are \
                 different registrations",
                path.trim_end_matches('/')
            ),
            "register the URI exactly as printed below, or drop the trailing `/` from `callback.path`",
        )
    })
}
