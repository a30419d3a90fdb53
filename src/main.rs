//! The `oauth-relay` command: parse arguments, load the config, set up logging, bind, run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use oauth_relay::logging::{self, LogFormat};
use oauth_relay::{Config, Listeners, config::ConfigError};

/// An OAuth broker's callback, authorize and token endpoints on your own domain, over HTTPS.
#[derive(Parser)]
#[command(name = "oauth-relay", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve {
        /// The configuration file; without it, the built-in config/local.toml
        /// (https://localhost:8443, self-signed, upstream https://api.aurinko.io).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log line format.
        #[arg(long, value_enum, default_value = "pretty")]
        log_format: LogFormat,
    },
    /// Validate a configuration, print the effective settings and the redirect URIs to register.
    Check {
        /// The configuration file (default: the built-in config/local.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Automatic (ACME) certificates: status and forced renewal.
    Cert {
        #[command(subcommand)]
        action: CertCommand,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Per ACME hostname: issuer, serial, not-after, next renewal, last error (from the store).
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Renew one hostname now, through the same lock as the running relays; they answer the
    /// challenge and load the new certificate from the shared store.
    Renew {
        #[arg(long, short)]
        config: PathBuf,
        /// The hostname to renew.
        hostname: String,
        /// Log line format.
        #[arg(long, value_enum, default_value = "pretty")]
        log_format: LogFormat,
    },
}

/// sysexits(3) EX_USAGE-style status for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 64;

fn load(path: &Option<PathBuf>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Config::embedded(),
    }
}

/// Prints every problem of a refused configuration, one `file:line: key: message` per line,
/// then how many there were, and gives the exit status for it.
fn config_failed(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    if let ConfigError::Invalid(problems) = e {
        let n = problems.len();
        eprintln!("{n} problem{} found; nothing was started", if n == 1 { "" } else { "s" });
    }
    ExitCode::from(EXIT_CONFIG)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Cert { action } => cert(action),
        Command::Check { config } => match load(&config) {
            Ok(c) => {
                print!("{}", oauth_relay::config::report(&c));
                ExitCode::SUCCESS
            }
            Err(e) => config_failed(&e),
        },
        Command::Serve { config, log_format } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(e) => return config_failed(&e),
            };
            logging::init(log_format);
            match serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit raised"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        for l in &listeners.https {
            tracing::info!(addr = %l.local_addr()?, "serving HTTPS");
        }
        for l in &listeners.http {
            tracing::info!(addr = %l.local_addr()?, "serving plain HTTP (redirects to HTTPS)");
        }
        if let Some(l) = &listeners.admin {
            tracing::info!(addr = %l.local_addr()?, "serving admin (health)");
        }
        oauth_relay::run(Arc::new(config), listeners, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `cert status` and `cert renew`.
fn cert(action: CertCommand) -> ExitCode {
    let path = match &action {
        CertCommand::Status { config } | CertCommand::Renew { config, .. } => config.clone(),
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    match action {
        CertCommand::Status { .. } => {
            print!("{}", oauth_relay::acme::status_report(&config));
            ExitCode::SUCCESS
        }
        CertCommand::Renew { hostname, log_format, .. } => {
            logging::init(log_format);
            let renewed = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")
                .and_then(|rt| Ok(rt.block_on(oauth_relay::acme::renew_now(&config, &hostname))?));
            match renewed {
                Ok(meta) => {
                    println!(
                        "{}: renewed, serial {}, not after {}",
                        meta.hostname,
                        meta.serial,
                        humantime::format_rfc3339_seconds(meta.not_after)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{hostname}: not renewed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
