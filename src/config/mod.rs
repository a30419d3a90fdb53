//! Configuration: one TOML file, read, parsed and validated in separate steps so tests can feed a
//! string. Every problem names the file, the key and the line, and all problems are reported at
//! once. The typed [`Config`] holds URLs, socket addresses and durations, never raw strings.

mod deserialize;
mod locate;
mod raw;
mod report;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};
use url::Url;

pub use raw::RawConfig;
pub use report::{redirect_uris_block, report};

/// The built-in configuration (`config/local.toml`): HTTPS on `https://localhost:8443` with a
/// self-signed certificate in front of Aurinko. `serve` without `--config` runs it.
pub const EMBEDDED_LOCAL: &str = include_str!("../../config/local.toml");
/// The name the embedded configuration is reported under.
pub const EMBEDDED_NAME: &str = "<embedded config/local.toml>";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// One or more keys are wrong; each problem names file, line and key.
    #[error("{}", render_problems(.0))]
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

/// One thing wrong (or worth a warning) in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file as the operator named it.
    pub file: String,
    /// 1-based line, when the key (or its nearest parent) is written in the file.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `site[0].tls.source`.
    pub key: String,
    /// What is wrong and what would be right.
    pub message: String,
}

/// Shown with control characters escaped (`\u{1b}`, `\n`): a value quoted in a message cannot
/// move a terminal's cursor or start a forged log line.
impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (file, key, message) = (Escaped(&self.file), Escaped(&self.key), Escaped(&self.message));
        match self.line {
            Some(line) => write!(f, "{file}:{line}: {key}: {message}"),
            None => write!(f, "{file}: {key}: {message}"),
        }
    }
}

/// Text with its control characters escaped.
struct Escaped<'a>(&'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// A validated configuration, ready to bind and serve.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (file path or the embedded default's name).
    pub file: String,
    pub server: Server,
    pub limits: Limits,
    pub log: LogSettings,
    pub health: HealthSettings,
    /// How upstreams, their probes and the ACME CA are reached (`[outbound]`).
    pub outbound: crate::egress::Egress,
    pub sites: Vec<Site>,
    /// Things that are allowed but probably not meant (printed by `check`, logged by `serve`).
    pub warnings: Vec<Problem>,
}

/// Listeners and process-wide settings.
#[derive(Debug, Clone)]
pub struct Server {
    /// HTTPS listen addresses.
    pub https: Vec<SocketAddr>,
    /// Plain-HTTP listen addresses (308 to HTTPS, ACME HTTP-01, health).
    pub http: Vec<SocketAddr>,
    /// Admin listener (health; plain HTTP, keep it on loopback).
    pub admin: Option<SocketAddr>,
    /// The HTTPS port clients see; used in HTTP->HTTPS redirects and printed redirect URIs.
    pub public_https_port: u16,
    /// The certificate store folder; with a shared store, the folder of this replica's copy of
    /// what it serves (`[redis] cache`).
    pub storage: PathBuf,
    /// The store replicas share (`storage = "redis://..."`); `None`: the folder is the store.
    pub shared: Option<RedisStorage>,
    /// Seals private keys in a shared store (`server.storage_key_file`).
    pub storage_key_file: Option<PathBuf>,
    /// `Strict-Transport-Security` value on HTTPS responses; `None` when set to "".
    pub hsts: Option<HeaderValue>,
    /// Load balancers that put a PROXY protocol header before each connection to the public
    /// listeners; empty: none, peers are the clients themselves.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// HTTP proxies in front (an L7 load balancer that re-encrypts to the relay): requests from
    /// them name their client in `X-Forwarded-For`; empty: nobody's `X-Forwarded-For` is read.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Whether TLS 1.2 is refused (`min_tls_version = "1.3"`), where a policy asks for 1.3 only.
    pub tls13_only: bool,
}

