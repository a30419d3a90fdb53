//! Turns [`RawConfig`] into [`Config`], collecting every problem with its key path and line.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use http::{HeaderValue, Method, StatusCode};
use url::Url;

use super::locate::{self, Seg};
use super::raw::{RawConfig, RawSite};
use super::*;
use crate::egress::Egress;

mod acme;
mod bounds;
mod cross;
mod process;
mod storage;

use bounds::Wait;
pub use cross::file_stem;

/// Collects problems while building the typed config; a `None` result always comes with at
/// least one problem.
pub(super) struct Validator<'a> {
    pub file: &'a str,
    /// Where in the text each problem's key is.
    pub locator: locate::Locator<'a>,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

impl Validator<'_> {
    fn problem_at(&self, path: &[Seg], message: String) -> Problem {
        Problem {
            file: self.file.to_string(),
            line: self.locator.line_of_path(path),
            key: locate::render(path),
            message,
        }
    }

    fn error(&mut self, path: &[Seg], message: impl Into<String>) {
        let p = self.problem_at(path, message.into());
        self.problems.push(p);
    }

    fn warn(&mut self, path: &[Seg], message: impl Into<String>) {
        let p = self.problem_at(path, message.into());
        self.warnings.push(p);
    }

    pub fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let server = self.server(&raw);
        let limits = self.limits(&raw);
        let health = self.health(&raw);
        let outbound = self.outbound(&raw, |name| std::env::var(name).ok());
        let flow_key = match raw.log.flow_key.as_deref().map(crate::flow::FlowKey::parse) {
            Some(Err(why)) => {
                self.error(&[Seg::Key("log"), Seg::Key("flow_key")], why);
                None
            }
            other => other.and_then(Result::ok),
        };
        if !raw.log.redact {
            self.warn(
                &[Seg::Key("log"), Seg::Key("redact")],
                "false: every access line carries the raw path and query, with authorization codes and \
                 `state`; for debugging on your own machine only, never in production",
            );
        }
        if raw.site.is_empty() {
            self.error(&[Seg::Key("site")], "at least one [[site]] is needed");
        }
        // On the raw sites, so a duplicate name or second default is reported even when the
        // site has other problems too.
        self.cross_site_checks(&raw.site);
        self.cross_key_checks(&raw);
        let sites: Vec<Option<Site>> = raw.site.into_iter().enumerate().map(|(i, s)| self.site(i, s)).collect();
        let mut sites: Vec<Site> = sites.into_iter().collect::<Option<_>>()?;
        let outbound = outbound?;
        for site in &mut sites {
            if let TlsSource::Acme(acme) = &mut site.tls {
                acme.egress = outbound.clone();
            }
        }
        Some(Config {
            file: self.file.to_string(),
            server: server?,
            limits: limits?,
            log: LogSettings { access: raw.log.access, redact: raw.log.redact, flow_key },
            health: health?,
            outbound,
            sites,
            warnings: Vec::new(),
        })
    }

    fn site(&mut self, i: usize, raw: RawSite) -> Option<Site> {
        let before = self.problems.len();
        let at = |k: &'static str| vec![Seg::Key("site"), Seg::Index(i), Seg::Key(k)];
        let at2 = |k: &'static str, k2: &'static str| vec![Seg::Key("site"), Seg::Index(i), Seg::Key(k), Seg::Key(k2)];

        let hostnames = self.hostnames(&at("hostnames"), &raw.hostnames);
        let name = cross::site_name(i, &raw);
        let upstream = self.upstream_url(&at("upstream"), &raw.upstream);
        let callback_up = raw.callback.upstream.as_ref().map(|u| self.upstream_url(&at2("callback", "upstream"), u));
        let authorize_up = raw.authorize.upstream.as_ref().map(|u| self.upstream_url(&at2("authorize", "upstream"), u));
        let token_up = raw.token.upstream.as_ref().map(|u| self.upstream_url(&at2("token", "upstream"), u));

        let tls = match raw.tls.source.as_str() {
            "self-signed" => {
                for (k, v) in [("cert", &raw.tls.cert), ("key", &raw.tls.key)] {
                    if v.is_some() {
                        self.error(&at2("tls", k), "only used with source = \"files\"");
                    }
                }
                Some(TlsSource::SelfSigned)
            }
            "files" => match (&raw.tls.cert, &raw.tls.key) {
                (Some(cert), Some(key)) => Some(TlsSource::Files {
                    cert: cert.into(),
                    key: key.into(),
                    reload_interval: raw.tls.reload_interval,
                }),
                (cert, _) => {
                    let missing = if cert.is_none() { "cert" } else { "key" };
                    self.error(
                        &at2("tls", "source"),
                        format!("source = \"files\" needs `{missing}` (a PEM file path)"),
                    );
                    None
                }
            },
            "acme" => self.acme(i, &raw.tls, &hostnames).map(|a| TlsSource::Acme(Box::new(a))),
            other => {
                self.error(
                    &at2("tls", "source"),
                    format!("unknown certificate source `{other}`; use \"self-signed\", \"files\" or \"acme\""),
                );
                None
            }
        };
        if raw.tls.source != "acme" {
            self.no_acme_keys(i, &raw.tls);
        }
        self.wait(&at2("tls", "reload_interval"), raw.tls.reload_interval, Wait::TIMER);

        let callback_mode = self.mode(&at2("callback", "mode"), &raw.callback.mode);
        let callback_status = self.redirect_status(&at2("callback", "status"), raw.callback.status);
        let authorize_mode = self.mode(&at2("authorize", "mode"), &raw.authorize.mode);
        let authorize_status = self.redirect_status(&at2("authorize", "status"), raw.authorize.status);
        self.path(&at2("callback", "path"), &raw.callback.path);
        for (j, p) in raw.authorize.paths.iter().enumerate() {
            let mut key = at2("authorize", "paths");
            key.push(Seg::Index(j));
            self.path(&key, p);
        }
        self.path(&at2("token", "path_prefix"), &raw.token.path_prefix);
        if !raw.token.path_prefix.ends_with('/') {
            self.error(&at2("token", "path_prefix"), "must end with `/` (the code follows it)");
        }
        let mut seen = HashSet::new();
        for p in std::iter::once(&raw.callback.path).chain(&raw.authorize.paths) {
            if !seen.insert(p.as_str()) {
                self.error(&at("authorize"), format!("path `{p}` is routed twice"));
            }
        }
        let mut methods = Vec::new();
        for (j, m) in raw.token.methods.iter().enumerate() {
            match m.to_ascii_uppercase().as_str() {
                "POST" => methods.push(Method::POST),
                "GET" => methods.push(Method::GET),
                _ => {
                    let mut key = at2("token", "methods");
                    key.push(Seg::Index(j));
                    self.error(&key, format!("`{m}`: the token route takes \"POST\" and/or \"GET\""));
                }
            }
        }
        if raw.token.methods.is_empty() {
            self.error(&at2("token", "methods"), "needs at least one method (\"POST\")");
        }
        self.wait(&at("connect_timeout"), raw.connect_timeout, Wait::TIMEOUT);
        self.wait(&at("response_timeout"), raw.response_timeout, Wait::TIMEOUT);
        if let (Some(c), Some(a)) = (callback_mode, authorize_mode) {
            if c != a {
                self.warn(
                    &at2("authorize", "mode"),
                    format!(
                        "authorize is {} while the callback is {}: the broker's cookies would land on two domains",
                        mode_word(a),
                        mode_word(c)
                    ),
                );
            }
        }

        let application_ids = self.application_ids(&at("application_ids"), &raw.application_ids);
        if callback_mode == Some(Mode::Proxy) && !raw.callback.fragment_page {
            self.warn(
                &at2("callback", "fragment_page"),
                "false while the callback is proxy: with response_mode=fragment the code never reaches \
                 the broker (only the browser sees a fragment, and the relay forwards the callback without it)",
            );
        }

        if self.problems.len() != before {
            return None;
        }
        let upstream = upstream?;
        if upstream.scheme() == "http" {
            self.warn(&at("upstream"), "plain http:// upstream: tokens and codes cross the network unencrypted");
        }
        let sub = |u: Option<Option<Url>>| u.flatten().unwrap_or_else(|| upstream.clone());
        Some(Site {
            name,
            hostnames,
            default: raw.default,
            upstream_ca_file: raw.upstream_ca_file.map(PathBuf::from),
            connect_timeout: raw.connect_timeout,
            response_timeout: raw.response_timeout,
            upstream_keepalive: raw.upstream_keepalive,
            tls: tls?,
            application_ids,
            callback: Callback {
                path: raw.callback.path,
                mode: callback_mode?,
                status: callback_status?,
                form_post: raw.callback.form_post,
                fragment_page: raw.callback.fragment_page,
                upstream: sub(callback_up),
            },
            authorize: Authorize {
                paths: raw.authorize.paths,
                mode: authorize_mode?,
                status: authorize_status?,
                upstream: sub(authorize_up),
            },
            token: Token { path_prefix: raw.token.path_prefix, methods, upstream: sub(token_up) },
            upstream,
        })
    }

    /// Entra application (client) ids: GUIDs (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hex),
    /// kept in lower case, each once.
    fn application_ids(&mut self, key: &[Seg], list: &[String]) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for (j, id) in list.iter().enumerate() {
            let mut at = key.to_vec();
            at.push(Seg::Index(j));
            let groups: Vec<&str> = id.split('-').collect();
            let shape = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
            if !shape || !groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit())) {
                self.error(&at, format!("`{id}` is not an application (client) id: a GUID like 00000000-0000-0000-0000-000000000000 from the app registration's Overview"));
            } else if ids.contains(&id.to_ascii_lowercase()) {
                self.error(&at, format!("`{id}` is listed twice"));
            } else {
                ids.push(id.to_ascii_lowercase());
            }
        }
        ids
    }

    fn hostnames(&mut self, key: &[Seg], list: &[String]) -> Vec<String> {
        if list.is_empty() {
            self.error(key, "at least one hostname is needed");
        }
        let mut out = Vec::new();
        for (j, h) in list.iter().enumerate() {
            let lower = h.trim_end_matches('.').to_ascii_lowercase();
            let bare = lower.strip_prefix("*.").unwrap_or(&lower);
            let valid = rustls::pki_types::DnsName::try_from(bare).is_ok()
                && bare.parse::<std::net::IpAddr>().is_err()
                && !bare.contains('*');
            if valid {
                out.push(lower);
            } else {
                let mut k = key.to_vec();
                k.push(Seg::Index(j));
                self.error(
                    &k,
                    format!("`{h}` is not a DNS hostname (IP addresses and bare wildcards are not allowed)"),
                );
            }
        }
        out
    }

    fn upstream_url(&mut self, key: &[Seg], s: &str) -> Option<Url> {
        let url = match Url::parse(s) {
            Ok(u) => u,
            Err(e) => {
                self.error(key, format!("`{s}` is not a URL: {e}"));
                return None;
            }
        };
        let problem = if !matches!(url.scheme(), "https" | "http") {
            Some("must be an https:// (or http://) URL")
        } else if url.host_str().is_none() {
            Some("needs a host")
        } else if url.port() == Some(0) {
            Some("has port 0, which nothing can be reached on")
        } else if url.query().is_some() || url.fragment().is_some() {
            Some("must not have a query or fragment")
        } else if !url.username().is_empty() || url.password().is_some() {
            Some("must not carry credentials")
        } else {
            None
        };
        if let Some(p) = problem {
            self.error(key, format!("`{s}` {p}"));
            return None;
        }
        // A base path is kept without its trailing slash: routes append their own path.
        let mut url = url;
        let trimmed = url.path().trim_end_matches('/').to_string();
        url.set_path(&trimmed);
        Some(url)
    }

    fn mode(&mut self, key: &[Seg], s: &str) -> Option<Mode> {
        match s {
            "redirect" => Some(Mode::Redirect),
            "proxy" => Some(Mode::Proxy),
            _ => {
                self.error(key, format!("`{s}`: use \"redirect\" or \"proxy\""));
                None
            }
        }
    }

    fn redirect_status(&mut self, key: &[Seg], code: u16) -> Option<StatusCode> {
        match code {
            302 | 303 | 307 => StatusCode::from_u16(code).ok(),
            _ => {
                self.error(key, format!("{code}: use 302, 303 or 307"));
                None
            }
        }
    }

    fn path(&mut self, key: &[Seg], p: &str) {
        if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
            self.error(key, format!("`{p}` must be an absolute path without query or fragment"));
        } else if !p.bytes().all(|b| b.is_ascii_graphic()) {
            self.error(key, format!("`{p}` must be printable ASCII (percent-encode anything else)"));
        } else if p.split('/').any(|s| s == "." || s == "..") {
            self.error(key, format!("`{p}` must not have `.` or `..` segments (requests with them are refused)"));
        }
    }

    fn cross_site_checks(&mut self, sites: &[RawSite]) {
        // Each hostname and the site that names it first.
        let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let mut defaults = 0;
        for (i, site) in sites.iter().enumerate() {
            for (j, h) in site.hostnames.iter().enumerate() {
                let h = h.trim_end_matches('.').to_ascii_lowercase();
                let key = [Seg::Key("site"), Seg::Index(i), Seg::Key("hostnames"), Seg::Index(j)];
                match seen.get(&h) {
                    Some(&first) if first == i => self.error(&key, format!("`{h}` is listed twice in this site")),
                    Some(&first) => {
                        self.error(&key, format!("`{h}` belongs to site[{first}] too: a hostname can have one site"))
                    }
                    None => {
                        seen.insert(h, i);
                    }
                }
            }
            if site.default {
                defaults += 1;
                if defaults > 1 {
                    self.error(
                        &[Seg::Key("site"), Seg::Index(i), Seg::Key("default")],
                        "only one site may be the default",
                    );
                }
            }
        }
    }
}

fn mode_word(m: Mode) -> &'static str {
    match m {
        Mode::Redirect => "redirected",
        Mode::Proxy => "proxied",
    }
}
