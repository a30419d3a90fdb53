//! Metrics in the Prometheus text format, served at `GET /metrics` on the admin listener only
//! (see docs/metrics.md for every series).
//!
//! One process-wide registry ([`global`]) so that any call site (the relay, the accept loops,
//! the ACME tasks, a reload) counts without plumbing. The per-request path is lock-free and
//! allocation-free (see [`atomic`]); everything else counts through prometheus-client families,
//! whose label sets for the known values are created here up front so that they are exported as
//! `0` from the first scrape (a `rate()` or an alert then works before the first event).
//! Certificate expiry is read from the live certificate store at scrape time, so it is always
//! the certificate actually served.

mod atomic;

use std::error::Error as StdError;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::response::RouteName;
use atomic::{RequestCounts, RouteHistograms};

/// Every series name starts with this. (prometheus-client ends each help text with a period.)
pub const PREFIX: &str = "oauth_relay";

type Label = [(&'static str, &'static str); 1];
type Hostname = [(&'static str, String); 1];
type HostProblem = [(&'static str, String); 2];

/// How a request to the upstream failed (the `kind` label of `upstream_errors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// No TCP connection (refused, unreachable, connect timeout).
    Connect,
    /// The outbound proxy could not be reached, refused the tunnel (407, 403) or stayed silent.
    Proxy,
    /// No response within the site's `response_timeout`.
    Timeout,
    /// The TLS handshake with the upstream failed (certificate, protocol).
    Tls,
    /// The connection broke after it was made (reset, closed mid-response), or the answer broke
    /// HTTP and was refused (`101`, a status outside 200-599, both framings, an oversized head).
    Request,
    /// The upstream answered with a 5xx status.
    Status5xx,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 6] =
        [Self::Connect, Self::Proxy, Self::Timeout, Self::Tls, Self::Request, Self::Status5xx];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Proxy => "proxy",
            Self::Timeout => "timeout",
            Self::Tls => "tls",
            Self::Request => "request",
            Self::Status5xx => "status_5xx",
        }
    }

    /// Classifies a client error: proxy when the way through the outbound proxy failed, TLS when
    /// a rustls error is anywhere in its chain (hyper-rustls wraps it in an `io::Error`), else
    /// connect or request as the client says.
    pub fn of(error: &(dyn StdError + 'static), is_connect: bool) -> UpstreamErrorKind {
        let mut cur = Some(error);
        while let Some(e) = cur {
            let inner = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|i| i as &dyn StdError);
            if e.is::<crate::egress::ProxyError>() {
                return Self::Proxy;
            }
            if e.is::<rustls::Error>() || inner.is_some_and(|i| i.is::<rustls::Error>()) {
                return Self::Tls;
            }
            // `io::Error::source` skips the wrapped error itself, so step into it by hand.
            cur = inner.or_else(|| e.source());
        }
        if is_connect { Self::Connect } else { Self::Request }
    }
}

/// Which listener a connection came in on (the `listener` label of `open_connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Https,
    Http,
    Admin,
}

impl Listener {
    const ALL: [Listener; 3] = [Listener::Https, Listener::Http, Listener::Admin];

    fn as_str(self) -> &'static str {
        match self {
            Listener::Https => "https",
            Listener::Http => "http",
            Listener::Admin => "admin",
        }
    }
}

/// Handshake failure reasons exported from the start (see `tls::HandshakeError::reason`).
pub const HANDSHAKE_REASONS: [&str; 6] = ["timeout", "no_sni", "unknown_sni", "protocol_version", "tls_error", "io"];

/// Why a connection behind a load balancer was closed before its handshake, exported from the
/// start (see `ProxyHeaderError::reason`).
pub const PROXY_HEADER_REASONS: [&str; 6] = ["untrusted", "missing", "too_long", "closed", "timeout", "io"];

/// Why the relay closed a connection on its own (the `reason` label of `connection_closures`):
/// a deadline passed (`header_timeout`, `idle_timeout`, `send_timeout`), its client address
/// already held `max_connections_per_ip` (`per_ip_limit`), or it was idle when the relay ran
/// short of connection slots (`overload`).
pub const CLOSE_REASONS: [&str; 5] = ["header_timeout", "idle_timeout", "send_timeout", "per_ip_limit", "overload"];