/// How to reach the Redis server of a shared store (`[redis]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStorage {
    /// `redis://host:port/db` or `rediss://...`, without credentials.
    pub url: Url,
    /// The ACL user (none: `default`).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Where the password came from, for `check` (`password_file /run/secrets/x`).
    pub password_from: Option<String>,
    /// A PEM CA for `rediss://` (none: the system's trust store).
    pub ca_file: Option<PathBuf>,
    /// What every key starts with.
    pub prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

/// A secret read from a file or the environment: shown as `***` by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Whether `ip` is in one of `networks` (`proxy_protocol_from`, `trusted_proxies`): the one
/// test of a peer against a list of networks. An IPv4 address mapped into IPv6 (a dual-stack
/// listener's IPv4 peer) counts as IPv4.
pub fn in_networks(networks: &[ipnet::IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    networks.iter().any(|net| net.contains(&ip))
}

/// Bounds on every wait and size.
#[derive(Debug, Clone)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a response may make no progress toward its client (nginx's `send_timeout`).
    pub send_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// Connections one client address may hold open at once.
    pub max_connections_per_ip: usize,
    pub max_query_bytes: usize,
    pub max_body_bytes: u64,
}

/// Access-log settings.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// One line per request at info level (target `access`).
    pub access: bool,
    /// Hide codes, state, tokens and credentials (on by default; turn off only to debug locally).
    pub redact: bool,
    /// Keys the `flow` ids of access lines, so replicas agree; `None`: a random key per process.
    pub flow_key: Option<crate::flow::FlowKey>,
}

/// What `/readyz` checks beyond "every hostname has a currently valid certificate".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// Not ready when a certificate expires within this while nothing renews it: always for
    /// `files` and `self-signed`, for `acme` only while renewal keeps failing.
    pub cert_expiry_margin: Duration,
    /// How often each distinct upstream is probed (TLS handshake + one request); `None`: off.
    pub upstream_probe_interval: Option<Duration>,
    /// The path the probe requests; any HTTP status counts as reachable.
    pub upstream_probe_path: String,
    /// Longest time one probe may take before it counts as a failure.
    pub upstream_probe_timeout: Duration,
    /// Not ready once every probe of an upstream has failed for longer than this.
    pub upstream_unreachable_window: Duration,
    /// Skew against an upstream's `Date` header above this is reported (a line in `/readyz`).
    pub clock_skew_warn: Duration,
    /// Skew above this makes the relay not ready.
    pub clock_skew_fail: Duration,
}

/// One customer domain (one or more hostnames) in front of one upstream broker.
#[derive(Debug, Clone)]
pub struct Site {
    pub name: String,
    /// Lower-case DNS names; `*.example.com` matches one label.
    pub hostnames: Vec<String>,
    /// Answers ClientHellos without SNI (or with an IP literal) and requests whose Host is an IP.
    pub default: bool,
    pub upstream: Url,
    pub upstream_ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Whether an HTTP/1.1 upstream connection serves more than one exchange. Off by default:
    /// HTTP/1.1 cannot tell a late extra answer from the answer to the next request written on
    /// the same connection, so only a fresh connection guarantees that an answer reaches the
    /// request that caused it. HTTP/2 connections are always shared (stream ids tell answers
    /// apart).
    pub upstream_keepalive: bool,
    pub tls: TlsSource,
    /// Entra application (client) ids, lower-case GUIDs, that may name this site's domain as
    /// their publisher domain; empty: no `/.well-known/microsoft-identity-association.json`.
    pub application_ids: Vec<String>,
    pub callback: Callback,
    pub authorize: Authorize,
    pub token: Token,
}

/// Where a site's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// Generated at startup for the site's hostnames and kept in the store (local use).
    SelfSigned,
    /// PEM chain and key on disk, re-read when they change (cert-manager, certbot, ...).
    Files { cert: PathBuf, key: PathBuf, reload_interval: Duration },
    /// Issued and renewed automatically by an ACME CA (Let's Encrypt, ZeroSSL, step-ca, ...).
    Acme(Box<AcmeSettings>),
}

