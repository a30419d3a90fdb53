//! `oauth-relay doctor`: each check on good and bad inputs, with real things only (the resolver,
//! sockets bound by the test, folders with real modes, an HTTPS upstream with a test CA, a real
//! Pebble), and the real binary for exit statuses, the paste section and what an unprivileged
//! user sees.

use crate::common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use common::pebble::{Pebble, PebbleOptions, free_port};
use common::{Pki, Upstream, UpstreamBehaviour};
use oauth_relay::Config;
use oauth_relay::config::TlsSource;
use oauth_relay::doctor::{self, Finding, Level, acme, dns, listen, redirect, storage, upstream};
use oauth_relay::egress::Egress;
use url::Url;

const BIN: &str = env!("CARGO_BIN_EXE_oauth-relay");
/// A short bound for checks expected to time out, so the file stays fast.
const SHORT: Duration = Duration::from_millis(300);

/// A self-signed site config; `site` lines are appended to `[[site]]`.
fn toml(hostnames: &str, storage: &Path, site: &str) -> String {
    format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\npublic_https_port = 443\nstorage = \"{}\"\n\n[[site]]\nname = \"auth\"\nhostnames = [{hostnames}]\n{site}\n",
        storage.display()
    )
}

fn parse(text: &str) -> Config {
    Config::parse("doctor.toml", text).unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

/// The one finding of `findings` whose message contains `needle`.
fn find<'a>(findings: &'a [Finding], needle: &str) -> &'a Finding {
    let hits: Vec<&Finding> = findings.iter().filter(|f| f.message.contains(needle)).collect();
    assert_eq!(hits.len(), 1, "one finding with `{needle}` expected in {findings:#?}");
    hits[0]
}

