//! The `oauth-relay` command as an operator runs it: the real binary, its exit statuses, and
//! the exact lines `check` prints.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_oauth-relay");

/// The proxy variables `[outbound] proxy = "env"` reads; cleared for every run so the machine's
/// own do not change what `check` prints.
const PROXY_VARS: [&str; 8] =
    ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"];

/// Runs the binary to completion (at most 30 s) in the crate's folder.
fn run(args: &[&str]) -> Output {
    run_with_env(args, &[])
}

/// [`run`] with these environment variables set (and no other proxy variables).
fn run_with_env(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    let mut child = cmd
        .envs(vars.iter().copied())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn oauth-relay");
    let deadline = Instant::now() + Duration::from_secs(30);
    // The outputs are a few KiB, well under a pipe's buffer, so waiting before reading is safe.
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("oauth-relay {args:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("utf-8 stderr")
}

/// Writes `text` as `name` in a fresh temp folder.
fn temp_config(name: &str, text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write config");
    let path = path.to_str().expect("utf-8 path").to_string();
    (dir, path)
}

/// The lines of `text` from the one equal to `start` (trimmed) up to `n` lines, trimmed.
fn block(text: &str, start: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.iter().position(|l| l.trim() == start).unwrap_or_else(|| panic!("no `{start}` line in:\n{text}"));
    lines[at..(at + n).min(lines.len())].iter().map(|l| l.trim().to_string()).collect()
}

#[test]
fn version_prints_name_version_and_commit() {
    let o = run(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    // The commit the binary was built from (build.rs); a tree without git has none to name.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let expected = match option_env!("OAUTH_RELAY_COMMIT").filter(|c| !c.is_empty()).map(String::from).or(head) {
        Some(commit) => format!("oauth-relay 0.1.0 (commit {commit})\n"),
        None => "oauth-relay 0.1.0\n".to_string(),
    };
    assert_eq!(stdout(&o), expected);
}

#[test]
fn help_lists_serve_and_check() {
    let o = run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(out.contains("Usage: oauth-relay <COMMAND>"), "{out}");
    for cmd in ["serve", "check"] {
        assert!(out.lines().any(|l| l.trim_start().starts_with(&format!("{cmd} "))), "`{cmd}` missing from:\n{out}");
    }
}

#[test]
fn check_example_prints_what_to_register() {
    let o = run(&["check", "--config", "config/example.toml"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("config/example.toml: ok\n"), "{out}");
    assert_eq!(
        block(&out, "register these", 8),
        [
            "register these",
            "redirect URI in the Entra app registration (Authentication > Web > Redirect URIs):",
            "https://aurinko.example.com/v1/auth/callback",
            "callback / return URL in the broker's portal (the same URI):",
            "https://aurinko.example.com/v1/auth/callback",
            "the application calls:",
            "authorize  https://aurinko.example.com/v1/auth/authorize",
            "token      https://aurinko.example.com/v1/auth/token/{code}",
        ]
    );
    assert!(out.contains("\n  https listeners     0.0.0.0:443\n"), "{out}");
    assert!(out.contains("\n  admin listener      127.0.0.1:9090\n"), "{out}");
    assert!(!out.contains("warnings"), "{out}");
    // The example's certificate files are not on this machine: said, not refused.
    assert_eq!(
        stderr(&o),
        "config/example.toml: site aurinko: warning: site.tls: /etc/oauth-relay/tls/tls.crt: cannot read: No such \
         file or directory (os error 2); `serve` will refuse to start without it\n"
    );
}

#[test]
fn check_multi_site_prints_each_sites_uris() {
    let o = run(&["check", "-c", "config/multi-site.toml"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stderr(&o).lines().filter(|l| l.contains(": warning: site.tls: ")).count(), 2, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("\nsite aurinko (default)\n"), "{out}");
    assert!(out.contains("\nsite other-broker\n"), "{out}");
    assert!(
        out.contains(
            "\n  token               /token/{code} (POST) -> https://token.broker.example.net/oauth/token/{code}\n"
        ),
        "{out}"
    );
    let uris: Vec<&str> =
        out.lines().map(str::trim).filter(|l| l.starts_with("https://") && l.contains("callback")).collect();
    assert_eq!(
        uris,
        [
            "https://aurinko.example.com/v1/auth/callback",
            "https://aurinko.example.com/v1/auth/callback",
            "https://oauth.example.com/callback",
            "https://oauth.example.org/callback",
            "https://oauth.example.com/callback",
            "https://oauth.example.org/callback",
        ]
    );
}

#[test]
fn check_prints_the_port_when_it_is_not_443() {
    let site = "[[site]]\nhostnames = [\"auth.example.test\"]\n";
    let (_d, path) = temp_config("relay.toml", &format!("[server]\nhttps = [\"127.0.0.1:8443\"]\n\n{site}"));
    let o = run(&["check", "--config", &path]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(block(&stdout(&o), "register these", 3)[2], "https://auth.example.test:8443/v1/auth/callback");

    // Behind a load balancer on 443, the public port wins over the listen port.
    let (_d, path) = temp_config(
        "relay.toml",
        &format!("[server]\nhttps = [\"127.0.0.1:8443\"]\npublic_https_port = 443\n\n{site}"),
    );
    let o = run(&["check", "--config", &path]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(block(&stdout(&o), "register these", 3)[2], "https://auth.example.test/v1/auth/callback");
}

#[test]
fn check_without_config_checks_the_embedded_local_config() {
    let o = run(&["check"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("<embedded config/local.toml>: ok\n"), "{out}");
    assert_eq!(block(&out, "register these", 3)[2], "https://localhost:8443/v1/auth/callback");
    assert!(out.contains("\n  upstream            https://api.aurinko.io (direct)\n"), "{out}");
    assert!(out.contains("\n  outbound proxy      direct\n"), "{out}");
}

#[test]
fn check_shows_the_proxy_from_the_environment_without_its_password() {
    let vars = [("HTTPS_PROXY", "http://relay:s3cret@proxy.corp.example:3128"), ("NO_PROXY", ".corp.example")];
    let o = run_with_env(&["check"], &vars);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(
            "\n  outbound proxy      HTTPS_PROXY=http://relay:***@proxy.corp.example:3128 NO_PROXY=.corp.example \
             (from the environment; loopback direct)\n"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "\n  upstream            https://api.aurinko.io (through the proxy http://proxy.corp.example:3128)\n"
        ),
        "{out}"
    );
    assert!(!out.contains("s3cret") && !stderr(&o).contains("s3cret"), "{out}");
}

#[test]
fn an_unusable_proxy_in_the_environment_is_a_config_error() {
    let o = run_with_env(&["check"], &[("ALL_PROXY", "socks5://relay:s3cret@proxy.corp.example:1080")]);
    assert_eq!(o.status.code(), Some(64), "stdout: {}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains(
            "outbound.proxy: ALL_PROXY: socks5://relay:***@proxy.corp.example:1080 is a socks5:// proxy; the relay \
             speaks to HTTP proxies only (http://host:port, tunnelling with CONNECT) (set [outbound] proxy = \
             \"direct\" or an http:// proxy URL to override the environment)"
        ),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn a_bad_config_exits_64_listing_every_problem() {
    let text = "[server]\nhttps = [\"localhost:443\"]\n\n[[site]]\nhostnames = [\"auth.example.test\"]\n\
                upstream = \"nope\"\n\n[site.tls]\nsorce = \"files\"\n\n[site.callback]\nstatus = 301\n";
    let (_d, path) = temp_config("bad.toml", text);
    for cmd in ["check", "serve"] {
        let o = run(&[cmd, "--config", &path]);
        assert_eq!(o.status.code(), Some(64), "{cmd}");
        assert_eq!(stdout(&o), "", "{cmd}");
        let err = stderr(&o);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 5, "{cmd}: {err}");
        assert!(
            lines[0].starts_with(&format!("{path}:2: server.https[0]: `localhost:443` is not an IP:port")),
            "{err}"
        );
        assert_eq!(lines[1], format!("{path}:6: site[0].upstream: `nope` is not a URL: relative URL without a base"));
        assert!(lines[2].starts_with(&format!("{path}:9: site[0].tls.sorce: unknown field `sorce`")), "{err}");
        assert_eq!(lines[3], format!("{path}:12: site[0].callback.status: 301: use 302, 303 or 307"));
        assert_eq!(lines[4], "4 problems found; nothing was started");
    }
}

#[test]
fn a_missing_config_file_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.toml");
    let path = path.to_str().unwrap();
    let o = run(&["check", "--config", path]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).starts_with(&format!("{path}: cannot read: ")), "{}", stderr(&o));
}

#[test]
fn serve_on_a_taken_port_names_it_once_and_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let store = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\nhttps = [\"{addr}\"]\nstorage = \"{}\"\n\n[[site]]\nhostnames = [\"localhost\"]\n\n\
         [site.tls]\nsource = \"self-signed\"\n",
        store.path().display()
    );
    let (_d, path) = temp_config("taken.toml", &text);
    let o = run(&["serve", "--config", &path]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    let line = format!("cannot listen on {addr} (https): Address already in use (os error 98)\n");
    assert!(err.ends_with(&line), "{err}");
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
}

#[test]
fn check_prints_warnings_for_plain_http_upstream_and_mixed_modes() {
    let text = "[server]\nhttps = [\"127.0.0.1:8443\"]\n\n[[site]]\nhostnames = [\"auth.example.test\"]\n\
                upstream = \"http://127.0.0.1:9000\"\n\n[site.callback]\nmode = \"proxy\"\n";
    let (_d, path) = temp_config("warn.toml", text);
    let o = run(&["check", "--config", &path]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let tail: Vec<&str> = out.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
    assert_eq!(
        tail,
        [
            "warnings".to_string(),
            // authorize.mode is not written: the warning points at its site.
            format!(
                "  {path}:4: site[0].authorize.mode: authorize is redirected while the callback is proxied: \
                 the broker's cookies would land on two domains"
            ),
            format!(
                "  {path}:6: site[0].upstream: plain http:// upstream: tokens and codes cross the network unencrypted"
            ),
        ]
    );
}

#[test]
fn check_shows_log_and_health_and_warns_when_redaction_is_off() {
    let o = run(&["check", "--config", "config/example.toml"]);
    let out = stdout(&o);
    assert_eq!(
        block(&out, "log", 4),
        [
            "log",
            "access lines        on (target access)",
            "redaction           on (no path, query, code, state, token or header value)",
            "flow key            random per process"
        ]
    );
    assert_eq!(
        block(&out, "health", 4),
        [
            "health",
            "certificate margin  not ready when one expires within 7days and nothing renews it",
            "upstream probe      every 30s, path /, timeout 5s; not ready after 2m unreachable",
            "clock skew          reported above 30s, not ready above 5m",
        ]
    );

    let text = "[server]\nhttps = [\"127.0.0.1:8443\"]\n\n[log]\nredact = false\n\n[health]\nupstream_probe_interval = \"0s\"\n\n\
                [[site]]\nhostnames = [\"auth.example.test\"]\n";
    let (_d, path) = temp_config("debug.toml", text);
    let o = run(&["check", "--config", &path]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("\n  redaction           OFF: codes and state are written to the log as `uri` (debugging only)\n"),
        "{out}"
    );
    assert!(out.contains("\n  upstream probe      off\n"), "{out}");
    assert!(
        out.ends_with(&format!(
            "warnings\n  {path}:5: log.redact: false: every access line carries the raw path and query, with \
             authorization codes and `state`; for debugging on your own machine only, never in production\n"
        )),
        "{out}"
    );
}

#[test]
fn check_refuses_certificate_files_serve_could_not_load() {
    let pki = crate::common::Pki::new();
    let good = pki.leaf("good", &["auth.example.test"]);
    let other = pki.leaf("other", &["auth.example.test"]);
    let text = format!(
        "[[site]]\nname = \"auth\"\nhostnames = [\"auth.example.test\"]\n\n[site.tls]\nsource = \"files\"\n\
         cert = \"{}\"\nkey = \"{}\"\n",
        good.cert_path.display(),
        other.key_path.display()
    );
    let (_dir, path) = temp_config("relay.toml", &text);
    let o = run(&["check", "--config", &path]);
    assert_eq!(o.status.code(), Some(64), "stdout: {}\nstderr: {}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    assert!(err.starts_with(&format!("{path}: site auth: site.tls: ")), "{err}");
    assert!(err.ends_with("1 problem found; nothing was started\n"), "{err}");
    assert!(stdout(&o).is_empty(), "nothing printed as if it were fine: {}", stdout(&o));
    assert!(!err.contains("PRIVATE KEY"), "no key material in the message: {err}");
}

#[test]
fn serve_with_a_certificate_it_cannot_load_says_why_never_serving_and_exits_64() {
    let store = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nstorage = \"{}\"\n\n[[site]]\nname = \"auth\"\nhostnames = [\"localhost\"]\n\n\
         [site.tls]\nsource = \"files\"\ncert = \"{}/absent.crt\"\nkey = \"{}/absent.key\"\n",
        store.path().display(),
        store.path().display(),
        store.path().display()
    );
    let (_d, path) = temp_config("absent.toml", &text);
    let o = run(&["serve", "--config", &path]);
    // A restart cannot fix a missing file: 64, which systemd's unit does not restart on.
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{}/absent.crt: cannot read: No such file or directory", store.path().display())),
        "{err}"
    );
    assert!(!err.contains("serving"), "it said it served: {err}");
}

/// A key the relay cannot sign with (RSA-1024, Ed448) is named as such by `check`, and `serve`
/// exits 64 with the same words before serving anything.
#[test]
fn a_key_too_weak_or_unsupported_is_named_by_check_and_serve() {
    let pki = crate::common::Pki::new();
    let leaf = pki.leaf("auth", &["localhost"]);
    let store = tempfile::tempdir().expect("tempdir");
    for (file, kind) in [("rsa-1024.pem", "RSA-1024"), ("ed448.pem", "Ed448")] {
        let key = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/keys").join(file);
        let text = format!(
            "[server]\nhttps = [\"127.0.0.1:0\"]\nstorage = \"{}\"\n\n[[site]]\nname = \"auth\"\nhostnames = [\"localhost\"]\n\n\
             [site.tls]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n",
            store.path().display(),
            leaf.cert_path.display(),
            key.display()
        );
        let (_d, path) = temp_config("weak.toml", &text);
        let why = format!(
            "{} + {}: the private key is {kind}, which the relay cannot sign with: use ECDSA P-256, P-384 or P-521, \
             Ed25519, or RSA of 2048 to 8192 bits",
            leaf.cert_path.display(),
            key.display()
        );
        let o = run(&["check", "--config", &path]);
        assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
        assert_eq!(stderr(&o), format!("{path}: site auth: site.tls: {why}\n1 problem found; nothing was started\n"));
        let o = run(&["serve", "--config", &path]);
        assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(&why), "{err}");
        assert!(!err.contains("serving") && !err.contains("unexpected error"), "{err}");
    }
}

/// An expired certificate is served (a renewal may be on its way), with a warning from `check`
/// and in the log at start.
#[tokio::test]
async fn an_expired_certificate_is_a_warning_in_check_and_at_start() {
    let pki = crate::common::Pki::new();
    let day = Duration::from_secs(86400);
    let now = std::time::SystemTime::now();
    let leaf = pki.leaf_with_validity("old", &["localhost"], now - 10 * day, now - day);
    let store = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nstorage = \"{}\"\n\n[[site]]\nname = \"auth\"\nhostnames = [\"localhost\"]\n\n\
         [site.tls]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n",
        store.path().display(),
        leaf.cert_path.display(),
        leaf.key_path.display()
    );
    let (_d, path) = temp_config("old.toml", &text);
    let o = run(&["check", "--config", &path]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.starts_with(&format!("{path}: site auth: warning: the certificate is not valid now (valid ")), "{err}");
    assert!(err.ends_with("); clients will reject it\n"), "{err}");
    let mut relay = crate::common::process::RelayProcess::serve(Path::new(&path), &[], |_| {});
    relay.https_addr().await;
    let line = relay.wait_for("the certificate has expired; clients will reject it").await;
    assert!(line.contains("site=auth"), "{line}");
    let (status, log) = relay.stop().await;
    assert!(status.success(), "{log}");
}

#[test]
fn check_refuses_at_once_a_config_that_is_not_a_regular_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("relay.toml");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let fifo = fifo.to_str().expect("utf-8 path").to_string();
    for path in ["/dev/zero", fifo.as_str()] {
        let started = Instant::now();
        let o = run(&["check", "--config", path]);
        assert_eq!(o.status.code(), Some(64), "{path}: {}", stderr(&o));
        assert_eq!(stderr(&o), format!("{path}: cannot read: not a regular file\n"));
        assert!(started.elapsed() < Duration::from_secs(10), "{path} was waited on");
    }
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; 2 << 20]).expect("write");
    let o = run(&["check", "--config", big.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).ends_with(": cannot read: larger than 1048576 bytes\n"), "{}", stderr(&o));
    let latin1 = dir.path().join("latin1.toml");
    std::fs::write(&latin1, b"# caf\xe9\n").expect("write");
    let o = run(&["check", "--config", latin1.to_str().expect("utf-8")]);
    assert!(stderr(&o).ends_with(": cannot read: not UTF-8 text (byte 5)\n"), "{}", stderr(&o));
}
