//! Upstream probes: is the broker reachable, and does its clock agree with ours?
//!
//! One background task per distinct upstream origin (a site's `upstream` and the per-route
//! overrides, with the CA file that checks them) opens a fresh connection every
//! `upstream_probe_interval`: TCP connect, TLS handshake with the same trust as the relay's
//! upstream client, one `GET upstream_probe_path`. Any HTTP status means reachable; a connect,
//! TLS or HTTP failure, or no response head within `upstream_probe_timeout`, means not. The
//! answer's `Date` header gives the clock skew. Results go into the target's state, which
//! `/readyz` only reads.
//!
//! The first probe runs one interval after start, so a restart does not add a burst of
//! requests upstream and short-lived test relays never reach it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::{Host, Url};

use super::{Readiness, human};
use crate::config::{Config, HealthSettings};
use crate::egress::Egress;

/// Why one probe failed; the text goes into `/readyz` and the log.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The connection could not be made (the error and its causes, on one line).
    #[error("connect: {0}")]
    Connect(String),
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    #[error("the upstream closed the connection without answering")]
    Closed,
    #[error("the probe request cannot be built: {0}")]
    Request(#[source] http::Error),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("{path}: cannot use the upstream CA file: {detail}")]
    CaFile { path: String, detail: String },
}

/// What a successful probe saw.
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    pub status: http::StatusCode,
    /// Upstream clock minus ours, in seconds, from the `Date` header (`None`: no usable header).
    pub skew_secs: Option<f64>,
}

/// The last results for one target.
#[derive(Debug, Default, Clone)]
struct State {
    /// When the first of the failures in a row happened; `None` after a success.
    failing_since: Option<Instant>,
    last_error: Option<String>,
    /// From the last successful probe that carried a `Date` header.
    skew_secs: Option<f64>,
}

/// One distinct upstream origin and what its probes found.
#[derive(Debug)]
pub struct Target {
    /// Identity across reloads: origin plus CA file.
    pub(super) key: String,
    /// The origin as shown in `/readyz` (`https://api.aurinko.io`).
    pub origin: String,
    https: bool,
    host: Host<String>,
    port: u16,
    ca_file: Option<PathBuf>,
    /// The origin as a URI, and how it is reached (`[outbound]`) within what bound.
    uri: http::Uri,
    egress: Egress,
    connect_timeout: Duration,
    state: ArcSwap<State>,
}

/// The distinct upstream origins of `config`, in configuration order.
pub fn targets(config: &Config) -> Vec<Arc<Target>> {
    let mut out: Vec<Arc<Target>> = Vec::new();
    for site in &config.sites {
        for url in [&site.upstream, &site.callback.upstream, &site.authorize.upstream, &site.token.upstream] {
            let timeout = config.health.upstream_probe_timeout;
            let Some(t) = Target::new(url, site.upstream_ca_file.clone(), &config.outbound, timeout) else { continue };
            if !out.iter().any(|o| o.key == t.key) {
                out.push(Arc::new(t));
            }
        }
    }
    out
}

impl Target {
    fn new(url: &Url, ca_file: Option<PathBuf>, egress: &Egress, connect_timeout: Duration) -> Option<Target> {
        let origin = url.origin().ascii_serialization();
        let uri: http::Uri = origin.parse().ok()?;
        let ca = ca_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let key = format!("{origin} {ca} {}", egress.describe(&uri));
        Some(Target {
            key,
            origin,
            https: url.scheme() == "https",
            host: url.host()?.to_owned(),
            port: url.port_or_known_default()?,
            ca_file,
            uri,
            egress: egress.clone(),
            connect_timeout,
            state: ArcSwap::from_pointee(State::default()),
        })
    }

    /// Continues from another configuration's results for the same target.
    pub(super) fn adopt(&self, previous: &Target) {
        self.state.store(previous.state.load_full());
    }

    /// Adds this target's reasons and notes to `r`, from its last results.
    pub(super) fn check(&self, settings: &HealthSettings, r: &mut Readiness) {
        let s = self.state.load();
        if let Some(since) = s.failing_since {
            let down = since.elapsed();
            if down > settings.upstream_unreachable_window {
                r.reasons.push(format!(
                    "upstream {} unreachable for {} (longer than upstream_unreachable_window {}); last error: {}",
                    self.origin,
                    human(down),
                    human(settings.upstream_unreachable_window),
                    s.last_error.as_deref().unwrap_or("-"),
                ));
            }
        }
        if let Some(skew) = s.skew_secs {
            let off = Duration::from_secs_f64(skew.abs());
            if off > settings.clock_skew_warn {
                let line = skew_line(&self.origin, skew, settings);
                if off > settings.clock_skew_fail { r.reasons.push(line) } else { r.notes.push(line) }
            }
        }
    }

    /// The last results, for `/metrics`.
    pub(super) fn reading(&self) -> crate::metrics::UpstreamReading {
        let s = self.state.load();
        crate::metrics::UpstreamReading {
            origin: self.origin.clone(),
            up: s.failing_since.is_none(),
            skew_secs: s.skew_secs,
        }
    }

