//! What each subcommand of the `oauth-relay` binary does, and the exit status it ends with:
//! 0 done, 1 a runtime failure, 64 a configuration that cannot be used (sysexits' EX_USAGE
//! style; systemd's unit does not restart on it). `main.rs` parses the arguments and calls
//! one of these. This is the program's edge: errors end here as a line for a person.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::{Config, ConfigError};
use crate::logging::{self, LogFormat};
use crate::{Listeners, reload};

/// The exit status for a configuration that cannot be used.
pub const EXIT_CONFIG: u8 = 64;

/// The configuration at `path`, or the built-in one.
fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
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

/// An error and its causes on one line, as `{:#}` prints them, except that a cause its error
/// already quotes is not repeated: this crate's errors name their source in their own message.
fn causes(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
    }
    line
}

/// `check`: the effective settings and the redirect URIs to register. A `files` certificate
/// and key that can be read but that `serve` could not load make it fail as a bad
/// configuration does; files it cannot read are a warning (`check` often runs on another
/// machine than the relay; `doctor`, run where the relay runs, makes them an error).
pub fn check(path: Option<&Path>) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    let mut refused = 0;
    for c in crate::tls::check_files(&config) {
        match &c.loaded {
            Err(e @ crate::tls::TlsError::Read { .. }) => {
                eprintln!(
                    "{}: site {}: warning: site.tls: {e}; `serve` will refuse to start without it",
                    config.file, c.site
                );
            }
            Err(e) => {
                eprintln!("{}: site {}: site.tls: {e}", config.file, c.site);
                refused += 1;
            }
            Ok(_) if !c.uncovered.is_empty() => {
                eprintln!(
                    "{}: site {}: warning: the certificate does not name {}; clients will reject it there",
                    config.file,
                    c.site,
                    c.uncovered.join(", ")
                );
            }
            Ok(cert) if !cert.valid_at(std::time::SystemTime::now()) => {
                eprintln!(
                    "{}: site {}: warning: the certificate is not valid now (valid {} to {}); clients will reject it",
                    config.file,
                    c.site,
                    humantime::format_rfc3339_seconds(cert.not_before),
                    humantime::format_rfc3339_seconds(cert.not_after)
                );
            }
            Ok(_) => {}
        }
    }
    if refused > 0 {
        eprintln!("{refused} problem{} found; nothing was started", if refused == 1 { "" } else { "s" });
        return ExitCode::from(EXIT_CONFIG);
    }
    print!("{}", crate::config::report(&config));
    ExitCode::SUCCESS
}

/// `doctor`: every check, the report with the strings to paste, status 1 on any error.
pub fn doctor(path: Option<&Path>) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let findings = runtime.block_on(crate::doctor::run(&config));
    print!("{}", crate::doctor::render(&config, &findings));
    ExitCode::from(crate::doctor::exit_status(&findings))
}

/// `serve`: the relay, until SIGTERM or SIGINT; SIGHUP reloads.
pub fn serve(path: Option<&Path>, log_format: LogFormat) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    logging::init(log_format);
    match serving(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", causes(&e));
            // A certificate, key or store the configuration names that cannot be used: a
            // restart cannot fix it (systemd's unit does not restart on 64). Anything else (a
            // port taken, the runtime) may pass.
            if e.downcast_ref::<crate::BuildError>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn serving(config: Config) -> anyhow::Result<()> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit raised"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let runtime = serving_runtime().context("starting the runtime")?;
    runtime.block_on(async {
        // Before anything else: a SIGHUP during start-up (systemd's reload) queues a reload
        // instead of killing the process, SIGHUP's default action.
        let reloads = reload::Requests::new();
        forward_sighup(reloads.handle())?;
        let listeners = Listeners::bind(&config).await?;
        crate::run_with(Arc::new(config), listeners, shutdown_signal(), reloads).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// One worker thread (TOKIO_WORKER_THREADS=1, or one CPU) gets the single-threaded scheduler:
/// same behaviour, none of the work-stealing bookkeeping a lone worker would pay for.
fn serving_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    }
}

/// SIGHUP asks for a reload (the outcome is logged).
fn forward_sighup(handle: reload::ReloadHandle) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            handle.request();
        }
    });
    Ok(())
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

/// `reload`: `POST /reload` to the admin listener named in the config; 0 when the relay took
/// the new configuration, 1 when it refused it or could not be reached.
pub fn reload(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("not sent: the running relay would refuse this configuration too, and keeps its own");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(admin) = config.server.admin else {
        eprintln!(
            "{}: no `[server] admin` listener to send the reload to; send the relay SIGHUP instead: kill -HUP <pid> \
             (under systemd: systemctl reload oauth-relay)",
            path.display()
        );
        return ExitCode::FAILURE;
    };
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(post_reload(admin, path)));
    match answer {
        Ok(Answer { status: 200, plain: true, body }) if body.starts_with("reloaded\n") => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok(Answer { status: status @ (400 | 409 | 503), plain: true, body }) => {
            eprint!("the relay refused the reload ({status}):\n{body}");
            ExitCode::FAILURE
        }
        Ok(Answer { status, .. }) => {
            eprintln!(
                "{admin} answered HTTP {status}, not as an oauth-relay admin listener does; is another server \
                 listening there? Otherwise send the relay SIGHUP: kill -HUP <pid>"
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("no answer from the relay's admin listener at {admin}: {}", causes(&e));
            eprintln!("is the relay running with this configuration? Otherwise send it SIGHUP: kill -HUP <pid>");
            ExitCode::FAILURE
        }
    }
}

