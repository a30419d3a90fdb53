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

/// The filter when `RUST_LOG` is unset or invalid (rustls kept quiet on top, as for any filter).
const DEFAULT_FILTER: &str = "info";

/// Libraries that warn about what any client can do, and the level they are kept at whenever
/// the filter does not name them itself; otherwise a filter such as `warn`, set to make the
/// logs quieter, would let any client add a line per connection. rustls warns on every
/// ClientHello that carries an IP literal as SNI (load-balancer probes, some clients); h2 on
/// every connection that resets too many streams (which the relay then refuses, as it should).
const QUIET: [(&str, &str); 2] = [("rustls", "rustls=error"), ("h2", "h2=error")];

/// Installs the global subscriber writing to stderr. Safe to call once per process.
pub fn init(format: LogFormat) {
    let filter = filter(std::env::var("RUST_LOG").ok().as_deref());
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

/// The filter for a `RUST_LOG` value ([`DEFAULT_FILTER`] when it is unset or invalid), with
/// each of [`QUIET`] added unless it names that library (`RUST_LOG=debug,rustls=debug`).
fn filter(rust_log: Option<&str>) -> EnvFilter {
    let (mut filter, spec) = match rust_log.map(|spec| (EnvFilter::try_new(spec), spec)) {
        Some((Ok(filter), spec)) => (filter, spec),
        _ => (EnvFilter::new(DEFAULT_FILTER), DEFAULT_FILTER),
    };
    for (library, quiet) in QUIET {
        if !names(spec, library) {
            if let Ok(quiet) = quiet.parse() {
                filter = filter.add_directive(quiet);
            }
        }
    }
    filter
}

/// Whether a filter has a directive for `library` or one of its modules.
fn names(spec: &str, library: &str) -> bool {
    spec.split(',').any(|directive| {
        let target = directive.split(['=', '[']).next().unwrap_or_default().trim();
        target == library || target.strip_prefix(library).is_some_and(|rest| rest.starts_with("::"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The lines `rust_log` lets through of a warning from rustls' handshake code (as rustls'
    /// `log` records arrive) and one from the relay.
    fn shown(rust_log: Option<&str>) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter(rust_log))
            .with_ansi(false)
            .without_time()
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "rustls::msgs::handshake", "Illegal SNI extension");
            tracing::warn!(target: "h2::proto::streams::recv", "GOAWAY: too many resets");
            tracing::warn!(target: "oauth_relay::server", "relay warning");
        });
        let bytes = out.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut b) = self.0.lock() {
                b.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_quieter_rust_log_keeps_rustls_and_h2_quiet() {
        for rust_log in [None, Some("warn"), Some("debug"), Some("oauth_relay=warn"), Some("not a filter[")] {
            let out = shown(rust_log);
            assert!(!out.contains("Illegal SNI"), "RUST_LOG={rust_log:?} showed rustls: {out}");
            assert!(!out.contains("too many resets"), "RUST_LOG={rust_log:?} showed h2: {out}");
            assert!(out.contains("relay warning"), "RUST_LOG={rust_log:?} hid the relay: {out}");
        }
    }

    #[test]
    fn rust_log_that_names_rustls_shows_it() {
        for rust_log in ["warn,rustls=warn", "rustls::msgs=debug,info", "rustls"] {
            let out = shown(Some(rust_log));
            assert!(out.contains("WARN rustls::msgs::handshake: Illegal SNI extension"), "RUST_LOG={rust_log}: {out}");
        }
        let out = shown(Some("warn,h2=warn"));
        assert!(out.contains("WARN h2::proto::streams::recv: GOAWAY: too many resets"), "{out}");
        assert!(!shown(Some("warn,h2x=warn")).contains("too many resets"), "h2x is not h2");
    }
}