/// The relay's metrics. Call sites use [`global`]; tests may make their own.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: RequestCounts,
    request_duration: RouteHistograms,
    upstream_duration: RouteHistograms,
    upstream_errors: [Counter; UpstreamErrorKind::ALL.len()],
    handshakes: Counter,
    handshake_failures: Family<Label, Counter>,
    proxy_header_failures: Family<Label, Counter>,
    connection_closures: Family<Label, Counter>,
    open_connections: [Gauge; Listener::ALL.len()],
    acme_orders: Family<Hostname, Counter>,
    acme_failures: Family<HostProblem, Counter>,
    acme_reregistrations: Counter,
    reloads: [Counter; 2],
    last_reload_ok: Gauge,
    last_reload_success: Gauge,
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    GLOBAL.get_or_init(Metrics::new)
}

/// Pre-creates one series per label value and returns them in that order.
fn precreate<M: Clone + Default, const N: usize>(
    family: &Family<Label, M>,
    key: &'static str,
    values: [&'static str; N],
) -> [M; N] {
    values.map(|v| family.get_or_create(&[(key, v)]).clone())
}

/// A counter family by `reason`, registered with every reason exported from the start.
fn by_reason<const N: usize>(
    r: &mut Registry,
    name: &str,
    help: &str,
    reasons: [&'static str; N],
) -> Family<Label, Counter> {
    let family = Family::<Label, Counter>::default();
    let _ = precreate(&family, "reason", reasons);
    r.register(name, help, family.clone());
    family
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with every series described.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix(PREFIX);
        r.register("build", "The relay's version", Info::new([("version", env!("CARGO_PKG_VERSION"))]));

        let requests = RequestCounts::new();
        r.register("requests", "Requests answered, by route and status", requests.clone());
        let request_duration = RouteHistograms::new();
        r.register_with_unit(
            "request_duration",
            "Time from request received to response headers ready, by route",
            Unit::Seconds,
            request_duration.clone(),
        );
        let upstream_duration = RouteHistograms::new();
        r.register_with_unit(
            "upstream_duration",
            "Time from request sent upstream to upstream response headers (or failure), by route",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        let errors = Family::<Label, Counter>::default();
        let upstream_errors = precreate(&errors, "kind", UpstreamErrorKind::ALL.map(UpstreamErrorKind::as_str));
        r.register("upstream_errors", "Upstream requests that failed or answered 5xx, by kind", errors);

        let handshakes = Counter::default();
        r.register("tls_handshakes", "TLS handshakes completed on the HTTPS listeners", handshakes.clone());
        let handshake_failures = by_reason(
            &mut r,
            "tls_handshake_failures",
            "TLS handshakes that did not complete, by reason",
            HANDSHAKE_REASONS,
        );
        let proxy_header_failures = by_reason(
            &mut r,
            "proxy_header_failures",
            "Connections closed for their PROXY protocol header (server.proxy_protocol_from), by reason",
            PROXY_HEADER_REASONS,
        );

        let connection_closures = by_reason(
            &mut r,
            "connection_closures",
            "Connections the relay closed on its own, by reason",
            CLOSE_REASONS,
        );

        let conns = Family::<Label, Gauge>::default();
        let open_connections = precreate(&conns, "listener", Listener::ALL.map(Listener::as_str));
        r.register("open_connections", "Connections open now, by listener", conns);

        let acme_orders = Family::<Hostname, Counter>::default();
        r.register("acme_orders", "ACME orders the CA accepted, by hostname", acme_orders.clone());
        let acme_failures = Family::<HostProblem, Counter>::default();
        r.register(
            "acme_order_failures",
            "Failed certificate attempts, by hostname and ACME problem type",
            acme_failures.clone(),
        );
        let acme_reregistrations = Counter::default();
        r.register(
            "acme_account_reregistrations",
            "New ACME accounts registered because the CA no longer knew the stored one",
            acme_reregistrations.clone(),
        );

        let reload_family = Family::<Label, Counter>::default();
        let reloads = precreate(&reload_family, "outcome", ["ok", "error"]);
        r.register("config_reloads", "Configuration reloads, by outcome", reload_family);
        let last_reload_ok = Gauge::default();
        last_reload_ok.set(1);
        r.register(
            "config_last_reload_successful",
            "1 when the last configuration reload (or the start) succeeded, else 0",
            last_reload_ok.clone(),
        );
        let last_reload_success = Gauge::default();
        last_reload_success.set(unix_seconds(SystemTime::now()));
        r.register_with_unit(
            "config_last_reload_success_timestamp",
            "When the configuration in force was loaded (start or last successful reload)",
            Unit::Seconds,
            last_reload_success.clone(),
        );
        Metrics {
            registry: r,
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            handshakes,
            handshake_failures,
            proxy_header_failures,
            connection_closures,
            open_connections,
            acme_orders,
            acme_failures,
            acme_reregistrations,
            reloads,
            last_reload_ok,
            last_reload_success,
        }
    }

    /// One answered request. Lock-free and allocation-free for the common statuses.
    #[inline]
    pub fn request(&self, route: RouteName, status: StatusCode, elapsed: Duration) {
        self.requests.inc(route, status.as_u16());
        self.request_duration.observe(route, elapsed);
    }

    /// How long the upstream took to answer (or to fail) a request of `route`.
    pub fn upstream_latency(&self, route: RouteName, elapsed: Duration) {
        self.upstream_duration.observe(route, elapsed);
    }

    /// One failed upstream request (or 5xx answer).
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        let i = UpstreamErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.upstream_errors[i].inc();
    }

    /// One completed TLS handshake.
    #[inline]
    pub fn handshake_ok(&self) {
        self.handshakes.inc();
    }

    /// One handshake that did not complete, for `reason` (one of [`HANDSHAKE_REASONS`]).
    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures.get_or_create(&[("reason", reason)]).inc();
    }

    /// A connection closed because its PROXY protocol header was missing, bad, late or from a
    /// peer not in `server.proxy_protocol_from`; `reason` is one of [`PROXY_HEADER_REASONS`].
    pub fn proxy_header_failed(&self, reason: &'static str) {
        self.proxy_header_failures.get_or_create(&[("reason", reason)]).inc();
    }

    /// The relay closed a connection on its own; `reason` is one of [`CLOSE_REASONS`].
    pub fn connection_closed(&self, reason: &'static str) {
        self.connection_closures.get_or_create(&[("reason", reason)]).inc();
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub fn connection_opened(&self, listener: Listener) -> OpenConnection<'_> {
        let gauge = &self.open_connections[listener as usize];
        gauge.inc();
        OpenConnection(gauge)
    }

    /// The CA accepted a new order for `hostname`.
    pub fn acme_order_placed(&self, hostname: &str) {
        self.acme_orders.get_or_create(&[("hostname", hostname.to_string())]).inc();
    }

    /// An attempt to get a certificate for `hostname` failed with `problem`: the ACME problem
    /// type the CA sent (`rateLimited`, `dns`...) or what failed on this side (`storage`...).
    pub fn acme_order_failed(&self, hostname: &str, problem: String) {
        let labels = [("hostname", hostname.to_string()), ("problem", problem)];
        self.acme_failures.get_or_create(&labels).inc();
    }

    /// The CA answered `accountDoesNotExist` and a new account was registered.
    pub fn acme_account_reregistered(&self) {
        self.acme_reregistrations.inc();
    }

    /// A configuration reload finished; `ok` is false when the new configuration was refused
    /// and the old one stays in force.
    pub fn config_reload(&self, ok: bool) {
        self.reloads[usize::from(!ok)].inc();
        self.last_reload_ok.set(i64::from(ok));
        if ok {
            self.last_reload_success.set(unix_seconds(SystemTime::now()));
        }
    }

    /// The exposition text: every registered series, then `not_after`, the expiry of each
    /// hostname's certificate (read by the caller at scrape time, so a certificate swapped a
    /// moment ago is the one reported).
    pub fn render<'a>(&self, not_after: impl IntoIterator<Item = (&'a str, SystemTime)>) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail; an encoding error would only truncate the text.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        let mut certs = Registry::with_prefix(PREFIX);
        let expiry = Family::<Hostname, Gauge>::default();
        for (hostname, at) in not_after {
            expiry.get_or_create(&[("hostname", hostname.to_string())]).set(unix_seconds(at));
        }
        certs.register_with_unit(
            "certificate_not_after",
            "When the certificate served for a hostname expires (seconds since the epoch)",
            Unit::Seconds,
            expiry,
        );
        let _ = prometheus_text::encode(&mut out, &certs);
        out
    }
}