fn levels(findings: &[Finding]) -> Vec<Level> {
    findings.iter().map(|f| f.level).collect()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

// ---- redirect URI: Microsoft Entra's rules -------------------------------------------------

#[test]
fn default_redirect_uri_meets_entra_rules() {
    let dir = tempfile::tempdir().unwrap();
    let config = parse(&toml("\"relay.example.com\"", dir.path(), ""));
    let findings = redirect::check_site(&config.sites[0], 443);
    assert_eq!(
        findings,
        vec![Finding::ok(
            "redirect-uri",
            "https://relay.example.com/v1/auth/callback meets Microsoft Entra's redirect URI rules (42 characters)"
        )]
    );
}

#[test]
fn each_entra_rule_has_a_case() {
    // (uri, level, words of the one finding)
    let long = format!("https://relay.example.com/{}", "a".repeat(231));
    let cases: Vec<(String, Level, &str)> = vec![
        ("http://relay.example.com/cb".into(), Level::Error, "scheme `http`; Entra requires https"),
        (long.clone(), Level::Error, "257 characters; Entra accepts at most 256"),
        ("https://*.example.com/cb".into(), Level::Error, "wildcard"),
        (
            "https://relay.example.com/cb?tenant=x".into(),
            Level::Warning,
            "rejects it for apps that allow personal Microsoft accounts",
        ),
        ("https://relay.example.com/cb#x".into(), Level::Error, "has a fragment"),
        ("https://relay.example.com/Auth/Callback".into(), Level::Warning, "`/Auth/Callback` has upper-case letters"),
        ("https://relay.example.com/cb/".into(), Level::Warning, "`/cb/` and `/cb` are different registrations"),
        ("https://relay.example.com".into(), Level::Warning, "has no path"),
    ];
    for (uri, level, words) in cases {
        let findings = redirect::check(&uri);
        let f = find(&findings, words);
        assert_eq!(f.level, level, "{uri}: {f:?}");
        assert!(f.fix.as_deref().is_some_and(|x| !x.is_empty()), "{uri}: a fix is given");
        assert!(findings.iter().all(|f| f.level != Level::Ok), "{uri}: no ok next to a problem");
    }
    // Exactly 256 characters is allowed.
    let at_limit = &long[..256];
    assert_eq!(levels(&redirect::check(at_limit)), vec![Level::Ok], "{at_limit}");
    for c in redirect::FORBIDDEN {
        let uri = format!("https://relay.example.com/cb{c}x");
        let findings = redirect::check(&uri);
        let f = find(&findings, "Entra does not accept ! $ ' ( ) , ;");
        assert_eq!(f.level, Level::Error);
        assert_eq!(f.message, format!("{uri}: contains {c}; Entra does not accept ! $ ' ( ) , ; in redirect URIs"));
        assert_eq!(f.fix.as_deref(), Some(format!("remove {c} from `callback.path`").as_str()));
    }
}

#[test]
fn redirect_uri_rules_apply_to_the_configured_path() {
    let dir = tempfile::tempdir().unwrap();
    let check = |path: &str, hosts: &str| {
        let config = parse(&toml(hosts, dir.path(), &format!("[site.callback]\npath = \"{path}\"\n")));
        redirect::check_site(&config.sites[0], config.server.public_https_port)
    };
    let upper = check("/v1/auth/CallBack", "\"relay.example.com\"");
    assert_eq!(levels(&upper), vec![Level::Warning]);
    assert!(upper[0].message.contains("Entra compares redirect URIs case-sensitively"), "{upper:?}");
    let slash = check("/v1/auth/callback/", "\"relay.example.com\"");
    assert_eq!(levels(&slash), vec![Level::Warning]);
    let chars = check("/v1/auth/callback(1)", "\"relay.example.com\"");
    assert_eq!(levels(&chars), vec![Level::Error]);
    assert!(chars[0].message.contains("contains ( )"), "{chars:?}");
    let long = check(&format!("/{}", "p".repeat(240)), "\"relay.example.com\"");
    assert_eq!(levels(&long), vec![Level::Error]);
    assert!(long[0].message.contains("256"), "{long:?}");
    // A wildcard hostname has no redirect URI of its own: one per name in use.
    let wild = check("/cb", "\"*.example.com\"");
    assert_eq!(levels(&wild), vec![Level::Warning]);
    assert_eq!(
        wild[0].fix.as_deref(),
        Some("register https://NAME/cb for each name under `*.example.com` that is in use")
    );
}

// ---- DNS ----------------------------------------------------------------------------------

#[tokio::test]
async fn hostname_resolution_is_a_warning_locally_and_an_error_with_acme() {
    let ok = dns::check_hostname("localhost", false).await;
    assert_eq!(levels(&ok), vec![Level::Ok, Level::Ok], "{ok:?}");
    assert!(ok[0].message.starts_with("localhost resolves to ") && ok[0].message.contains("127.0.0.1"), "{ok:?}");
    assert!(ok[1].message.contains("points at this machine's loopback"), "{ok:?}");
    // Loopback is fine locally; an ACME CA cannot reach it.
    let acme_local = dns::check_hostname("localhost", true).await;
    assert_eq!(levels(&acme_local), vec![Level::Ok, Level::Warning], "{acme_local:?}");

    let local = dns::check_hostname("does-not-exist.invalid", false).await;
    assert_eq!(levels(&local), vec![Level::Warning], "{local:?}");
    assert!(local[0].message.starts_with("does-not-exist.invalid does not resolve"), "{local:?}");
    let acme = dns::check_hostname("does-not-exist.invalid", true).await;
    assert_eq!(levels(&acme), vec![Level::Error], "{acme:?}");
    assert!(acme[0].message.contains("the ACME CA cannot validate it"), "{acme:?}");
}

#[test]
fn hostname_is_compared_with_this_machines_public_address_when_known() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let host = "relay.example.com";
    let local = [ip("127.0.0.1"), ip("10.0.0.5"), ip("9.9.9.9")];
    let here = dns::points_here(host, &[ip("9.9.9.9")], Some(&local), true);
    assert_eq!(here, Finding::ok("dns", "relay.example.com points at this machine (9.9.9.9)"));
    let elsewhere = dns::points_here(host, &[ip("1.1.1.1")], Some(&local), false);
    assert_eq!(elsewhere.level, Level::Warning);
    assert_eq!(
        elsewhere.message,
        "relay.example.com resolves to 1.1.1.1, not to this machine's public address 9.9.9.9"
    );
    // Behind NAT (only private and ULA addresses): no comparison, said so.
    let nat = [ip("10.0.0.5"), ip("fd00::2"), ip("192.0.2.2")];
    let skipped = dns::points_here(host, &[ip("1.1.1.1")], Some(&nat), true);
    assert_eq!(skipped.level, Level::Ok);
    assert!(skipped.message.contains("not compared with this machine, which has no public address"), "{skipped:?}");
    let unknown = dns::points_here(host, &[ip("1.1.1.1")], None, true);
    assert_eq!(unknown.level, Level::Ok);

    // This machine's real addresses include loopback.
    let mine = dns::local_addresses().expect("/proc/net is readable on Linux");
    assert!(mine.contains(&ip("127.0.0.1")), "{mine:?}");
    for (s, public) in [
        ("8.8.8.8", true),
        ("100.64.1.1", false),
        ("172.16.0.1", false),
        ("2a00:1450::1", true),
        ("2001:db8::1", false),
    ] {
        assert_eq!(dns::is_public(&ip(s)), public, "{s}");
    }
}

