//! The configuration file exactly as an operator writes it.
//!
//! These structs mirror the TOML keys one to one, carry the defaults an Aurinko user needs, and
//! reject unknown keys. They hold strings and numbers; [`super::validate`] turns them into the
//! typed [`super::Config`].

use std::time::Duration;

use serde::Deserialize;

/// The top level of the file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub outbound: RawOutbound,
    /// Read only when `server.storage` is a Redis URL; `None` when the table is absent.
    pub redis: Option<RawRedis>,
    #[serde(default)]
    pub site: Vec<RawSite>,
}

/// `[server]`: listeners and process-wide settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub https: Vec<String>,
    pub http: Vec<String>,
    pub admin: Option<String>,
    pub public_https_port: Option<u16>,
    pub storage: String,
    pub storage_key_file: Option<String>,
    pub hsts: String,
    pub proxy_protocol_from: Vec<String>,
    pub trusted_proxies: Vec<String>,
    /// "1.2" (default) or "1.3".
    pub min_tls_version: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            https: vec!["0.0.0.0:443".into()],
            http: Vec::new(),
            admin: None,
            public_https_port: None,
            storage: "certs".into(),
            storage_key_file: None,
            hsts: "max-age=31536000".into(),
            proxy_protocol_from: Vec::new(),
            trusted_proxies: Vec::new(),
            min_tls_version: "1.2".into(),
        }
    }
}

/// `[redis]`: how to reach the Redis server a `redis://` or `rediss://` storage names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    pub username: Option<String>,
    pub password_file: Option<String>,
    pub password_env: Option<String>,
    pub ca_file: Option<String>,
    pub prefix: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    pub cache: String,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            username: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            prefix: "oauth-relay".into(),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            cache: "certs".into(),
        }
    }
}

/// `[limits]`: the bounds on every wait and every size.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_query_bytes: usize,
    pub max_body_bytes: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            max_query_bytes: 8 * 1024,
            max_body_bytes: 64 * 1024,
        }
    }
}

/// `[log]`: what the access log says.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub access: bool,
    pub redact: bool,
    /// Secret (hex or base64) keying the flow ids; random per process when unset.
    pub flow_key: Option<String>,
}

impl Default for RawLog {
    fn default() -> Self {
        Self { access: true, redact: true, flow_key: None }
    }
}

/// `[health]`: what `/readyz` checks beyond "every hostname has a valid certificate".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    /// Not ready when a certificate expires within this and nothing will renew it in time.
    #[serde(with = "humantime_serde")]
    pub cert_expiry_margin: Duration,
    /// How often each distinct upstream is probed; "0s" turns probing off.
    #[serde(with = "humantime_serde")]
    pub upstream_probe_interval: Duration,
    /// The path requested by the probe (any HTTP status counts as reachable).
    pub upstream_probe_path: String,
    /// Longest time one probe (connect, TLS handshake, response head) may take.
    #[serde(with = "humantime_serde")]
    pub upstream_probe_timeout: Duration,
    /// Not ready once the upstream has failed every probe for longer than this.
    #[serde(with = "humantime_serde")]
    pub upstream_unreachable_window: Duration,
    /// `/readyz` reports the skew against an upstream's `Date` header above this.
    #[serde(with = "humantime_serde")]
    pub clock_skew_warn: Duration,
    /// Not ready above this skew (OAuth codes live about ten minutes).
    #[serde(with = "humantime_serde")]
    pub clock_skew_fail: Duration,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            cert_expiry_margin: Duration::from_secs(7 * 24 * 3600),
            upstream_probe_interval: Duration::from_secs(30),
            upstream_probe_path: "/".into(),
            upstream_probe_timeout: Duration::from_secs(5),
            upstream_unreachable_window: Duration::from_secs(120),
            clock_skew_warn: Duration::from_secs(30),
            clock_skew_fail: Duration::from_secs(300),
        }
    }
}

/// `[outbound]`: how the relay reaches upstreams and the ACME CA.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOutbound {
    /// "env" (HTTPS_PROXY and friends), "direct", or an `http://` proxy URL.
    pub proxy: String,
    /// With a proxy URL: destinations reached directly (curl's `NO_PROXY` entries).
    pub no_proxy: Vec<String>,
}

