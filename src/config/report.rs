//! What `oauth-relay check` prints: the effective settings, the redirect URIs to register, and
//! the warnings.

use std::fmt::Write;

use super::{Config, Mode, TlsSource};

/// A human-readable summary of a validated configuration.
pub fn report(c: &Config) -> String {
    let mut out = String::new();
    let s = &c.server;
    let list = |v: &[std::net::SocketAddr]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
    let _ = writeln!(out, "{}: ok", c.file);
    let _ = writeln!(out, "\nserver");
    let _ = writeln!(out, "  https listeners     {}", list(&s.https));
    let _ = writeln!(out, "  http listeners      {}", if s.http.is_empty() { "none".into() } else { list(&s.http) });
    let _ = writeln!(out, "  admin listener      {}", s.admin.map(|a| a.to_string()).unwrap_or_else(|| "none".into()));
    let _ = writeln!(out, "  public https port   {}", s.public_https_port);
    let _ = writeln!(out, "  certificate store   {}", s.storage.display());
    let _ = writeln!(out, "  hsts                {}", s.hsts.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("off"));
    let l = &c.limits;
    let _ = writeln!(out, "\nlimits");
    let _ = writeln!(
        out,
        "  handshake {:?}, header read {:?}, idle {:?}, shutdown grace {:?}",
        l.handshake_timeout, l.header_read_timeout, l.idle_timeout, l.shutdown_grace
    );
    let _ = writeln!(
        out,
        "  max header {} B, max query {} B, max body {} B, max connections {}",
        l.max_header_bytes, l.max_query_bytes, l.max_body_bytes, l.max_connections
    );
    for site in &c.sites {
        let _ = writeln!(out, "\nsite {}{}", site.name, if site.default { " (default)" } else { "" });
        let _ = writeln!(out, "  hostnames           {}", site.hostnames.join(", "));
        let _ = writeln!(out, "  upstream            {}", site.upstream);
        let tls = match &site.tls {
            TlsSource::SelfSigned => "self-signed".to_string(),
            TlsSource::Files { cert, key, .. } => {
                format!("files ({}, {})", cert.display(), key.display())
            }
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
        let _ = writeln!(out, "  redirect URI to register in the Entra app registration and the broker's portal:");
        for uri in site.redirect_uris(s.public_https_port) {
            let _ = writeln!(out, "    {uri}");
        }
    }
    if !c.warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings");
        for w in &c.warnings {
            let _ = writeln!(out, "  {w}");
        }
    }
    out
}