/// `source = "acme"`: which CA, which account, how to prove control of the hostnames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    /// The CA's ACME directory URL (`letsencrypt` and `letsencrypt-staging` resolved).
    pub directory: Url,
    /// Contact URIs for the account (`mailto:` + each configured email).
    pub contact: Vec<String>,
    /// External Account Binding (ZeroSSL, Google Trust Services, some private CAs).
    pub eab: Option<Eab>,
    /// ACME profile name, for CAs that offer profiles (e.g. Let's Encrypt's "shortlived").
    pub profile: Option<String>,
    /// The certificate key's algorithm.
    pub key_type: AcmeKeyType,
    /// When set, the directory's TLS is checked against this CA file only (Pebble, step-ca).
    pub directory_ca_file: Option<PathBuf>,
    /// How control of each hostname is proven.
    pub challenge: AcmeChallenge,
    /// Renew once less than this is left, instead of ARI or one third of the lifetime.
    pub renew_when_left: Option<Duration>,
    /// How often the store is re-read for certificates another replica renewed.
    pub poll_interval: Duration,
    /// First retry delay after a failed attempt; doubles (with jitter) up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How the CA is reached: `[outbound]`, filled in once the whole file is read.
    pub egress: crate::egress::Egress,
}

/// External Account Binding credentials. `Debug` never shows the HMAC key.
#[derive(Clone, PartialEq, Eq)]
pub struct Eab {
    pub key_id: String,
    /// The decoded HMAC key; a secret, never printed or logged.
    pub hmac_key: Vec<u8>,
}

impl std::fmt::Debug for Eab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Eab").field("key_id", &self.key_id).field("hmac_key", &"<set>").finish()
    }
}

/// The algorithm of certificate keys made for ACME orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeKeyType {
    EcdsaP256,
    EcdsaP384,
}

/// The ACME challenge type used to prove control of a hostname.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// Answered on the HTTPS listener (ALPN `acme-tls/1`): only port 443 must be reachable.
    TlsAlpn01,
    /// Answered on the plain-HTTP listener under `/.well-known/acme-challenge/`: port 80.
    Http01,
}

/// Redirect the browser to the upstream, or proxy the exchange through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Redirect,
    Proxy,
}

/// The OAuth redirect URI route.
#[derive(Debug, Clone)]
pub struct Callback {
    pub path: String,
    pub mode: Mode,
    pub status: StatusCode,
    pub form_post: bool,
    pub fragment_page: bool,
    pub upstream: Url,
}

/// The authorize routes.
#[derive(Debug, Clone)]
pub struct Authorize {
    pub paths: Vec<String>,
    pub mode: Mode,
    pub status: StatusCode,
    pub upstream: Url,
}

/// The token exchange route.
#[derive(Debug, Clone)]
pub struct Token {
    pub path_prefix: String,
    pub methods: Vec<Method>,
    pub upstream: Url,
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let read = |source| ConfigError::Read { file: file.clone(), source };
        let bytes = crate::fsutil::read_regular(path).map_err(read)?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            read(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8 text (byte {at})")))
        })?;
        Self::parse(&file, &text)
    }

    /// The built-in local configuration.
    pub fn embedded() -> Result<Config, ConfigError> {
        Self::parse(EMBEDDED_NAME, EMBEDDED_LOCAL)
    }

    /// Parses and validates TOML text; `file` is only used in messages.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let (raw, mut problems) = deserialize::raw(file, text);
        let Some(raw) = raw else { return Err(invalid(problems)) };
        let locator = locate::Locator::new(text);
        let mut v = Validator { file, locator, problems: Vec::new(), warnings: Vec::new() };
        let config = v.config(raw);
        problems.append(&mut v.problems);
        // Said once per key: a value the validator refused already has its own message.
        for p in deserialize::control_characters(file, text) {
            if !problems.iter().any(|q| q.key == p.key) {
                problems.push(p);
            }
        }
        match config {
            Some(mut config) if problems.is_empty() => {
                config.warnings = v.warnings;
                config.warnings.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
                Ok(config)
            }
            _ => Err(invalid(problems)),
        }
    }

    /// The site marked `default = true`, if any.
    pub fn default_site(&self) -> Option<&Site> {
        self.sites.iter().find(|s| s.default)
    }
}