/// What the relay's state says at scrape time, read by the admin listener like certificate
/// expiry rather than counted: readiness, the connection cap in force, the upstream probes.
#[derive(Debug, Default)]
pub struct Readings {
    /// Whether `/readyz` would answer 200 now.
    pub ready: bool,
    /// `limits.max_connections` of the configuration in force.
    pub max_connections: usize,
    /// One per probed upstream origin (none when `upstream_probe_interval` is off).
    pub upstreams: Vec<UpstreamReading>,
}

/// The last probe results for one upstream origin.
#[derive(Debug)]
pub struct UpstreamReading {
    /// The origin, `https://api.aurinko.io`.
    pub origin: String,
    /// False while its probes fail (from the first failure until a probe succeeds again).
    pub up: bool,
    /// Its clock minus ours, from the last probe answer with a `Date` header.
    pub skew_secs: Option<f64>,
}

impl Readings {
    /// The exposition text of these readings (appended after [`Metrics::render`]'s).
    pub fn render(&self) -> String {
        let mut r = Registry::with_prefix(PREFIX);
        let ready = Gauge::<i64>::default();
        ready.set(i64::from(self.ready));
        r.register("ready", "1 when /readyz answers 200 (ready), 0 when it answers 503", ready);
        let max = Gauge::<i64>::default();
        max.set(i64::try_from(self.max_connections).unwrap_or(i64::MAX));
        r.register("connections_max", "Connection slots of the public listeners (limits.max_connections)", max);
        let up = Family::<[(&'static str, String); 1], Gauge>::default();
        let skew = Family::<[(&'static str, String); 1], Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for u in &self.upstreams {
            let label = [("upstream", u.origin.clone())];
            up.get_or_create(&label).set(i64::from(u.up));
            if let Some(s) = u.skew_secs {
                skew.get_or_create(&label).set(s);
            }
        }
        r.register("upstream_up", "1 unless the last readiness probe of the upstream failed", up);
        r.register_with_unit(
            "upstream_clock_skew",
            "The upstream's clock minus this machine's, from its Date header at the last probe",
            Unit::Seconds,
            skew,
        );
        let mut out = String::with_capacity(1024);
        let _ = prometheus_text::encode(&mut out, &r);
        out
    }
}

/// Marks a connection open; dropping it (however the connection ends) marks it closed.
pub struct OpenConnection<'a>(&'a Gauge);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_error_inside_an_io_error_is_tls() {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert_eq!(UpstreamErrorKind::of(&io, true), UpstreamErrorKind::Tls);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(UpstreamErrorKind::of(&refused, true), UpstreamErrorKind::Connect);
        assert_eq!(UpstreamErrorKind::of(&refused, false), UpstreamErrorKind::Request);
    }

    #[test]
    fn readings_render_readiness_the_cap_and_each_probed_upstream() {
        let r = Readings {
            ready: false,
            max_connections: 500,
            upstreams: vec![
                UpstreamReading { origin: "https://api.aurinko.io".into(), up: false, skew_secs: Some(-42.5) },
                UpstreamReading { origin: "https://other.example".into(), up: true, skew_secs: None },
            ],
        };
        let text = r.render();
        for line in [
            "oauth_relay_ready 0",
            "oauth_relay_connections_max 500",
            "oauth_relay_upstream_up{upstream=\"https://api.aurinko.io\"} 0",
            "oauth_relay_upstream_up{upstream=\"https://other.example\"} 1",
            "oauth_relay_upstream_clock_skew_seconds{upstream=\"https://api.aurinko.io\"} -42.5",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        // No skew series for an upstream that never sent a Date header.
        assert!(!text.contains("oauth_relay_upstream_clock_skew_seconds{upstream=\"https://other.example\"}"));
    }

    #[test]
    fn reloads_and_connections_move_their_series() {
        let m = Metrics::new();
        m.config_reload(false);
        {
            let _c = m.connection_opened(Listener::Admin);
            assert_eq!(m.open_connections[2].get(), 1);
        }
        assert_eq!(m.open_connections[2].get(), 0);
        let mut text = String::new();
        prometheus_text::encode(&mut text, &m.registry).expect("encode");
        assert!(text.contains("\noauth_relay_config_reloads_total{outcome=\"error\"} 1\n"), "{text}");
        assert!(text.contains("\noauth_relay_config_last_reload_successful 0\n"), "{text}");
        assert!(text.contains("\noauth_relay_tls_handshake_failures_total{reason=\"no_sni\"} 0\n"), "{text}");
    }
}
