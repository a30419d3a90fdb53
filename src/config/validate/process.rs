//! The process-wide tables: `[server]` (listeners, storage, HSTS, PROXY protocol sources),
//! `[outbound]` (the proxy for upstreams and the CA), `[limits]` and `[health]`.

use super::bounds::Wait;
use super::cross::Listen;
use super::*;

/// The largest header block (and query) the relay can be told to take.
const MAX_HEADER_BYTES: usize = 1 << 20;
/// The most connections the relay can be told to hold (each holds a file descriptor).
const MAX_CONNECTIONS: usize = 1_000_000;
/// The largest request body the relay can be told to read whole.
const MAX_BODY_BYTES: u64 = 100 << 20;

/// The tables that hold one value for the whole process, not one per site.
impl Validator<'_> {
    pub(super) fn addrs(&mut self, key: &'static str, list: &[String]) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for (i, a) in list.iter().enumerate() {
            match a.parse::<SocketAddr>() {
                Ok(addr) => out.push(addr),
                Err(_) => self.error(
                    &[Seg::Key("server"), Seg::Key(key), Seg::Index(i)],
                    format!("`{a}` is not an IP:port listen address (e.g. \"0.0.0.0:443\" or \"[::]:443\")"),
                ),
            }
        }
        out
    }

    pub(super) fn server(&mut self, raw: &RawConfig) -> Option<Server> {
        let s = &raw.server;
        let before = self.problems.len();
        let https = self.addrs("https", &s.https);
        let http = self.addrs("http", &s.http);
        if s.https.is_empty() {
            self.error(&[Seg::Key("server"), Seg::Key("https")], "at least one HTTPS listen address is needed");
        }
        let admin = match &s.admin {
            None => None,
            Some(a) => match a.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.error(
                        &[Seg::Key("server"), Seg::Key("admin")],
                        format!("`{a}` is not an IP:port listen address (e.g. \"127.0.0.1:9090\")"),
                    );
                    None
                }
            },
        };
        let listens = https.iter().map(|a| ("https", a)).chain(http.iter().map(|a| ("http", a)));
        let mut listens: Vec<Listen> = listens
            .enumerate()
            .map(|(n, (role, &addr))| {
                let i = if role == "https" { n } else { n - https.len() };
                Listen { addr, key: vec![Seg::Key("server"), Seg::Key(role), Seg::Index(i)] }
            })
            .collect();
        listens.extend(admin.map(|addr| Listen { addr, key: vec![Seg::Key("server"), Seg::Key("admin")] }));
        // Indices are those of the file only when every address was read.
        if https.len() == s.https.len() && http.len() == s.http.len() {
            self.listener_overlaps(&listens);
        }
        let hsts = if s.hsts.is_empty() {
            None
        } else {
            let max_age = s.hsts.split(';').map(str::trim).any(|d| {
                d.strip_prefix("max-age=")
                    .is_some_and(|secs| !secs.is_empty() && secs.bytes().all(|b| b.is_ascii_digit()))
            });
            match HeaderValue::from_str(&s.hsts) {
                Ok(v) if max_age => Some(v),
                _ => {
                    self.error(
                        &[Seg::Key("server"), Seg::Key("hsts")],
                        "must be a Strict-Transport-Security value such as \"max-age=31536000\", or \"\" to send none",
                    );
                    None
                }
            }
        };
        if s.public_https_port == Some(0) {
            self.error(
                &[Seg::Key("server"), Seg::Key("public_https_port")],
                "must be the port clients connect to, 1 to 65535",
            );
        }
        let (storage, shared) = self.storage(raw, |name| std::env::var(name).ok());
        let proxy_protocol_from = self.networks("proxy_protocol_from", &s.proxy_protocol_from, "the load balancer");
        let trusted_proxies = self.networks("trusted_proxies", &s.trusted_proxies, "the proxies in front");
        let tls13_only = match s.min_tls_version.as_str() {
            "1.2" => false,
            "1.3" => true,
            other => {
                self.error(
                    &[Seg::Key("server"), Seg::Key("min_tls_version")],
                    format!("`{other}` is not a TLS version the relay speaks; use \"1.2\" or \"1.3\""),
                );
                false
            }
        };
        let public_https_port = s.public_https_port.or_else(|| https.first().map(|a| a.port())).unwrap_or(443);
        let storage = storage?;
        (self.problems.len() == before).then(|| Server {
            https,
            http,
            admin,
            public_https_port,
            storage,
            shared,
            storage_key_file: s.storage_key_file.as_deref().map(PathBuf::from),
            hsts,
            proxy_protocol_from,
            trusted_proxies,
            tls13_only,
        })
    }

    /// `[outbound]`: "env" reads the proxy variables through `env`, "direct" uses none, anything
    /// else must be an `http://` proxy URL.
    pub(super) fn outbound(&mut self, raw: &RawConfig, env: impl Fn(&str) -> Option<String>) -> Option<Egress> {
        let o = &raw.outbound;
        let key = [Seg::Key("outbound"), Seg::Key("proxy")];
        if !o.no_proxy.is_empty() && matches!(o.proxy.as_str(), "env" | "direct") {
            self.warn(
                &[Seg::Key("outbound"), Seg::Key("no_proxy")],
                format!("only used with a proxy URL; with proxy = \"{}\" it does nothing", o.proxy),
            );
        }
        let egress = match o.proxy.as_str() {
            "direct" => Ok(Egress::direct()),
            "env" => Egress::from_env(env).map_err(|e| {
                format!("{e} (set [outbound] proxy = \"direct\" or an http:// proxy URL to override the environment)")
            }),
            url => Egress::proxy(url, &o.no_proxy.join(",")).map_err(|e| e.to_string()),
        };
        egress.map_err(|message| self.error(&key, message)).ok()
    }

    /// `server.{key}` (`proxy_protocol_from`, `trusted_proxies`): networks (`10.0.0.0/8`) or
    /// single addresses of the peers allowed to name the client (`who` in the /0 warning).
    pub(super) fn networks(&mut self, key: &'static str, raw: &[String], who: &str) -> Vec<ipnet::IpNet> {
        let mut out = Vec::new();
        for (i, n) in raw.iter().enumerate() {
            match n.parse::<ipnet::IpNet>().or_else(|_| n.parse::<IpAddr>().map(ipnet::IpNet::from)) {
                Ok(net) => {
                    if net.prefix_len() == 0 {
                        self.warn(
                            &[Seg::Key("server"), Seg::Key(key), Seg::Index(i)],
                            format!("`{n}` lets any peer name its own client address: make sure only {who} can reach the listeners"),
                        );
                    }
                    out.push(net.trunc());
                }
                Err(_) => self.error(
                    &[Seg::Key("server"), Seg::Key(key), Seg::Index(i)],
                    format!("`{n}` is not a network or an IP address (e.g. \"10.0.0.0/8\", \"192.0.2.7\" or \"2001:db8::/32\")"),
                ),
            }
        }
        out
    }

    /// `[limits]`: every wait bounded (at most a day: past that no deadline is a bound any
    /// more, and far-off instants overflow the clock), every size within what the relay can
    /// hold.
    pub(super) fn limits(&mut self, raw: &RawConfig) -> Option<Limits> {
        let l = &raw.limits;
        let key = |k| [Seg::Key("limits"), Seg::Key(k)];
        let before = self.problems.len();
        for (name, d) in [
            ("handshake_timeout", l.handshake_timeout),
            ("header_read_timeout", l.header_read_timeout),
            ("idle_timeout", l.idle_timeout),
            ("send_timeout", l.send_timeout),
        ] {
            self.wait(&key(name), d, Wait::TIMEOUT);
        }
        self.wait(&key("shutdown_grace"), l.shutdown_grace, Wait::WINDOW);
        if l.max_header_bytes < 8192 {
            self.error(&key("max_header_bytes"), "must be at least 8192 (browsers send large cookies)");
        } else if l.max_header_bytes > MAX_HEADER_BYTES {
            self.error(&key("max_header_bytes"), "must be at most 1048576 (1 MiB)");
        }
        if l.max_connections == 0 {
            self.error(&key("max_connections"), "must be at least 1");
        } else if l.max_connections > MAX_CONNECTIONS {
            self.error(&key("max_connections"), "must be at most 1000000");
        }
        if l.max_body_bytes > MAX_BODY_BYTES {
            self.error(&key("max_body_bytes"), "must be at most 104857600 (100 MiB)");
        }
        if l.max_connections_per_ip == 0 {
            self.error(
                &key("max_connections_per_ip"),
                "must be at least 1 (to lift the cap, set it to max_connections)",
            );
        } else if l.max_connections_per_ip < l.max_connections
            && !raw.server.trusted_proxies.is_empty()
            && raw.server.proxy_protocol_from.is_empty()
        {
            self.warn(
                &key("max_connections_per_ip"),
                format!(
                    "with server.trusted_proxies, clients reach the relay through a proxy, and the cap counts the \
                     proxy's own address: at most {} connections in all through each proxy. Raise it to \
                     max_connections, or have the proxy send the PROXY protocol (server.proxy_protocol_from)",
                    l.max_connections_per_ip
                ),
            );
        }
        if l.max_query_bytes == 0 {
            self.error(&key("max_query_bytes"), "must be at least 1");
        } else if l.max_query_bytes > MAX_HEADER_BYTES {
            self.error(&key("max_query_bytes"), "must be at most 1048576 (1 MiB)");
        }
        (self.problems.len() == before).then_some(Limits {
            handshake_timeout: l.handshake_timeout,
            header_read_timeout: l.header_read_timeout,
            idle_timeout: l.idle_timeout,
            send_timeout: l.send_timeout,
            shutdown_grace: l.shutdown_grace,
            max_header_bytes: l.max_header_bytes,
            max_connections: l.max_connections,
            max_connections_per_ip: l.max_connections_per_ip.min(l.max_connections),
            max_query_bytes: l.max_query_bytes,
            max_body_bytes: l.max_body_bytes,
        })
    }

    pub(super) fn health(&mut self, raw: &RawConfig) -> Option<HealthSettings> {
        let h = &raw.health;
        let key = |k| [Seg::Key("health"), Seg::Key(k)];
        let before = self.problems.len();
        if !h.upstream_probe_path.starts_with('/') || h.upstream_probe_path.contains(['#', ' ']) {
            self.error(&key("upstream_probe_path"), "must be an absolute path such as \"/\" (a query is allowed)");
        }
        self.wait(&key("cert_expiry_margin"), h.cert_expiry_margin, Wait::CERT_MARGIN);
        self.wait(&key("upstream_probe_interval"), h.upstream_probe_interval, Wait { off: true, ..Wait::TIMER });
        self.wait(&key("upstream_probe_timeout"), h.upstream_probe_timeout, Wait::TIMEOUT);
        self.wait(&key("upstream_unreachable_window"), h.upstream_unreachable_window, Wait::WINDOW);
        self.wait(&key("clock_skew_warn"), h.clock_skew_warn, Wait::WINDOW);
        self.wait(&key("clock_skew_fail"), h.clock_skew_fail, Wait::WINDOW);
        if h.clock_skew_fail < h.clock_skew_warn {
            self.error(&key("clock_skew_fail"), "must be at least `clock_skew_warn`");
        }
        (self.problems.len() == before).then(|| HealthSettings {
            cert_expiry_margin: h.cert_expiry_margin,
            upstream_probe_interval: (!h.upstream_probe_interval.is_zero()).then_some(h.upstream_probe_interval),
            upstream_probe_path: h.upstream_probe_path.clone(),
            upstream_probe_timeout: h.upstream_probe_timeout,
            upstream_unreachable_window: h.upstream_unreachable_window,
            clock_skew_warn: h.clock_skew_warn,
            clock_skew_fail: h.clock_skew_fail,
        })
    }
}