// ---- listen addresses ---------------------------------------------------------------------

#[test]
fn listen_address_free_in_use_and_foreign() {
    let free = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    assert_eq!(listen::check(free, "https"), Finding::ok("listen", format!("https {free} can be bound")));

    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap();
    let f = listen::check(busy, "http");
    assert_eq!(f.level, Level::Error);
    assert_eq!(f.message, format!("http {busy}: address already in use"));
    assert!(f.fix.as_deref().unwrap().starts_with("if oauth-relay is running, this is expected"), "{f:?}");

    // TEST-NET-3 is on no interface of this machine.
    let foreign: SocketAddr = "203.0.113.7:8443".parse().unwrap();
    let f = listen::check(foreign, "https");
    assert_eq!(f.level, Level::Error);
    assert_eq!(f.message, "https 203.0.113.7:8443: 203.0.113.7 is not an address of this machine");
    drop(held);

    // Listeners are held together, as `serve` holds them.
    let server = parse(&toml("\"localhost\"", Path::new("/tmp"), "")).server;
    let all = listen::check_all(&oauth_relay::config::Server { http: vec![free], https: vec![free], ..server });
    assert_eq!(levels(&all), [Level::Ok, Level::Error], "{all:#?}");
    assert_eq!(all[1].message, format!("http {free}: address already in use"));
}

/// Overlapping listeners are refused before anything is tried: `doctor` names them with their
/// keys, as `check` does, and exits 64.
#[tokio::test]
async fn doctor_refuses_overlapping_listeners_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let text = toml("\"localhost\"", dir.path(), "")
        .replace("https = [\"127.0.0.1:0\"]", "https = [\"0.0.0.0:18443\", \"[::]:18443\"]");
    let path = dir.path().join("overlap.toml");
    std::fs::write(&path, &text).unwrap();
    let out = run_doctor(&path, false).await;
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        format!(
            "{}:2: server.https[1]: `[::]:18443` overlaps `0.0.0.0:18443` (server.https[0]): `[::]` takes IPv4 \
             addresses too (dual stack): list it alone to serve both; one socket cannot take both\n\
             1 problem found; nothing was started\n",
            path.display()
        )
    );
}

// ---- storage ------------------------------------------------------------------------------

