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
}

/// sysexits(3) EX_USAGE-style status for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 64;

fn load(path: &Option<PathBuf>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Config::embedded(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(c) => {
                print!("{}", oauth_relay::config::report(&c));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Serve { config, log_format } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
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
