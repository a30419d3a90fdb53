//! ACME directories: each answers (through the same HTTP client and trust as the relay's ACME
//! client, `crate::acme::client::http_client`), and what it offers: ARI (`renewalInfo`, RFC
//! 9773: the CA says when to renew) and profiles (`meta.profiles`). A configured `profile` the
//! CA does not offer, or an EAB the CA requires but the config lacks, would fail every order.

use std::time::Duration;

use bytes::Bytes;
use instant_acme::BodyWrapper;

use super::Finding;
use crate::config::{AcmeSettings, Config, TlsSource};

const CHECK: &str = "acme";

/// The distinct ACME settings of the configuration (one check per directory and CA file).
pub fn targets(config: &Config) -> Vec<AcmeSettings> {
    let mut out: Vec<AcmeSettings> = Vec::new();
    for site in &config.sites {
        if let TlsSource::Acme(a) = &site.tls {
            let seen = out.iter().any(|o| {
                o.directory == a.directory && o.directory_ca_file == a.directory_ca_file && o.profile == a.profile
            });
            if !seen {
                out.push((**a).clone());
            }
        }
    }
    out
}

/// GETs the directory of `settings` within `timeout` and reports what it offers.
pub async fn check_directory(settings: AcmeSettings, timeout: Duration) -> Vec<Finding> {
    let url = settings.directory.as_str();
    let client = match crate::acme::client::http_client(settings.directory_ca_file.as_deref(), &settings.egress) {
        Ok(c) => c,
        Err(e) => return vec![Finding::error(CHECK, format!("{url}: {e}"), "fix `directory_ca_file` (a PEM CA file)")],
    };
    let request = http::Request::get(url).body(BodyWrapper::<Bytes>::default());
    let Ok(request) = request else {
        return vec![Finding::error(CHECK, format!("{url}: not a request URL"), "fix `directory`")];
    };
    let fetched = tokio::time::timeout(timeout, async {
        let mut response = client.request(request).await.map_err(|e| e.to_string())?;
        let body = response.body.into_bytes().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((response.parts.status, body))
    })
    .await;
    let unreachable_fix = "check the `directory` URL, `directory_ca_file` and this machine's outbound firewall";
    let (status, body) = match fetched {
        Err(_) => return vec![Finding::error(CHECK, format!("{url}: no answer within {timeout:?}"), unreachable_fix)],
        Ok(Err(e)) => return vec![Finding::error(CHECK, format!("{url} cannot be reached: {e}"), unreachable_fix)],
        Ok(Ok(r)) => r,
    };
    if status != http::StatusCode::OK {
        return vec![Finding::error(CHECK, format!("{url} answered {status}"), "check the `directory` URL")];
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(dir) => offers(&settings, &dir),
        Err(e) => {
            vec![Finding::error(CHECK, format!("{url} did not answer with JSON: {e}"), "check the `directory` URL")]
        }
    }
}

/// What an answered directory `dir` offers, and whether `settings` can use it. Pure.
pub fn offers(settings: &AcmeSettings, dir: &serde_json::Value) -> Vec<Finding> {
    let url = settings.directory.as_str();
    let missing: Vec<&str> = ["newNonce", "newAccount", "newOrder"]
        .into_iter()
        .filter(|k| dir.get(*k).and_then(|v| v.as_str()).is_none())
        .collect();
    if !missing.is_empty() {
        return vec![Finding::error(
            CHECK,
            format!("{url} is not an ACME directory (no {})", missing.join(", ")),
            "set `directory` to the CA's ACME directory URL",
        )];
    }
    let mut out = vec![Finding::ok(CHECK, format!("{url} answers"))];
    out.push(if dir.get("renewalInfo").and_then(|v| v.as_str()).is_some() {
        Finding::ok(CHECK, format!("{url} offers ARI (renewalInfo): the CA's renewal window is followed"))
    } else {
        Finding::ok(
            CHECK,
            format!("{url} offers no ARI (renewalInfo): renewal starts with one third of the lifetime left"),
        )
    });
    let meta = dir.get("meta");
    let profiles: Vec<String> = meta
        .and_then(|m| m.get("profiles"))
        .and_then(|p| p.as_object())
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    out.push(match (&settings.profile, profiles.is_empty()) {
        (None, true) => Finding::ok(CHECK, format!("{url} offers no profiles")),
        (None, false) => Finding::ok(CHECK, format!("{url} offers profiles: {} (none chosen)", profiles.join(", "))),
        (Some(p), _) if profiles.contains(p) => {
            Finding::ok(CHECK, format!("{url} offers profiles: {}; `{p}` is used", profiles.join(", ")))
        }
        (Some(p), true) => Finding::error(
            CHECK,
            format!("{url} offers no profiles, but `profile = \"{p}\"` is set; every order would fail"),
            "remove `profile` from [site.tls]",
        ),
        (Some(p), false) => Finding::error(
            CHECK,
            format!("{url} does not offer profile `{p}`; it offers {}", profiles.join(", ")),
            format!("set `profile` to one of: {}", profiles.join(", ")),
        ),
    });
    let eab_required = meta.and_then(|m| m.get("externalAccountRequired")).and_then(|v| v.as_bool()) == Some(true);
    if eab_required && settings.eab.is_none() {
        out.push(Finding::error(
            CHECK,
            format!("{url} requires External Account Binding, and none is configured"),
            "set `eab_key_id` and `eab_hmac_key` from the CA's account page",
        ));
    }
    out
}
