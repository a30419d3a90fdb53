//! The `oauth-relay` command: parses the arguments and runs the subcommand ([`oauth_relay::cli`]).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use oauth_relay::cli;
use oauth_relay::logging::LogFormat;

/// An OAuth broker's callback, authorize and token endpoints on your own domain, over HTTPS.
#[derive(Parser)]
#[command(name = "oauth-relay", version = cli::VERSION, about)]
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
    /// Check that a configuration will work here: redirect URIs against Entra's rules, DNS,
    /// ports, storage, upstream TLS and the ACME directory; ends with the strings to paste.
    /// Exit status 1 when any check is an error.
    Doctor {
        /// The configuration file (default: the built-in config/local.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Make a running relay re-read its configuration file, through its admin listener
    /// (`[server] admin`); prints the relay's answer. Without an admin listener, send SIGHUP.
    Reload {
        /// The configuration file the relay runs with (read for `[server] admin`).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Automatic (ACME) certificates: status and forced renewal.
    Cert {
        #[command(subcommand)]
        action: CertCommand,
    },
    /// The certificate store: move it between a folder and Redis.
    Store {
        #[command(subcommand)]
        action: StoreCommand,
    },
    /// Print the completion script for SHELL (the Debian package installs them).
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (oauth-relay.1 and one per subcommand) into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
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

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy the ACME account, certificates, keys and renewal records from FROM to TO, one a
    /// folder and the other the Redis URL the configuration's `storage` names (its [redis]
    /// settings and storage key apply). TO must hold no store yet.
    Copy {
        #[arg(long, short)]
        config: PathBuf,
        /// A folder, or the configuration's redis:// or rediss:// URL.
        from: String,
        /// A folder, or the configuration's redis:// or rediss:// URL.
        to: String,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve { config, log_format } => cli::serve(config.as_deref(), log_format),
        Command::Check { config } => cli::check(config.as_deref()),
        Command::Doctor { config } => cli::doctor(config.as_deref()),
        Command::Reload { config } => cli::reload(&config),
        Command::Cert { action: CertCommand::Status { config } } => cli::cert_status(&config),
        Command::Cert { action: CertCommand::Renew { config, hostname, log_format } } => {
            cli::cert_renew(&config, &hostname, log_format)
        }
        Command::Store { action: StoreCommand::Copy { config, from, to } } => cli::store_copy(&config, &from, &to),
        Command::Completions { shell } => cli::completions(Cli::command(), shell),
        Command::Man { dir } => cli::man(Cli::command(), &dir),
    }
}