#[test]
fn storage_private_open_missing_and_uncreatable() {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    chmod(&private, 0o700);
    let f = storage::check(&private);
    assert_eq!(levels(&f), vec![Level::Ok, Level::Ok], "{f:?}");
    assert_eq!(f[0].message, format!("{} is private", private.display()));
    assert_eq!(f[1].message, format!("{} is writable", private.display()));
    assert_eq!(std::fs::read_dir(&private).unwrap().count(), 0, "the write probe is removed");

    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o755);
    std::fs::write(open.join("key.pem"), "x").unwrap();
    chmod(&open.join("key.pem"), 0o644);
    let f = storage::check(&open);
    assert_eq!(levels(&f), vec![Level::Warning, Level::Ok], "{f:?}");
    assert!(
        f[0].message.ends_with("(mode 0755) and 1 more can be read by other users")
            || f[0].message.ends_with("(mode 0644) and 1 more can be read by other users"),
        "{f:?}"
    );
    assert_eq!(
        f[0].fix.as_deref(),
        Some("the relay makes them private (0700 folders, 0600 files) when it starts; or chmod them now")
    );
    assert_eq!(std::fs::metadata(&open).unwrap().permissions().mode() & 0o777, 0o755, "doctor changes nothing");

    // What serve refuses, doctor calls an error: a store others can write.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o775);
    let f = storage::check(&shared);
    assert_eq!(levels(&f)[0], Level::Error, "{f:?}");
    assert!(
        f[0].message.starts_with(&format!("serve would refuse the store: {}: refusing", shared.display())),
        "{f:?}"
    );
    assert!(f[0].message.contains("writable by other users (mode 0775)"), "{f:?}");

    let missing = dir.path().join("not/yet");
    let f = storage::check(&missing);
    assert_eq!(levels(&f), vec![Level::Ok], "{f:?}");
    assert!(f[0].message.ends_with("does not exist yet; the relay will create it (mode 0700)"), "{f:?}");
    assert!(!dir.path().join("not").exists(), "doctor creates nothing");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3, "no probe left behind");

    // Under a regular file nothing can be created, even by root.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let f = storage::check(&file.join("x"));
    assert_eq!(levels(&f), vec![Level::Error], "{f:?}");
    assert!(f[0].message.ends_with(&format!("cannot be created: {} is not a folder", file.display())), "{f:?}");
    let f = storage::check(&file);
    assert_eq!(f[0].message, format!("{} exists but is not a folder", file.display()));
}

// ---- upstream TLS -------------------------------------------------------------------------

#[tokio::test]
async fn upstream_tls_valid_untrusted_closed_plain_silent_and_expiring() {
    let pki = Pki::new();
    let leaf = pki.leaf("upstream", &["localhost"]);
    let up =
        Upstream::start(Some(pki.server_config(&leaf, &[b"h2", b"http/1.1"])), UpstreamBehaviour::fixed(200, &[], ""))
            .await;
    let url = Url::parse(&format!("https://localhost:{}", up.addr.port())).unwrap();

    let f = upstream::check(&url, Some(&pki.ca_path), &Egress::direct(), doctor::TIMEOUT).await;
    assert_eq!(f.level, Level::Ok, "{f:?}");
    assert!(
        f.message.starts_with(&format!("https://localhost:{}: TLS 1.3, certificate valid until ", up.addr.port())),
        "{f:?}"
    );
    assert!(f.message.ends_with("days left)"), "{f:?}");

    // Without the test CA the relay would not trust it either.
    let f = upstream::check(&url, None, &Egress::direct(), doctor::TIMEOUT).await;
    assert_eq!(f.level, Level::Error, "{f:?}");
    assert!(f.message.contains("TLS handshake failed: invalid peer certificate: UnknownIssuer"), "{f:?}");
    assert!(f.fix.as_deref().unwrap().contains("upstream_ca_file"), "{f:?}");

    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let f = upstream::check(
        &Url::parse(&format!("https://127.0.0.1:{closed}")).unwrap(),
        None,
        &Egress::direct(),
        doctor::TIMEOUT,
    )
    .await;
    assert_eq!(f.level, Level::Error);
    assert!(f.message.starts_with(&format!("https://127.0.0.1:{closed} cannot be reached: ")), "{f:?}");

    let plain = Upstream::start(None, UpstreamBehaviour::fixed(200, &[], "")).await;
    let f = upstream::check(
        &Url::parse(&format!("http://127.0.0.1:{}", plain.addr.port())).unwrap(),
        None,
        &Egress::direct(),
        SHORT,
    )
    .await;
    assert_eq!(f.level, Level::Warning, "{f:?}");
    assert!(f.message.contains("plain http://"), "{f:?}");

    // Accepts TCP, never answers the ClientHello.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let f = upstream::check(
        &Url::parse(&format!("https://127.0.0.1:{silent_port}")).unwrap(),
        None,
        &Egress::direct(),
        SHORT,
    )
    .await;
    assert_eq!(f.level, Level::Error);
    assert_eq!(f.message, format!("https://127.0.0.1:{silent_port}: no TLS handshake within 300ms"));
    hold.abort();

    let now = SystemTime::now();
    let soon = pki.leaf_with_validity(
        "soon",
        &["localhost"],
        now - Duration::from_secs(86_400),
        now + Duration::from_secs(3 * 86_400 + 3600),
    );
    let expiring =
        Upstream::start(Some(pki.server_config(&soon, &[b"http/1.1"])), UpstreamBehaviour::fixed(200, &[], "")).await;
    let url = Url::parse(&format!("https://localhost:{}", expiring.addr.port())).unwrap();
    let f = upstream::check(&url, Some(&pki.ca_path), &Egress::direct(), doctor::TIMEOUT).await;
    assert_eq!(f.level, Level::Warning, "{f:?}");
    assert!(f.message.ends_with("(3 days left)"), "{f:?}");
}

