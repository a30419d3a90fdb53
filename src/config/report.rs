//! What `oauth-relay check` prints: the effective settings, the redirect URIs to register, and
//! the warnings.

use std::fmt::Write;

use super::{Config, Mode, TlsSource};

/// A human-readable summary of a validated configuration.
pub fn report(c: &Config) -> String {
    let mut out = String::new();
    let s = &c.server;
    let _ = writeln!(out, "{}: ok", c.file);
    let _ = writeln!(out, "\nserver");
    let _ = writeln!(out, "  https listeners     {}", joined(&s.https));
    let _ = writeln!(out, "  http listeners      {}", if s.http.is_empty() { "none".into() } else { joined(&s.http) });
    let _ = writeln!(out, "  admin listener      {}", s.admin.map(|a| a.to_string()).unwrap_or_else(|| "none".into()));
    let _ = writeln!(out, "  public https port   {}", s.public_https_port);
    match &s.shared {
        None => {
            let _ = writeln!(out, "  certificate store   {}", s.storage.display());
        }
        Some(r) => {
            let user = r.username.as_deref().map(|u| format!(", user {u}")).unwrap_or_default();
            let password = r.password_from.as_deref().map(|p| format!(", password from {p}")).unwrap_or_default();
            let sealed = match &s.storage_key_file {
                Some(f) => format!("keys sealed with {}", f.display()),
                None => "keys in clear".into(),
            };
            let _ = writeln!(
                out,
                "  certificate store   {} (prefix {}{user}{password}; {sealed}; cache {})",
                r.url,
                r.prefix,
                s.storage.display()
            );
        }
    }
    let _ = writeln!(out, "  hsts                {}", s.hsts.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("off"));
    let proxy = joined(&s.proxy_protocol_from);
    let _ = writeln!(
        out,
        "  proxy protocol      {}",
        if proxy.is_empty() { "off".into() } else { format!("from {proxy}") }
    );
    let trusted = joined(&s.trusted_proxies);
    let _ = writeln!(
        out,
        "  trusted proxies     {}",
        if trusted.is_empty() { "none (X-Forwarded-For is replaced)".into() } else { trusted }
    );
    let _ = writeln!(out, "  tls versions        {}", if s.tls13_only { "1.3" } else { "1.2, 1.3" });
    let _ = writeln!(out, "  outbound proxy      {}", c.outbound.summary());
    let l = &c.limits;
    let _ = writeln!(out, "\nlimits");
    let _ = writeln!(
        out,
        "  handshake {:?}, header read {:?}, idle {:?}, send {:?}, shutdown grace {:?}",
        l.handshake_timeout, l.header_read_timeout, l.idle_timeout, l.send_timeout, l.shutdown_grace
    );
    let _ = writeln!(
        out,
        "  max header {} B, max query {} B, max body {} B, max connections {} ({} per client address)",
        l.max_header_bytes, l.max_query_bytes, l.max_body_bytes, l.max_connections, l.max_connections_per_ip
    );
    log_and_health(&mut out, c);
    for site in &c.sites {
        let _ = writeln!(out, "\nsite {}{}", site.name, if site.default { " (default)" } else { "" });
        let _ = writeln!(out, "  hostnames           {}", site.hostnames.join(", "));
        let upstream = site.upstream.as_str().trim_end_matches('/');
        let route = upstream.parse().map(|u| c.outbound.describe(&u)).unwrap_or_else(|_| "direct".into());
        let _ = writeln!(out, "  upstream            {upstream} ({route})");
        let tls = match &site.tls {
            TlsSource::SelfSigned => "self-signed".to_string(),
            TlsSource::Files { cert, key, .. } => {
                format!("files ({}, {})", cert.display(), key.display())
            }
            TlsSource::Acme(a) => acme_line(a),
        };
        let _ = writeln!(out, "  certificate         {tls}");
        let mode = |m: Mode| {
            if m == Mode::Redirect { "redirect" } else { "proxy" }
        };
        let _ = writeln!(
            out,
            "  callback            {} ({}, {}) -> {}{}",
            site.callback.path,
            mode(site.callback.mode),
            site.callback.status.as_u16(),
            site.callback.upstream.as_str().trim_end_matches('/'),
            site.callback.path
        );
        for p in &site.authorize.paths {
            let _ = writeln!(
                out,
                "  authorize           {p} ({}) -> {}{p}",
                mode(site.authorize.mode),
                site.authorize.upstream.as_str().trim_end_matches('/')
            );
        }
        let methods: Vec<&str> = site.token.methods.iter().map(|m| m.as_str()).collect();
        let _ = writeln!(
            out,
            "  token               {}{{code}} ({}) -> {}{}{{code}}",
            site.token.path_prefix,
            methods.join(", "),
            site.token.upstream.as_str().trim_end_matches('/'),
            site.token.path_prefix
        );
        if !site.application_ids.is_empty() {
            let _ = writeln!(
                out,
                "  publisher domain    /.well-known/microsoft-identity-association.json for {}",
                site.application_ids.join(", ")
            );
        }
        register(&mut out, site, s.public_https_port);
    }
    if !c.warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings");
        for w in &c.warnings {
            let _ = writeln!(out, "  {w}");
        }
    }
    out
}

