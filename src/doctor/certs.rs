//! Each `files` site's certificate and key, read and matched as `serve` reads them at start:
//! a file that cannot be read, a key that does not belong to the certificate, a certificate
//! that does not name a hostname or is not valid now.

use std::time::SystemTime;

use super::Finding;
use crate::config::Config;

/// One finding per `files` site (none for other sources: `acme` and `self-signed` certificates
/// are made by the relay).
pub fn check(config: &Config) -> Vec<Finding> {
    let now = SystemTime::now();
    crate::tls::check_files(config)
        .into_iter()
        .map(|c| match c.loaded {
            Err(e) => Finding::error(
                "certificate",
                format!("site {}: {e}", c.site),
                "point site.tls.cert and site.tls.key at the PEM certificate chain (leaf first) and its private key",
            ),
            Ok(_) if !c.uncovered.is_empty() => Finding::error(
                "certificate",
                format!("site {}: the certificate does not name {}", c.site, c.uncovered.join(", ")),
                "use a certificate whose subjectAltName lists every hostname of the site",
            ),
            Ok(cert) if !cert.valid_at(now) => Finding::error(
                "certificate",
                format!(
                    "site {}: the certificate is not valid now (valid {} to {})",
                    c.site,
                    humantime::format_rfc3339_seconds(cert.not_before),
                    humantime::format_rfc3339_seconds(cert.not_after)
                ),
                "renew the certificate",
            ),
            Ok(cert) => Finding::ok(
                "certificate",
                format!(
                    "site {}: certificate and key match, serial {}, valid until {}",
                    c.site,
                    cert.serial,
                    humantime::format_rfc3339_seconds(cert.not_after)
                ),
            ),
        })
        .collect()
}
