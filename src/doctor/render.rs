//! The doctor's report: one line per finding (level, check, message), the fix under each
//! warning and error, a count, then the exact strings to paste into Entra and the broker's
//! portal.

use std::fmt::Write;

use super::{Finding, Level};
use crate::config::Config;

/// The whole report for `findings` about `config`.
pub fn render(config: &Config, findings: &[Finding]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "oauth-relay doctor: {}\n", config.file);
    for f in findings {
        let _ = writeln!(out, "{:<8} {:<13} {}", f.level.to_string(), f.check, f.message);
        if let Some(fix) = &f.fix {
            let _ = writeln!(out, "{:<22} fix: {fix}", "");
        }
    }
    let count = |l: Level| findings.iter().filter(|f| f.level == l).count();
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    let _ = writeln!(
        out,
        "\n{} ok, {}, {}",
        count(Level::Ok),
        plural(count(Level::Warning), "warning"),
        plural(count(Level::Error), "error")
    );
    out.push_str(&paste(config));
    out
}

/// The "paste these" section: per site, the redirect URI for the Entra app registration and
/// the same URI as the redirect/callback URL in the broker's portal, one per line, nothing
/// else on the line, so it can be copied as is.
pub fn paste(config: &Config) -> String {
    let mut out = String::from("\npaste these\n");
    let port = config.server.public_https_port;
    for site in &config.sites {
        let _ = writeln!(out, "  site {}", site.name);
        crate::config::redirect_uris_block(&mut out, site, port);
    }
    out
}