    /// Records one probe's result and logs the changes an operator cares about.
    fn record(&self, result: Result<Observed, ProbeError>, settings: &HealthSettings) {
        let old = self.state.load_full();
        let new = match result {
            Ok(seen) => {
                if old.failing_since.is_some() {
                    tracing::info!(upstream = %self.origin, status = seen.status.as_u16(), "upstream reachable again");
                }
                let skew_secs = seen.skew_secs.or(old.skew_secs);
                if let Some(skew) = seen.skew_secs {
                    let above = |s: Option<f64>| s.is_some_and(|s| s.abs() > settings.clock_skew_warn.as_secs_f64());
                    if above(Some(skew)) && !above(old.skew_secs) {
                        tracing::warn!(upstream = %self.origin, "{}", skew_line(&self.origin, skew, settings));
                    }
                }
                State { failing_since: None, last_error: None, skew_secs }
            }
            Err(e) => {
                let msg = e.to_string();
                if old.failing_since.is_none() {
                    tracing::warn!(upstream = %self.origin, error = %msg, "upstream probe failed");
                } else {
                    tracing::debug!(upstream = %self.origin, error = %msg, "upstream probe failed again");
                }
                State {
                    failing_since: old.failing_since.or_else(|| Some(Instant::now())),
                    last_error: Some(msg),
                    skew_secs: old.skew_secs,
                }
            }
        };
        self.state.store(Arc::new(new));
    }

    /// A rustls client trusting what the relay's upstream client trusts (web PKI plus the
    /// site's CA file), HTTP/1.1 only.
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, ProbeError> {
        crate::egress::upstream_tls(self.ca_file.as_deref(), &[b"http/1.1"]).map(Arc::new).map_err(|e| {
            let path = self.ca_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            ProbeError::CaFile { path, detail: e.to_string() }
        })
    }

    /// One probe: a new connection, the handshake, one request, the response head.
    pub async fn probe(&self, path: &str) -> Result<Observed, ProbeError> {
        let tcp = self
            .egress
            .connect(&self.uri, self.connect_timeout)
            .await
            .map_err(|e| ProbeError::Connect(crate::egress::error_chain(&*e)))?;
        if !self.https {
            return self.exchange(tcp, path).await;
        }
        let name = match &self.host {
            Host::Domain(d) => ServerName::try_from(d.clone()),
            Host::Ipv4(ip) => Ok(ServerName::from(std::net::IpAddr::V4(*ip))),
            Host::Ipv6(ip) => Ok(ServerName::from(std::net::IpAddr::V6(*ip))),
        }
        .map_err(|e| ProbeError::Tls(std::io::Error::other(e)))?;
        let tls =
            tokio_rustls::TlsConnector::from(self.tls_config()?).connect(name, tcp).await.map_err(ProbeError::Tls)?;
        self.exchange(tls, path).await
    }

    async fn exchange<IO>(&self, io: IO, path: &str) -> Result<Observed, ProbeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(ProbeError::Http)?;
        let authority = match (&self.host, self.port) {
            (h, 443) if self.https => h.to_string(),
            (h, 80) if !self.https => h.to_string(),
            (h, p) => format!("{h}:{p}"),
        };
        let req = Request::get(path)
            .header(header::HOST, authority)
            .header(header::USER_AGENT, concat!("oauth-relay/", env!("CARGO_PKG_VERSION"), " (readiness probe)"))
            .body(Empty::<Bytes>::new())
            .map_err(ProbeError::Request)?;
        let sent = SystemTime::now();
        let mut conn = std::pin::pin!(conn);
        let mut send = std::pin::pin!(sender.send_request(req));
        // The connection future must be polled for the request to make progress. It can end
        // first even when the upstream answered, with `Connection: close`: the answer is then
        // waiting in `send`, which says whether one came.
        let resp = tokio::select! {
            biased;
            r = &mut send => r.map_err(ProbeError::Http)?,
            r = &mut conn => match r {
                Err(e) => return Err(ProbeError::Http(e)),
                Ok(()) => send.await.map_err(|_| ProbeError::Closed)?,
            },
        };
        let received = SystemTime::now();
        let date = resp.headers().get(header::DATE).and_then(|v| v.to_str().ok());
        let skew_secs = date.and_then(|d| httpdate::parse_http_date(d).ok()).map(|upstream| {
            // Compare with the middle of the exchange; `Date` has one-second resolution anyway.
            let ours = sent + received.duration_since(sent).unwrap_or_default() / 2;
            match upstream.duration_since(ours) {
                Ok(ahead) => ahead.as_secs_f64(),
                Err(behind) => -behind.duration().as_secs_f64(),
            }
        });
        Ok(Observed { status: resp.status(), skew_secs })
    }
}

/// The line that reports a skew: which way, how much, and what the thresholds mean.
fn skew_line(origin: &str, skew_secs: f64, settings: &HealthSettings) -> String {
    let way = if skew_secs >= 0.0 { "ahead of" } else { "behind" };
    format!(
        "clock skew: upstream {origin} says it is {} {way} this machine's clock (reported above clock_skew_warn {}, not ready above clock_skew_fail {})",
        human(Duration::from_secs_f64(skew_secs.abs())),
        human(settings.clock_skew_warn),
        human(settings.clock_skew_fail),
    )
}

/// Probes `target` every `every` (the first one interval after start) until `stop`.
pub(super) async fn run(target: Arc<Target>, settings: HealthSettings, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let limit = settings.upstream_probe_timeout;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(limit, target.probe(&settings.upstream_probe_path)) => {
                r.unwrap_or(Err(ProbeError::Timeout(limit)))
            }
        };
        target.record(result, &settings);
    }
}