impl Site {
    /// The redirect URI to register with the identity provider (Entra) and the broker, for each
    /// hostname: `https://{host}[:port]{callback.path}`.
    pub fn redirect_uris(&self, public_https_port: u16) -> Vec<String> {
        let port = if public_https_port == 443 { String::new() } else { format!(":{public_https_port}") };
        self.hostnames
            .iter()
            .filter(|h| !h.starts_with("*."))
            .map(|h| format!("https://{h}{port}{}", self.callback.path))
            .collect()
    }
}

/// The error for `problems`, sorted top to bottom (the order an operator fixes them in);
/// problems without a line come last.
fn invalid(mut problems: Vec<Problem>) -> ConfigError {
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    ConfigError::Invalid(problems)
}

mod validate;
use validate::Validator;
pub use validate::file_stem;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_peers_match_ipv4_networks() {
        let nets: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()];
        assert!(in_networks(&nets, "10.1.2.3".parse().unwrap()));
        assert!(in_networks(&nets, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(in_networks(&nets, "2001:db8::5".parse().unwrap()));
        assert!(!in_networks(&nets, "11.0.0.1".parse().unwrap()));
        assert!(!in_networks(&[], "10.1.2.3".parse().unwrap()));
    }

    mod properties {
        //! Whatever an operator writes, `parse` answers with a configuration or with problems
        //! that name the file, and a configuration it accepts holds only values the relay can
        //! run with.

        use proptest::prelude::*;

        use super::*;

        /// A TOML value of any kind an operator might write, odd ones included.
        fn value() -> impl Strategy<Value = String> {
            let text =
                || proptest::string::string_regex("[a-zA-Z0-9 ./:*_\\-\\[\\]\\x00-\\x1f\\u{e9}]{0,24}").expect("regex");
            let duration = (any::<u64>(), prop::sample::select(vec!["ns", "ms", "s", "m", "h", "d", "y", "", "x"]))
                .prop_map(|(n, unit)| format!("\"{n}{unit}\""));
            prop_oneof![
                text().prop_map(quoted),
                duration,
                any::<i64>().prop_map(|n| n.to_string()),
                any::<bool>().prop_map(|b| b.to_string()),
                prop::collection::vec(text().prop_map(quoted), 0..3).prop_map(|v| format!("[{}]", v.join(", "))),
            ]
        }

        /// A TOML string holding `t`.
        fn quoted(t: String) -> String {
            toml::Value::String(t).to_string()
        }

        /// Each of `keys` at most once, in order, with a value from `values`.
        fn lines(
            keys: &[&'static str],
            values: impl Strategy<Value = String> + Clone + 'static,
        ) -> BoxedStrategy<String> {
            prop::sample::subsequence(keys.to_vec(), 0..=keys.len().min(4))
                .prop_flat_map(move |keys| {
                    let n = keys.len();
                    (Just(keys), prop::collection::vec(values.clone(), n))
                })
                .prop_map(|(keys, values)| {
                    keys.iter().zip(&values).map(|(k, v)| format!("{k} = {v}\n")).collect::<String>()
                })
                .boxed()
        }

        /// `name` with lines of `key = value` for a subset of `keys`.
        fn table(name: &'static str, keys: &'static [&'static str]) -> impl Strategy<Value = String> {
            lines(keys, value().boxed()).prop_map(move |body| format!("{name}\n{body}"))
        }

        /// A number of any magnitude: mostly small (the usual kind of mistake), sometimes huge.
        fn magnitude() -> impl Strategy<Value = u64> {
            prop_oneof![6 => 0u64..100, 1 => 100u64..100_000, 1 => any::<u64>()]
        }

        /// A duration of any magnitude, or (rarer) any value at all.
        fn wait() -> BoxedStrategy<String> {
            let wait = (magnitude(), prop::sample::select(vec!["ms", "s", "m", "h", "d"]))
                .prop_map(|(n, unit)| format!("\"{n}{unit}\""));
            prop_oneof![4 => wait, 1 => value()].boxed()
        }

        /// `[limits]` with each key present or not: durations for the waits and numbers for the
        /// sizes.
        fn limits() -> impl Strategy<Value = String> {
            const WAITS: [&str; 5] =
                ["handshake_timeout", "header_read_timeout", "idle_timeout", "send_timeout", "shutdown_grace"];
            const SIZES: [&str; 5] =
                ["max_header_bytes", "max_connections", "max_connections_per_ip", "max_query_bytes", "max_body_bytes"];
            let size = prop_oneof![4 => magnitude().prop_map(|n| n.to_string()), 1 => value()].boxed();
            (lines(&WAITS, wait()), lines(&SIZES, size)).prop_map(|(w, s)| format!("[limits]\n{w}{s}"))
        }

        /// `[health]` with each wait present or not.
        fn health() -> impl Strategy<Value = String> {
            const WAITS: [&str; 6] = [
                "cert_expiry_margin",
                "upstream_probe_interval",
                "upstream_probe_timeout",
                "upstream_unreachable_window",
                "clock_skew_warn",
                "clock_skew_fail",
            ];
            lines(&WAITS, wait()).prop_map(|w| format!("[health]\n{w}"))
        }

        fn document() -> impl Strategy<Value = String> {
            const SERVER: &[&str] = &[
                "https",
                "http",
                "admin",
                "storage",
                "public_https_port",
                "hsts",
                "trusted_proxies",
                "min_tls_version",
            ];
            const SITE: &[&str] =
                &["name", "upstream", "default", "connect_timeout", "response_timeout", "upstream_keepalive"];
            let sometimes =
                |t: BoxedStrategy<String>, bare: &'static str| prop_oneof![3 => Just(bare.to_string()), 1 => t];
            (
                sometimes(table("[server]", SERVER).boxed(), ""),
                limits(),
                health(),
                sometimes(table("[[site]]", SITE).boxed(), "[[site]]\n"),
            )
                .prop_map(|(server, limits, health, site)| {
                    format!("{server}\n{limits}\n{health}\n{site}hostnames = [\"auth.example.test\"]\n")
                })
        }

        proptest! {
            #[test]
            fn any_document_is_a_configuration_or_problems_that_name_the_file(text in document()) {
                match Config::parse("p.toml", &text) {
                    Ok(c) => {
                        let l = &c.limits;
                        let now = std::time::Instant::now();
                        for d in [l.handshake_timeout, l.header_read_timeout, l.idle_timeout, l.send_timeout, l.shutdown_grace] {
                            prop_assert!(now.checked_add(d).is_some(), "{d:?} from\n{text}");
                        }
                        let h = &c.health;
                        let site = &c.sites[0];
                        for d in [h.cert_expiry_margin, h.upstream_probe_timeout, h.upstream_unreachable_window, h.clock_skew_warn, h.clock_skew_fail, site.connect_timeout, site.response_timeout]
                            .into_iter()
                            .chain(h.upstream_probe_interval)
                        {
                            prop_assert!(now.checked_add(d.saturating_mul(4)).is_some(), "{d:?} from\n{text}");
                        }
                        prop_assert!(u32::try_from(l.max_header_bytes * 4).is_ok(), "{}", l.max_header_bytes);
                        prop_assert!(l.max_connections_per_ip <= l.max_connections);
                    }
                    Err(ConfigError::Invalid(problems)) => {
                        prop_assert!(!problems.is_empty());
                        for p in problems {
                            prop_assert!(p.to_string().starts_with("p.toml"), "{p}");
                        }
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }
        }
    }
}
