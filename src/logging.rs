//! Log output: tracing with an env filter (`RUST_LOG`, default `info`) in a human or JSON
//! format. What goes into events is decided where they are emitted: no event carries an
//! authorization code, `state`, a token, a credential or a key.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable, for terminals.
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Info for the relay; rustls only on errors, since it warns on every ClientHello that carries an
/// IP literal as SNI (load-balancer probes, some clients) and the relay already handles that.
pub const DEFAULT_FILTER: &str = "info,rustls=error";

/// Installs the global subscriber writing to stderr. Safe to call once per process.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Colours only on a terminal: escape codes in a journal or a log file hide the fields.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Pretty => builder.compact().try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
