//! Rules that span keys: combinations each valid alone that cannot work together (a route the
//! health check or another route answers first, HTTP-01 without a plain-HTTP listener, two
//! sites whose certificates would share one file, two listeners on one address).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use super::*;

/// The paths answered before any route: health on every listener, ACME HTTP-01 answers.
const RESERVED: [&str; 2] = ["/healthz", "/readyz"];
const ACME_HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// A site's name as files are named after it (the self-signed certificate): what is not an
/// ASCII letter, digit, `-` or `.` becomes `_`.
pub fn file_stem(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect()
}

/// A site's name: as written, else its first hostname, else `site{i}`.
pub(super) fn site_name(i: usize, site: &RawSite) -> String {
    site.name.clone().unwrap_or_else(|| {
        site.hostnames
            .first()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
            .unwrap_or_else(|| format!("site{i}"))
    })
}

impl Validator<'_> {
    /// Every rule across keys, on the raw tables so each is reported even beside other
    /// problems.
    pub(super) fn cross_key_checks(&mut self, raw: &RawConfig) {
        // Each file stem, the site that has it first, and its name. Names taken from a
        // hostname are left out: two of those alike mean one hostname twice, said elsewhere.
        let mut stems: HashMap<String, (usize, String)> = HashMap::new();
        for (i, site) in raw.site.iter().enumerate() {
            let at = |keys: &[&'static str]| {
                let mut k = vec![Seg::Key("site"), Seg::Index(i)];
                k.extend(keys.iter().map(|s| Seg::Key(s)));
                k
            };
            let name = site_name(i, site);
            match stems.get(&file_stem(&name)) {
                Some(_) if site.name.is_none() => {}
                Some((first, other)) if *other == name => {
                    self.error(&at(&["name"]), format!("`{name}` is also site[{first}]'s name: names must differ"));
                }
                Some((first, other)) => self.error(
                    &at(&["name"]),
                    format!("`{name}` and site[{first}]'s `{other}` name the same files: use names that differ in letters or digits"),
                ),
                None => {
                    stems.insert(file_stem(&name), (i, name));
                }
            }
            self.shadowed_routes(i, site);
            if site.tls.source == "acme"
                && site.tls.challenge.as_deref() == Some("http-01")
                && raw.server.http.is_empty()
            {
                self.error(
                    &at(&["tls", "challenge"]),
                    "http-01 is answered on the plain-HTTP listener: add one (`[server] http = [\"0.0.0.0:80\"]`) or use \"tls-alpn-01\"",
                );
            }
            for (route, up) in [
                ("callback", &site.callback.upstream),
                ("authorize", &site.authorize.upstream),
                ("token", &site.token.upstream),
            ] {
                if up.as_deref().is_some_and(|u| u.starts_with("http://")) {
                    self.warn(
                        &at(&[route, "upstream"]),
                        "plain http:// upstream: tokens and codes cross the network unencrypted",
                    );
                }
            }
        }
    }

    /// A callback or authorize path another answer takes first: health, ACME HTTP-01, or the
    /// token route's prefix.
    fn shadowed_routes(&mut self, i: usize, site: &RawSite) {
        let prefix = &site.token.path_prefix;
        let paths = std::iter::once((vec![Seg::Key("callback"), Seg::Key("path")], &site.callback.path)).chain(
            site.authorize
                .paths
                .iter()
                .enumerate()
                .map(|(j, p)| (vec![Seg::Key("authorize"), Seg::Key("paths"), Seg::Index(j)], p)),
        );
        for (keys, path) in paths {
            let taken_by = if RESERVED.contains(&path.as_str()) {
                Some("the health check, answered before any route".to_string())
            } else if path.starts_with(ACME_HTTP01_PREFIX) {
                Some("ACME HTTP-01 answers".to_string())
            } else if path.starts_with(prefix.as_str()) {
                Some(format!("the token route (token.path_prefix = \"{prefix}\")"))
            } else {
                None
            };
            if let Some(by) = taken_by {
                let mut key = vec![Seg::Key("site"), Seg::Index(i)];
                key.extend(keys);
                self.error(&key, format!("`{path}` is taken by {by}: choose another path"));
            }
        }
    }
}

/// One listen address and where it is written (`server.https[0]`, `server.admin`).
pub(super) struct Listen {
    pub addr: SocketAddr,
    pub key: Vec<Seg>,
}

/// Why `a` and `b` cannot both be bound, if they cannot: the same address, or one that takes
/// every address of the other's family on the same port. `[::]` takes IPv4 too: Linux binds
/// it dual-stack unless `net.ipv6.bindv6only` says otherwise. Port 0 picks a free port for
/// each, so it never collides.
fn overlap(a: SocketAddr, b: SocketAddr) -> Option<&'static str> {
    if a.port() != b.port() || a.port() == 0 {
        return None;
    }
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    let dual = |u: &SocketAddr| matches!(u.ip(), IpAddr::V6(ip) if ip.is_unspecified());
    if x == y {
        Some("the same address")
    } else if dual(&a) || dual(&b) {
        Some("`[::]` takes IPv4 addresses too (dual stack): list it alone to serve both")
    } else if (x.is_unspecified() && x.is_ipv4() == y.is_ipv4()) || (y.is_unspecified() && x.is_ipv4() == y.is_ipv4()) {
        Some("an unspecified address takes every address of its family")
    } else {
        None
    }
}

impl Validator<'_> {
    /// Every pair of listeners (https, http, admin) that `serve` could not bind together is
    /// refused at the later one: the bind would fail with "address in use" at start.
    pub(super) fn listener_overlaps(&mut self, listens: &[Listen]) {
        for (j, later) in listens.iter().enumerate() {
            let clash = listens[..j].iter().find_map(|l| overlap(l.addr, later.addr).map(|why| (l, why)));
            if let Some((first, why)) = clash {
                let message = format!(
                    "`{}` overlaps `{}` ({}): {why}; one socket cannot take both",
                    later.addr,
                    first.addr,
                    locate::render(&first.key)
                );
                self.error(&later.key, message);
            }
        }
    }
}