impl Default for RawOutbound {
    fn default() -> Self {
        Self { proxy: "env".into(), no_proxy: Vec::new() }
    }
}

/// `[[site]]`: one customer domain in front of one upstream broker.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    pub name: Option<String>,
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub default: bool,
    #[serde(default = "default_upstream")]
    pub upstream: String,
    pub upstream_ca_file: Option<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Application (client) ids of Entra app registrations that name this site's domain as
    /// their publisher domain: served as `/.well-known/microsoft-identity-association.json`.
    #[serde(default)]
    pub application_ids: Vec<String>,
    #[serde(default)]
    pub upstream_keepalive: bool,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub callback: RawCallback,
    #[serde(default)]
    pub authorize: RawAuthorize,
    #[serde(default)]
    pub token: RawToken,
}

fn default_upstream() -> String {
    "https://api.aurinko.io".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `[site.tls]`: where the site's certificate comes from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    pub source: String,
    pub cert: Option<String>,
    pub key: Option<String>,
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// `source = "acme"`: "letsencrypt", "letsencrypt-staging" or a directory URL.
    pub directory: Option<String>,
    /// `source = "acme"`: contact emails given to the CA.
    pub contact: Vec<String>,
    /// `source = "acme"`: the CA's terms of service are agreed (must be true).
    pub terms_agreed: bool,
    /// `source = "acme"`: External Account Binding key id.
    pub eab_key_id: Option<String>,
    /// `source = "acme"`: External Account Binding HMAC key (base64url); a secret.
    pub eab_hmac_key: Option<String>,
    /// `source = "acme"`: ACME profile name, where the CA offers profiles.
    pub profile: Option<String>,
    /// `source = "acme"`: "ecdsa-p256" (default) or "ecdsa-p384".
    pub key_type: Option<String>,
    /// `source = "acme"`: extra CA file that the directory's own TLS is checked against.
    pub directory_ca_file: Option<String>,
    /// `source = "acme"`: "tls-alpn-01" (default) or "http-01".
    pub challenge: Option<String>,
    /// `source = "acme"`: renew once less than this is left (instead of ARI or one third).
    #[serde(with = "humantime_serde")]
    pub renew_when_left: Option<Duration>,
    /// `source = "acme"`: first retry delay after a failed order (doubles up to `retry_max`).
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// `source = "acme"`: longest retry delay after failed orders.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            source: "self-signed".into(),
            cert: None,
            key: None,
            reload_interval: Duration::from_secs(5),
            directory: None,
            contact: Vec::new(),
            terms_agreed: false,
            eab_key_id: None,
            eab_hmac_key: None,
            profile: None,
            key_type: None,
            directory_ca_file: None,
            challenge: None,
            renew_when_left: None,
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(6 * 3600),
        }
    }
}

/// `[site.callback]`: the redirect URI registered with the identity provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCallback {
    pub path: String,
    pub mode: String,
    pub status: u16,
    pub form_post: bool,
    pub fragment_page: bool,
    pub upstream: Option<String>,
}

impl Default for RawCallback {
    fn default() -> Self {
        Self {
            path: "/v1/auth/callback".into(),
            mode: "redirect".into(),
            status: 302,
            form_post: true,
            fragment_page: true,
            upstream: None,
        }
    }
}

/// `[site.authorize]`: the broker's authorize endpoints under the customer's domain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuthorize {
    pub paths: Vec<String>,
    pub mode: String,
    pub status: u16,
    pub upstream: Option<String>,
}

impl Default for RawAuthorize {
    fn default() -> Self {
        Self {
            paths: vec![
                "/v1/auth/authorize".into(),
                "/v1/auth/authorizeDaemon".into(),
                "/v1/auth/authorizeUser".into(),
            ],
            mode: "redirect".into(),
            status: 302,
            upstream: None,
        }
    }
}

/// `[site.token]`: the code-for-token exchange, always proxied.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawToken {
    pub path_prefix: String,
    pub methods: Vec<String>,
    pub upstream: Option<String>,
}

impl Default for RawToken {
    fn default() -> Self {
        Self { path_prefix: "/v1/auth/token/".into(), methods: vec!["POST".into()], upstream: None }
    }
}