/// The `[log]` and `[health]` blocks: what the logs carry, and what `/readyz` checks.
fn log_and_health(out: &mut String, c: &Config) {
    let (log, h) = (&c.log, &c.health);
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let _ = writeln!(out, "\nlog");
    let _ = writeln!(out, "  access lines        {}", if log.access { "on (target access)" } else { "off" });
    let redaction = if log.redact {
        "on (no path, query, code, state, token or header value)"
    } else {
        "OFF: codes and state are written to the log as `uri` (debugging only)"
    };
    let _ = writeln!(out, "  redaction           {redaction}");
    let key = if log.flow_key.is_some() { "set" } else { "random per process" };
    let _ = writeln!(out, "  flow key            {key}");
    let _ = writeln!(out, "\nhealth");
    let _ = writeln!(
        out,
        "  certificate margin  not ready when one expires within {} and nothing renews it",
        d(h.cert_expiry_margin)
    );
    let probe = match h.upstream_probe_interval {
        Some(every) => format!(
            "every {}, path {}, timeout {}; not ready after {} unreachable",
            d(every),
            h.upstream_probe_path,
            d(h.upstream_probe_timeout),
            d(h.upstream_unreachable_window)
        ),
        None => "off".to_string(),
    };
    let _ = writeln!(out, "  upstream probe      {probe}");
    let _ = writeln!(
        out,
        "  clock skew          reported above {}, not ready above {}",
        d(h.clock_skew_warn),
        d(h.clock_skew_fail)
    );
}

/// Addresses or networks as one comma-separated line.
fn joined<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// The "register these" block of a site: the one URI that goes into the identity provider's app
/// registration and into the broker's portal, and the URLs the application itself calls.
fn register(out: &mut String, site: &super::Site, port: u16) {
    let _ = writeln!(out, "  register these");
    let uris = redirect_uris_block(out, site, port);
    let Some(first) = uris.first() else { return };
    let origin = first.strip_suffix(site.callback.path.as_str()).unwrap_or(first);
    let _ = writeln!(out, "    the application calls:");
    if let Some(p) = site.authorize.paths.first() {
        let _ = writeln!(out, "      authorize  {origin}{p}");
    }
    let _ = writeln!(out, "      token      {origin}{}{{code}}", site.token.path_prefix);
}

/// The redirect URIs of a site as two lists to paste: into the Entra app registration and into
/// the broker's portal (the same URI); for wildcard-only sites, the pattern to register for each
/// name. Shared by `check` and `doctor`. Returns the URIs.
pub fn redirect_uris_block(out: &mut String, site: &super::Site, port: u16) -> Vec<String> {
    let uris = site.redirect_uris(port);
    if uris.is_empty() {
        let _ = writeln!(
            out,
            "    (wildcard hostnames only: register https://NAME{}{} for each name in use)",
            if port == 443 { String::new() } else { format!(":{port}") },
            site.callback.path
        );
        return uris;
    }
    let _ = writeln!(out, "    redirect URI in the Entra app registration (Authentication > Web > Redirect URIs):");
    for uri in &uris {
        let _ = writeln!(out, "      {uri}");
    }
    let _ = writeln!(out, "    callback / return URL in the broker's portal (the same URI):");
    for uri in &uris {
        let _ = writeln!(out, "      {uri}");
    }
    uris
}

/// The `certificate` line of an ACME site. The EAB HMAC key is a secret: only "set" is shown.
fn acme_line(a: &super::AcmeSettings) -> String {
    let challenge = match a.challenge {
        super::AcmeChallenge::TlsAlpn01 => "tls-alpn-01 (HTTPS port must be reachable from the CA)",
        super::AcmeChallenge::Http01 => "http-01 (port 80 must be reachable from the CA)",
    };
    let key = match a.key_type {
        super::AcmeKeyType::EcdsaP256 => "ecdsa-p256",
        super::AcmeKeyType::EcdsaP384 => "ecdsa-p384",
    };
    let mut out = format!("acme {}\n", a.directory);
    let mut line = |k: &str, v: &str| {
        let _ = writeln!(out, "    {k:<18}{v}");
    };
    let contact = a.contact.iter().map(|c| c.trim_start_matches("mailto:")).collect::<Vec<_>>().join(", ");
    line("contact", if contact.is_empty() { "none" } else { &contact });
    line("challenge", challenge);
    line("key type", key);
    if let Some(p) = &a.profile {
        line("profile", p);
    }
    if let Some(eab) = &a.eab {
        line("eab key id", &eab.key_id);
        line("eab hmac key", "set");
    }
    if let Some(f) = &a.directory_ca_file {
        line("directory CA", &f.display().to_string());
    }
    if let Some(d) = a.renew_when_left {
        line("renew when left", &humantime::format_duration(d).to_string());
    }
    out.trim_end().to_string()
}