// ---- ACME directory -----------------------------------------------------------------------

fn acme_settings(directory: &str, ca: &Path, extra: &str) -> oauth_relay::config::AcmeSettings {
    let dir = tempfile::tempdir().unwrap();
    let text = toml(
        "\"relay.test\"",
        dir.path(),
        &format!(
            "[site.tls]\nsource = \"acme\"\ndirectory = \"{directory}\"\ndirectory_ca_file = \"{}\"\nterms_agreed = true\n{extra}",
            ca.display()
        ),
    );
    match parse(&text).sites.remove(0).tls {
        TlsSource::Acme(a) => *a,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_directory_answers_without_ari_or_profiles_on_pebble() {
    let pebble = Pebble::start(PebbleOptions::new(free_port(), free_port())).await;
    let url = pebble.directory_url();
    let f = acme::check_directory(acme_settings(&url, pebble.ca_path(), ""), doctor::TIMEOUT).await;
    assert_eq!(
        f,
        vec![
            Finding::ok("acme", format!("{url} answers")),
            Finding::ok(
                "acme",
                format!("{url} offers no ARI (renewalInfo): renewal starts with one third of the lifetime left")
            ),
            Finding::ok("acme", format!("{url} offers no profiles")),
        ]
    );
    // A profile the CA does not offer would fail every order.
    let f =
        acme::check_directory(acme_settings(&url, pebble.ca_path(), "profile = \"shortlived\""), doctor::TIMEOUT).await;
    assert_eq!(levels(&f), vec![Level::Ok, Level::Ok, Level::Error], "{f:?}");
    assert_eq!(f[2].fix.as_deref(), Some("remove `profile` from [site.tls]"));

    // The same directory trusted through the wrong CA file: the TLS failure is reported.
    let other = Pki::new();
    let f = acme::check_directory(acme_settings(&url, &other.ca_path, ""), doctor::TIMEOUT).await;
    assert_eq!(levels(&f), vec![Level::Error], "{f:?}");
    assert!(f[0].message.starts_with(&format!("{url} cannot be reached: ")), "{f:?}");

    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = format!("https://127.0.0.1:{closed}/dir");
    let f = acme::check_directory(acme_settings(&dead, pebble.ca_path(), ""), doctor::TIMEOUT).await;
    assert_eq!(levels(&f), vec![Level::Error], "{f:?}");
}

#[test]
fn acme_directory_with_ari_profiles_and_eab() {
    let pki = Pki::new();
    let url = "https://ca.example/dir";
    let dir = serde_json::json!({
        "newNonce": "https://ca.example/nonce", "newAccount": "https://ca.example/acct",
        "newOrder": "https://ca.example/order", "renewalInfo": "https://ca.example/ari",
        "meta": { "profiles": { "classic": "90 days", "shortlived": "6 days" }, "externalAccountRequired": true }
    });
    let f = acme::offers(&acme_settings(url, &pki.ca_path, "profile = \"shortlived\""), &dir);
    assert_eq!(levels(&f), vec![Level::Ok, Level::Ok, Level::Ok, Level::Error], "{f:?}");
    assert_eq!(f[1].message, format!("{url} offers ARI (renewalInfo): the CA's renewal window is followed"));
    assert_eq!(f[2].message, format!("{url} offers profiles: classic, shortlived; `shortlived` is used"));
    assert!(f[3].message.contains("requires External Account Binding"), "{f:?}");
    let f = acme::offers(&acme_settings(url, &pki.ca_path, "profile = \"tiny\""), &dir);
    assert_eq!(f[2].fix.as_deref(), Some("set `profile` to one of: classic, shortlived"));
    let f = acme::offers(&acme_settings(url, &pki.ca_path, ""), &serde_json::json!({"newNonce": "x"}));
    assert_eq!(levels(&f), vec![Level::Error]);
    assert_eq!(f[0].message, format!("{url} is not an ACME directory (no newAccount, newOrder)"));
}

// ---- the binary ---------------------------------------------------------------------------

/// Runs `oauth-relay doctor --config FILE` (optionally through `setpriv` as another user)
/// without blocking the runtime that serves the test's upstream; at most 20 s.
async fn run_doctor(config: &Path, as_nobody: bool) -> Output {
    let config = config.to_path_buf();
    let child = tokio::task::spawn_blocking(move || {
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", BIN]);
            c
        } else {
            Command::new(BIN)
        };
        cmd.arg("doctor").arg("--config").arg(&config).stdin(Stdio::null()).output().expect("run oauth-relay doctor")
    });
    tokio::time::timeout(Duration::from_secs(20), child).await.expect("doctor finished within 20 s").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_exits_0_with_warnings_and_1_with_an_error_and_prints_what_to_paste() {
    let pki = Pki::new();
    let leaf = pki.leaf("upstream", &["localhost"]);
    let up = Upstream::start(Some(pki.server_config(&leaf, &[b"h2"])), UpstreamBehaviour::fixed(200, &[], "")).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    chmod(&store, 0o755);
    let site = format!(
        "upstream = \"https://localhost:{}\"\nupstream_ca_file = \"{}\"\n",
        up.addr.port(),
        pki.ca_path.display()
    );
    let good = toml("\"localhost\"", &store, &site).replace("public_https_port = 443", "public_https_port = 8443");
    let path = dir.path().join("good.toml");
    std::fs::write(&path, &good).unwrap();

    let out = run_doctor(&path, false).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(&format!("warning  storage       {} (mode 0755) can be read by other users\n", store.display())),
        "{text}"
    );
    assert!(text.contains("\n0 errors") || text.contains(", 0 errors\n"), "{text}");
    let paste = &text[text.find("\npaste these\n").expect("paste section")..];
    assert_eq!(
        paste,
        "\npaste these\n  site auth\n    redirect URI in the Entra app registration (Authentication > Web > \
         Redirect URIs):\n      https://localhost:8443/v1/auth/callback\n    callback / return URL in the broker's \
         portal (the same URI):\n      https://localhost:8443/v1/auth/callback\n"
    );

    // The same with a store that cannot be created: an error, status 1.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let bad = good.replace(&store.display().to_string(), &file.join("x").display().to_string());
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    let out = run_doctor(&path, false).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("error    storage"), "{text}");
    assert!(text.contains(", 1 error\n"), "{text}");
}