/// What answered `POST /reload`.
struct Answer {
    status: u16,
    /// Whether it came as the relay's answers do: plain UTF-8 text.
    plain: bool,
    /// The body (at most 64 KiB), with control characters other than line ends escaped, so a
    /// foreign server's answer cannot drive the terminal.
    body: String,
}

/// One `POST /reload?file=PATH` over plain HTTP/1.1, within 30 s. `file` names the file this
/// command was given (made absolute), so a relay that runs another file refuses (`409`) rather
/// than reload its own and answer "reloaded".
async fn post_reload(admin: SocketAddr, file: &Path) -> anyhow::Result<Answer> {
    use http_body_util::{BodyExt, Empty};
    let mut addr = admin;
    // A wildcard listen address is reached on loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.context("connect")?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        let query: String =
            url::form_urlencoded::Serializer::new(String::new()).append_pair("file", &file.to_string_lossy()).finish();
        let req = http::Request::post(format!("/reload?{query}"))
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let plain = resp.headers().get(http::header::CONTENT_TYPE).is_some_and(|t| t == "text/plain; charset=utf-8");
        let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024).collect().await;
        let body = body.map_err(anyhow::Error::from_boxed).context("reading the answer")?.to_bytes();
        let body = String::from_utf8_lossy(&body).chars().flat_map(escaped).collect();
        Ok(Answer { status, plain, body })
    };
    tokio::time::timeout(Duration::from_secs(30), exchange).await.context("timed out after 30 s")?
}

/// `c` as printed to a terminal: line ends as they are, other control characters escaped.
fn escaped(c: char) -> Vec<char> {
    if c == '\n' || !c.is_control() { vec![c] } else { c.escape_default().collect() }
}

/// `cert status`: per ACME hostname, what the store holds.
pub fn cert_status(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    let report = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| Ok(rt.block_on(crate::acme::status_report(&config))?));
    match report {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cert status: {}", causes(&e));
            ExitCode::FAILURE
        }
    }
}

/// `store copy FROM TO`: the store moved between a folder and the configuration's Redis.
pub fn store_copy(path: &Path, from: &str, to: &str) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    let Some(settings) = &config.server.shared else {
        eprintln!("store copy: {}: server.storage is not a redis:// or rediss:// URL", path.display());
        return ExitCode::from(64);
    };
    let url = settings.url.as_str().trim_end_matches('/');
    let is_redis = |side: &str| side.trim_end_matches('/') == url;
    let (folder, to_redis) = match (is_redis(from), is_redis(to)) {
        (false, true) => (from, true),
        (true, false) => (to, false),
        _ => {
            eprintln!("store copy: one of FROM and TO must be {url} (the configuration's storage), the other a folder");
            return ExitCode::from(2);
        }
    };
    let copied = crate::storage::shared::open_at(&config, settings, Path::new(folder))
        .context("server.storage_key_file")
        .and_then(|shared| {
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
            Ok(rt.block_on(async {
                if to_redis { shared.copy_to_redis().await } else { shared.copy_from_redis().await }
            })?)
        });
    match copied {
        Ok(n) => {
            println!("copied {n} names from {from} to {to}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("store copy: {}", causes(&e));
            ExitCode::FAILURE
        }
    }
}

/// `cert renew`: one hostname renewed now, through the same lock as the running relays.
pub fn cert_renew(path: &Path, hostname: &str, log_format: LogFormat) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    logging::init(log_format);
    let renewed = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| Ok(rt.block_on(crate::acme::renew_now(&config, hostname))?));
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
            eprintln!("{hostname}: not renewed: {}", causes(&e));
            ExitCode::FAILURE
        }
    }
}

/// The version `--version` prints: the crate's, and the commit it was built from when known
/// (`build.rs`).
pub const VERSION: &str = env!("OAUTH_RELAY_VERSION");

/// `completions SHELL`: the completion script for `cmd` (the parsed command line's definition),
/// on standard output.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> ExitCode {
    use std::io::Write;
    let name = cmd.get_name().to_string();
    // Into memory first: the generator panics on a failed write (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    match std::io::stdout().write_all(&script) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// `man DIR`: one man page for `cmd` and one per visible subcommand (`oauth-relay-serve.1`...),
/// written into `dir`, which must exist.
pub fn man(cmd: clap::Command, dir: &Path) -> ExitCode {
    match clap_mangen::generate_to(cmd, dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: cannot write the man pages: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
