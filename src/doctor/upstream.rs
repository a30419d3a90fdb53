//! Upstreams: each answers over TLS and its certificate is valid for the relay, which trusts the
//! same roots as the relay's upstream client (web PKI plus the site's `upstream_ca_file`).
//! The finding reports the TLS version and when the certificate expires. A plain `http://`
//! upstream is a warning (codes and tokens cross the network unencrypted).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use url::{Host, Url};

use super::Finding;
use crate::config::Config;
use crate::egress::Egress;

const CHECK: &str = "upstream";
/// A certificate with less left than this is reported as a warning.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// One upstream origin and the CA file it is checked with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `scheme://host:port`, without path.
    pub origin: Url,
    pub ca_file: Option<PathBuf>,
    /// How it is reached (`[outbound]`).
    pub egress: Egress,
}

/// The distinct upstream origins of every site: the site's upstream and any per-route one.
pub fn targets(config: &Config) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    for site in &config.sites {
        for url in [&site.upstream, &site.callback.upstream, &site.authorize.upstream, &site.token.upstream] {
            let mut origin = url.clone();
            origin.set_path("");
            let t = Target { origin, ca_file: site.upstream_ca_file.clone(), egress: config.outbound.clone() };
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

/// Connects to `target` and, for https, completes a TLS handshake, all within `timeout`.
pub async fn check_target(target: Target, timeout: Duration) -> Finding {
    check(&target.origin, target.ca_file.as_deref(), &target.egress, timeout).await
}

/// Connects to `url` (its host and port, through `egress`) and, for https, completes a TLS
/// handshake trusting the web PKI roots plus `ca_file`, all within `timeout`.
pub async fn check(url: &Url, ca_file: Option<&Path>, egress: &Egress, timeout: Duration) -> Finding {
    let bare = url.as_str().trim_end_matches('/');
    let (Some(host), Some(_), Ok(uri)) = (url.host(), url.port_or_known_default(), bare.parse::<http::Uri>()) else {
        return Finding::error(CHECK, format!("{bare}: no host or port"), "set an https:// upstream URL");
    };
    let shown = match egress.route(&uri) {
        None => bare.to_string(),
        Some(_) => format!("{bare} ({})", egress.describe(&uri)),
    };
    let shown = shown.as_str();
    let host = host.to_owned();
    let connect = || egress.connect(&uri, timeout);
    if url.scheme() == "http" {
        return match tokio::time::timeout(timeout, connect()).await {
            Ok(Ok(_)) => Finding::warning(
                CHECK,
                format!("{shown} answers over plain http://; codes and tokens cross the network unencrypted"),
                "use an https:// upstream (plain http:// is meant for a loopback benchmark)",
            ),
            Ok(Err(e)) => unreachable(shown, &crate::egress::error_chain(&*e)),
            Err(_) => unreachable(shown, &format!("no connection within {timeout:?}")),
        };
    }
    let tls = match client_config(ca_file) {
        Ok(c) => c,
        Err(why) => return Finding::error(CHECK, format!("{shown}: {why}"), "fix `upstream_ca_file` (a PEM CA file)"),
    };
    let name = match &host {
        Host::Domain(d) => ServerName::try_from(d.clone()),
        Host::Ipv4(ip) => Ok(ServerName::from(std::net::IpAddr::V4(*ip))),
        Host::Ipv6(ip) => Ok(ServerName::from(std::net::IpAddr::V6(*ip))),
    };
    let Ok(name) = name else {
        return Finding::error(
            CHECK,
            format!("{shown}: the host is not a valid TLS server name"),
            "fix the upstream URL",
        );
    };
    let handshake = async {
        let tcp = connect().await.map_err(|e| Failed::Connect(crate::egress::error_chain(&*e)))?;
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(Failed::Tls)
    };
    match tokio::time::timeout(timeout, handshake).await {
        Err(_) => Finding::error(
            CHECK,
            format!("{shown}: no TLS handshake within {timeout:?}"),
            "check that the upstream URL points at an HTTPS server and that no firewall drops the traffic",
        ),
        Ok(Err(Failed::Connect(e))) => unreachable(shown, &e),
        Ok(Err(Failed::Tls(e))) => handshake_failed(shown, &e),
        Ok(Ok(stream)) => handshake_done(shown, stream.get_ref().1),
    }
}

/// Where a check stopped: before the TLS handshake (with the whole error chain), or in it.
enum Failed {
    Connect(String),
    Tls(std::io::Error),
}

fn unreachable(shown: &str, why: &str) -> Finding {
    Finding::error(
        CHECK,
        format!("{shown} cannot be reached: {why}"),
        "check the upstream URL, this machine's outbound firewall and DNS",
    )
}

fn handshake_failed(shown: &str, e: &std::io::Error) -> Finding {
    let cert = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
    let fix = if cert {
        "if the upstream uses a private CA, set `upstream_ca_file` to its PEM file; otherwise the upstream must \
         serve a valid certificate for this name"
    } else {
        "check that the upstream URL points at an HTTPS server that accepts TLS 1.2 or 1.3"
    };
    Finding::error(CHECK, format!("{shown}: TLS handshake failed: {e}"), fix)
}

fn handshake_done(shown: &str, conn: &rustls::ClientConnection) -> Finding {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_string(),
        other => format!("{other:?}"),
    };
    let not_after = conn.peer_certificates().and_then(|c| c.first()).and_then(|leaf| {
        use x509_parser::prelude::*;
        let (_, x) = X509Certificate::from_der(leaf.as_ref()).ok()?;
        let secs = u64::try_from(x.validity().not_after.timestamp()).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    });
    let Some(not_after) = not_after else {
        return Finding::ok(CHECK, format!("{shown}: {version}, certificate valid"));
    };
    let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
    let when = humantime::format_rfc3339_seconds(not_after);
    let days = left.as_secs() / 86_400;
    if left < EXPIRY_WARNING {
        Finding::warning(
            CHECK,
            format!("{shown}: {version}, certificate valid but expires {when} ({days} days left)"),
            "tell the upstream's operator; the relay's requests fail once it expires",
        )
    } else {
        Finding::ok(CHECK, format!("{shown}: {version}, certificate valid until {when} ({days} days left)"))
    }
}

/// The relay's upstream trust: web PKI roots plus the site's CA file.
fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    crate::egress::upstream_tls(ca_file, &[b"h2", b"http/1.1"]).map(Arc::new).map_err(|e| e.to_string())
}