/// What an unprivileged user sees: a port below 1024 needs a capability, and a root-owned
/// store is not writable. Real EACCES from the kernel, through `setpriv` as `nobody`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprivileged_user_is_told_about_low_ports_and_an_unwritable_store() {
    let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    let privileged_start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    if !root || privileged_start < 100 || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: needs root, setpriv and privileged ports (start {privileged_start})");
        return;
    }
    // A privileged port that is free right now (root can bind it to find out).
    let port = (1..privileged_start.min(1024)).rev().find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    chmod(&store, 0o700);
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let text = toml("\"localhost\"", &store, &format!("upstream = \"http://127.0.0.1:{closed}\"\n"))
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let path = dir.path().join("doctor.toml");
    std::fs::write(&path, text).unwrap();
    chmod(&path, 0o644);

    let out = run_doctor(&path, true).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(&format!(
            "error    listen        https 127.0.0.1:{port}: permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE\n"
        )),
        "{text}"
    );
    assert!(text.contains("fix: grant the capability: `setcap cap_net_bind_service=+ep"), "{text}");
    assert!(text.contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"), "{text}");
    assert!(
        text.contains(&format!("error    storage       {} is not writable by this user", store.display())),
        "{text}"
    );
}

#[test]
fn certificate_files_are_read_and_matched_as_serve_would() {
    let pki = Pki::new();
    let store = tempfile::tempdir().expect("tempdir");
    let good = pki.leaf("good", &["auth.example.test"]);
    let other = pki.leaf("other", &["auth.example.test"]);
    let files = |cert: &Path, key: &Path| {
        format!("\n[site.tls]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n", cert.display(), key.display())
    };
    let check =
        |site: String| oauth_relay::doctor::certs::check(&parse(&toml("\"auth.example.test\"", store.path(), &site)));

    let ok = check(files(&good.cert_path, &good.key_path));
    assert_eq!(levels(&ok), [Level::Ok]);
    assert!(
        ok[0].message.starts_with(&format!("site auth: certificate and key match, serial {}", good.serial)),
        "{ok:?}"
    );

    let mismatched = check(files(&good.cert_path, &other.key_path));
    assert_eq!(levels(&mismatched), [Level::Error]);
    assert!(mismatched[0].message.ends_with(": the private key does not belong to the first certificate of the chain (the chain goes leaf first: the server's own certificate, then its intermediates)"), "{mismatched:?}");

    let missing = check(files(&store.path().join("absent.crt"), &good.key_path));
    assert_eq!(levels(&missing), [Level::Error]);
    assert!(missing[0].message.contains("absent.crt: cannot read"), "{missing:?}");

    let foreign = pki.leaf("foreign", &["elsewhere.example.test"]);
    let uncovered = check(files(&foreign.cert_path, &foreign.key_path));
    assert_eq!(levels(&uncovered), [Level::Error]);
    assert_eq!(uncovered[0].message, "site auth: the certificate does not name auth.example.test");

    // Keys aws-lc-rs cannot sign with are named, with what would do.
    for (file, kind) in [("rsa-1024.pem", "RSA-1024"), ("ed448.pem", "Ed448"), ("secp256k1.pem", "ECDSA secp256k1")] {
        let key = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/keys").join(file);
        let refused = check(files(&good.cert_path, &key));
        assert_eq!(levels(&refused), [Level::Error], "{file}");
        assert!(
            refused[0].message.ends_with(&format!(
                ": the private key is {kind}, which the relay cannot sign with: use ECDSA P-256, P-384 or P-521, \
                 Ed25519, or RSA of 2048 to 8192 bits"
            )),
            "{refused:?}"
        );
    }

    let day = Duration::from_secs(86400);
    let expired = pki.leaf_with_validity(
        "expired",
        &["auth.example.test"],
        SystemTime::now() - 10 * day,
        SystemTime::now() - day,
    );
    let stale = check(files(&expired.cert_path, &expired.key_path));
    assert_eq!(levels(&stale), [Level::Error]);
    assert!(stale[0].message.starts_with("site auth: the certificate is not valid now (valid "), "{stale:?}");
}
