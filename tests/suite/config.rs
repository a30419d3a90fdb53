//! The configuration as an operator meets it: the shipped files parse cleanly, the commented
//! example documents every key the code reads, and every mistake is reported with its file,
//! line and key, all at once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use oauth_relay::Config;
use oauth_relay::config::ConfigError;

/// The rendered problems of a configuration that must be refused.
fn problems(text: &str) -> Vec<String> {
    match Config::parse("test.toml", text) {
        Ok(_) => panic!("the configuration was accepted:\n{text}"),
        Err(ConfigError::Invalid(p)) => p.iter().map(ToString::to_string).collect(),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// The 1-based line of the only line of `text` that contains `needle`.
fn line(text: &str, needle: &str) -> usize {
    let hits: Vec<usize> = text.lines().enumerate().filter(|(_, l)| l.contains(needle)).map(|(i, _)| i + 1).collect();
    assert_eq!(hits.len(), 1, "`{needle}` should be on exactly one line of:\n{text}");
    hits[0]
}

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

#[test]
fn every_shipped_config_parses_without_problems_or_warnings() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(config_dir()).expect("config/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = Config::load(&path).unwrap_or_else(|e| panic!("{} is refused:\n{e}", path.display()));
            let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
            assert!(warnings.is_empty(), "{} has warnings: {warnings:#?}", path.display());
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    for must in ["example.toml", "local.toml", "multi-site.toml"] {
        assert!(names.iter().any(|n| n == must), "config/{must} is missing; found {names:?}");
    }
}

#[test]
fn example_is_production_shaped() {
    let c = Config::load(&config_dir().join("example.toml")).expect("example.toml");
    assert_eq!(c.server.https, vec!["0.0.0.0:443".parse().unwrap()]);
    assert_eq!(c.server.http, vec!["0.0.0.0:80".parse().unwrap()]);
    assert_eq!(c.server.admin, Some("127.0.0.1:9090".parse().unwrap()));
    assert_eq!(c.sites.len(), 1);
    let site = &c.sites[0];
    assert_eq!(site.hostnames, vec!["aurinko.example.com"]);
    assert_eq!(site.upstream.as_str(), "https://api.aurinko.io/");
    assert!(matches!(&site.tls, oauth_relay::config::TlsSource::Files { cert, .. } if cert.starts_with("/etc/")));
    assert_eq!(site.redirect_uris(c.server.public_https_port), vec!["https://aurinko.example.com/v1/auth/callback"]);
}

#[test]
fn multi_site_example_has_two_sites_and_one_default() {
    let c = Config::load(&config_dir().join("multi-site.toml")).expect("multi-site.toml");
    assert_eq!(c.sites.len(), 2);
    assert_eq!(c.default_site().map(|s| s.name.as_str()), Some("aurinko"));
    let other = &c.sites[1];
    assert_eq!(other.upstream.as_str(), "https://broker.example.net/oauth");
    assert_eq!(other.token.upstream.as_str(), "https://token.broker.example.net/oauth");
    assert_ne!(other.token.upstream, other.upstream);
}

/// Every key of the raw serde structs, as dotted TOML paths (`site.tls.source`), read from the
/// source of `src/config/raw.rs` so that a key added there fails this test until it is
/// documented. A field whose type names another `Raw*` struct is a table of that struct.
fn raw_keys() -> BTreeSet<String> {
    let src = include_str!("../../src/config/raw.rs");
    let mut structs: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut current: Option<(String, Vec<(String, String)>)> = None;
    for l in src.lines() {
        if let Some(rest) = l.strip_prefix("pub struct ") {
            let name = rest.trim_end_matches('{').trim().to_string();
            current = Some((name, Vec::new()));
        } else if l.starts_with('}') {
            structs.extend(current.take());
        } else if let (Some((_, fields)), Some(rest)) = (current.as_mut(), l.trim().strip_prefix("pub ")) {
            let (name, ty) = rest.split_once(':').expect("a `pub name: Type,` field line");
            fields.push((name.trim().to_string(), ty.trim().trim_end_matches(',').to_string()));
        }
    }
    let mut keys = BTreeSet::new();
    let mut stack = vec![("RawConfig".to_string(), String::new())];
    while let Some((name, prefix)) = stack.pop() {
        let (_, fields) = structs.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("struct {name}"));
        for (field, ty) in fields {
            let key = if prefix.is_empty() { field.clone() } else { format!("{prefix}.{field}") };
            let nested = ty.split(|c: char| !c.is_alphanumeric()).find(|w| w.starts_with("Raw"));
            if let Some(inner) = nested {
                stack.push((inner.to_string(), key.clone()));
            }
            keys.insert(key);
        }
    }
    assert!(keys.len() > 30, "the raw.rs reader found too few keys: {keys:?}");
    keys
}

/// Keys set in a TOML value, as dotted paths without array indices.
fn set_keys(prefix: &str, value: &toml::Value, out: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                out.insert(key.clone());
                set_keys(&key, v, out);
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|v| set_keys(prefix, v, out)),
        _ => {}
    }
}

/// Keys written as commented-out examples (`# key = value`), under the section they sit in.
fn commented_keys(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for l in text.lines().map(str::trim) {
        // A table the example leaves commented out is written `# [name]`.
        let table = |t: &str| t.starts_with('[') && t.ends_with(']') && !t.contains(' ');
        if table(l) {
            section = l.trim_matches(['[', ']']).to_string();
        } else if let Some(c) = l.strip_prefix('#').filter(|c| table(c.trim())) {
            section = c.trim().trim_matches(['[', ']']).to_string();
            out.insert(section.clone());
        } else if let Some(c) = l.strip_prefix('#') {
            if let Some((k, v)) = c.split_once(" = ") {
                let k = k.trim();
                if !k.is_empty() && !v.trim().is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    out.insert(if section.is_empty() { k.to_string() } else { format!("{section}.{k}") });
                }
            }
        }
    }
    out
}

#[test]
fn example_documents_every_key_of_the_raw_structs() {
    let text = std::fs::read_to_string(config_dir().join("example.toml")).expect("example.toml");
    let mut documented = BTreeSet::new();
    let table: toml::Table = toml::from_str(&text).expect("example.toml is TOML");
    set_keys("", &toml::Value::Table(table), &mut documented);
    let commented = commented_keys(&text);
    let raw = raw_keys();
    let stale: Vec<&String> = commented.iter().filter(|k| !raw.contains(*k)).collect();
    assert!(stale.is_empty(), "example.toml documents keys the code does not read: {stale:?}");
    documented.extend(commented);
    let missing: Vec<&String> = raw.iter().filter(|k| !documented.contains(*k)).collect();
    assert!(missing.is_empty(), "example.toml does not document: {missing:?}");
    // Each key is explained: the line above every key line is a comment.
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate().skip(1) {
        let is_key = !l.starts_with('#') && !l.starts_with('[') && l.contains(" = ");
        assert!(!is_key || lines[i - 1].starts_with('#'), "example.toml:{}: `{l}` has no comment above it", i + 1);
    }
}

const GOOD_SITE: &str = r#"
[server]
https = ["127.0.0.1:8443"]

[[site]]
hostnames = ["a.example.com"]
"#;

#[test]
fn unknown_key_names_its_full_path_and_line() {
    let text = format!("{GOOD_SITE}\n[site.tls]\nsorce = \"files\"\n");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:#?}");
    let want = format!(
        "test.toml:{}: site[0].tls.sorce: unknown field `sorce`, expected one of `source`, ",
        line(&text, "sorce")
    );
    assert!(p[0].starts_with(&want), "{} does not start with {want}", p[0]);
}

#[test]
fn unknown_key_in_a_later_site_names_that_site() {
    let text = format!("{GOOD_SITE}\n[[site]]\nhostnames = [\"b.example.com\"]\nupstrem = \"https://x.example\"\n");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:#?}");
    let want =
        format!("test.toml:{}: site[1].upstrem: unknown field `upstrem`, expected one of ", line(&text, "upstrem"));
    assert!(p[0].starts_with(&want), "{} does not start with {want}", p[0]);
}

#[test]
fn bad_url_names_the_key_and_line() {
    let text = format!("{GOOD_SITE}upstream = \"api.aurinko.io\"\n");
    assert_eq!(
        problems(&text),
        vec![format!(
            "test.toml:{}: site[0].upstream: `api.aurinko.io` is not a URL: relative URL without a base",
            line(&text, "upstream =")
        )]
    );
}

#[test]
fn bad_duration_names_the_key_and_line() {
    let text = format!("{GOOD_SITE}connect_timeout = \"5 parsecs\"\n");
    assert_eq!(
        problems(&text),
        vec![format!(
            "test.toml:{}: site[0].connect_timeout: invalid value: string \"5 parsecs\", expected a duration",
            line(&text, "parsecs")
        )]
    );
}

#[test]
fn redirect_status_other_than_302_303_307_is_refused() {
    let text = format!("{GOOD_SITE}\n[site.callback]\nstatus = 301\n");
    assert_eq!(
        problems(&text),
        vec![format!("test.toml:{}: site[0].callback.status: 301: use 302, 303 or 307", line(&text, "301"))]
    );
}

#[test]
fn hostname_in_two_sites_is_refused_at_the_second() {
    let text = format!("{GOOD_SITE}\n[[site]]\nhostnames = [\"b.example.com\", \"A.example.com\"]\n");
    assert_eq!(
        problems(&text),
        vec![format!(
            "test.toml:{}: site[1].hostnames[1]: `a.example.com` belongs to site[0] too: a hostname can have one site",
            line(&text, "b.example.com")
        )]
    );
}

#[test]
fn two_default_sites_are_refused() {
    let text = "[[site]]\nhostnames = [\"a.example.com\"]\ndefault = true\n\n[[site]]\nhostnames = [\"b.example.com\"]\ndefault = true\n";
    assert_eq!(problems(text), vec!["test.toml:7: site[1].default: only one site may be the default"]);
}

#[test]
fn files_source_without_key_is_refused() {
    let text = format!("{GOOD_SITE}\n[site.tls]\nsource = \"files\"\ncert = \"/etc/tls.crt\"\n");
    assert_eq!(
        problems(&text),
        vec![format!(
            "test.toml:{}: site[0].tls.source: source = \"files\" needs `key` (a PEM file path)",
            line(&text, "source =")
        )]
    );
}

#[test]
fn https_listen_address_must_be_ip_and_port() {
    let text =
        "[server]\nhttps = [\"127.0.0.1:8443\", \"localhost:443\"]\n\n[[site]]\nhostnames = [\"a.example.com\"]\n";
    assert_eq!(
        problems(text),
        vec![
            "test.toml:2: server.https[1]: `localhost:443` is not an IP:port listen address \
             (e.g. \"0.0.0.0:443\" or \"[::]:443\")"
        ]
    );
}

/// A syntax error names the line where the parser stopped and the key it was reading (for a
/// value left open, the key that opened it), or the table when no key was being read.
#[test]
fn a_syntax_error_names_its_line_and_key() {
    let cases = [
        (
            "[server]\nhttps = [\"127.0.0.1:8443\"\n\n[[site]]\n",
            "test.toml:4: server.https: missing comma between array elements, expected `,`",
        ),
        (
            "[server]\nstorage = /var/lib\n",
            "test.toml:2: server.storage: string values must be quoted, expected literal string",
        ),
        (
            "[[site]]\nhostnames = [\"a\"]\n[[site]]\nname = \"b\"\n[site.tls]\nsource = \"files\" cert = \"x\"\n",
            "test.toml:6: site[1].tls.source: unexpected key or value, expected newline, `#`",
        ),
        (
            "[limits]\nidle_timeout = 10s\n",
            "test.toml:2: limits.idle_timeout: string values must be quoted, expected literal string",
        ),
        ("[server]\nhttps = []\nhttps = []\n", "test.toml:3: server.https: duplicate key"),
        ("[server]\nhttps = [\n  \"a\",,\n]\n", "test.toml:3: server.https: extra comma in array, expected value"),
        ("[server]\nhttps = []\n[limits\n", "test.toml:3: (file): unclosed table, expected `]`"),
    ];
    for (text, want) in cases {
        assert_eq!(problems(text), [want], "{text}");
    }
}

/// Unknown keys, mistyped values and invalid values in one file: every one is reported, top to
/// bottom, and nothing that was only blanked out to read on shows up as a second problem.
#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"[server]
https = ["localhost:443"]
admin = "127.0.0.1:9090"
colour = "blue"

[limits]
idle_timeout = "forever"

[[site]]
hostnames = ["a.example.com"]
default = true
upstream = "api.aurinko.io"

[site.tls]
source = "files"
cert = "/etc/tls.crt"
sorce = "files"

[site.callback]
status = 301

[[site]]
hostnames = ["a.example.com"]
default = true
"#;
    let p = problems(text);
    let want = [
        "test.toml:2: server.https[0]: `localhost:443` is not an IP:port listen address (e.g. \"0.0.0.0:443\" or \"[::]:443\")",
        "test.toml:4: server.colour: unknown field `colour`, expected one of ",
        "test.toml:7: limits.idle_timeout: invalid value: string \"forever\", expected a duration",
        "test.toml:12: site[0].upstream: `api.aurinko.io` is not a URL: relative URL without a base",
        "test.toml:15: site[0].tls.source: source = \"files\" needs `key` (a PEM file path)",
        "test.toml:17: site[0].tls.sorce: unknown field `sorce`, expected one of ",
        "test.toml:20: site[0].callback.status: 301: use 302, 303 or 307",
        "test.toml:23: site[1].hostnames[0]: `a.example.com` belongs to site[0] too: a hostname can have one site",
        "test.toml:24: site[1].default: only one site may be the default",
    ];
    assert_eq!(p.len(), want.len(), "{p:#?}");
    for (got, want) in p.iter().zip(want) {
        assert!(got.starts_with(want), "\n got: {got}\nwant: {want}");
    }
}

#[test]
fn a_file_is_named_as_given_and_the_error_lists_one_problem_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        "[[site]]\nhostnames = [\"a.example.com\"]\nupstream = \"ftp://x.example\"\n[site.callback]\nstatus = 200\n",
    )
    .expect("write");
    let err = Config::load(&path).expect_err("refused").to_string();
    let f = path.display();
    assert_eq!(
        err,
        format!(
            "{f}:3: site[0].upstream: `ftp://x.example` must be an https:// (or http://) URL\n\
             {f}:5: site[0].callback.status: 200: use 302, 303 or 307"
        )
    );
    let missing = Config::load(&dir.path().join("nope.toml")).expect_err("missing file").to_string();
    assert!(missing.starts_with(&format!("{}: cannot read: ", dir.path().join("nope.toml").display())), "{missing}");
}

#[test]
fn plain_http_upstream_and_mixed_modes_are_warnings() {
    let text = format!("{GOOD_SITE}upstream = \"http://127.0.0.1:9000\"\n\n[site.authorize]\nmode = \"proxy\"\n");
    let c = Config::parse("test.toml", &text).expect("accepted with warnings");
    let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        w,
        vec![
            format!(
                "test.toml:{}: site[0].upstream: plain http:// upstream: tokens and codes cross the network unencrypted",
                line(&text, "upstream =")
            ),
            format!(
                "test.toml:{}: site[0].authorize.mode: authorize is proxied while the callback is redirected: \
                 the broker's cookies would land on two domains",
                line(&text, "mode =")
            ),
        ]
    );
}
/// Unknown tables and values of the wrong type are read past too, without knock-on problems
/// from the keys inside an unknown table.
#[test]
fn unknown_tables_and_mistyped_tables_are_read_past() {
    let text = "[bogus]\nx = 1\n\n[[site]]\nhostnames = [\"a.example.com\"]\nupstream = \"nope\"\n\
                callback = \"x\"\n\n[site.extra]\ny = 2\n\n[site.tls]\nsorce = 1\n";
    let p = problems(text);
    let want = [
        "test.toml:1: bogus: unknown field `bogus`, expected one of `server`, `limits`, `log`, `health`, `outbound`, `redis`, `site`",
        "test.toml:6: site[0].upstream: `nope` is not a URL: relative URL without a base",
        "test.toml:7: site[0].callback: invalid type: string \"x\", expected a table",
        "test.toml:9: site[0].extra: unknown field `extra`, expected one of `name`, ",
        "test.toml:13: site[0].tls.sorce: unknown field `sorce`, expected one of `source`, ",
    ];
    assert_eq!(p.len(), want.len(), "{p:#?}");
    for (got, want) in p.iter().zip(want) {
        assert!(got.starts_with(want), "\n got: {got}\nwant: {want}");
    }
}

#[test]
fn an_outbound_proxy_must_be_an_http_url_and_its_password_is_never_shown() {
    let text =
        "[[site]]\nhostnames = [\"a.example.com\"]\n\n[outbound]\nproxy = \"https://relay:pw123@proxy.corp:3128\"\n";
    assert_eq!(
        problems(text),
        ["test.toml:5: outbound.proxy: [outbound] proxy: https://relay:***@proxy.corp:3128 is a https:// proxy; the \
          relay speaks to HTTP proxies only (http://host:port, tunnelling with CONNECT)"]
    );
    let text = "[[site]]\nhostnames = [\"a.example.com\"]\n\n[outbound]\nproxy = \"http://proxy.corp:3128/x\"\n";
    assert_eq!(
        problems(text),
        ["test.toml:5: outbound.proxy: [outbound] proxy: http://proxy.corp:3128 is not a proxy URL (a proxy URL has \
          no path, query or fragment)"]
    );

    let text = "[[site]]\nhostnames = [\"a.example.com\"]\n\n[outbound]\nproxy = \"direct\"\nno_proxy = [\"x\"]\n";
    let c = Config::parse("test.toml", text).expect("accepted with a warning");
    assert_eq!(c.outbound.summary(), "direct");
    let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        w,
        ["test.toml:6: outbound.no_proxy: only used with a proxy URL; with proxy = \"direct\" it does nothing"]
    );

    let text = "[[site]]\nhostnames = [\"a.example.com\"]\n\n[outbound]\nproxy = \"proxy.corp:3128\"\nno_proxy = [\".corp\", \"10.0.0.0/8\"]\n";
    let c = Config::parse("test.toml", text).expect("a proxy without a scheme is http://, as for curl");
    assert_eq!(c.outbound.summary(), "http://proxy.corp:3128, except .corp,10.0.0.0/8");
}

#[test]
fn proxy_sources_are_networks_and_the_tls_version_is_known() {
    let text = "[server]\nhttps = [\"127.0.0.1:8443\"]\nproxy_protocol_from = [\"10.0.0.0/8\", \"192.0.2.7\",\n  \"lb.internal\"]\n\n[[site]]\nhostnames = [\"a.example.com\"]\n";
    assert_eq!(
        problems(text),
        vec![format!(
            "test.toml:{}: server.proxy_protocol_from[2]: `lb.internal` is not a network or an IP address \
             (e.g. \"10.0.0.0/8\", \"192.0.2.7\" or \"2001:db8::/32\")",
            line(text, "lb.internal")
        )]
    );

    let text =
        "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"azure-gw\"]\n\n[[site]]\nhostnames = [\"a.example.com\"]\n";
    assert_eq!(
        problems(text),
        ["test.toml:2: server.trusted_proxies[1]: `azure-gw` is not a network or an IP address (e.g. \"10.0.0.0/8\", \
          \"192.0.2.7\" or \"2001:db8::/32\")"]
    );

    let text = "[server]\nhttps = [\"127.0.0.1:8443\"]\nproxy_protocol_from = [\"10.1.2.3/8\", \"::/0\"]\n\n[[site]]\nhostnames = [\"a.example.com\"]\n";
    let c = Config::parse("test.toml", text).expect("accepted with a warning");
    let nets: Vec<String> = c.server.proxy_protocol_from.iter().map(ToString::to_string).collect();
    assert_eq!(nets, ["10.0.0.0/8", "::/0"]);
    let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        w,
        ["test.toml:3: server.proxy_protocol_from[1]: `::/0` lets any peer name its own client address: \
             make sure only the load balancer can reach the listeners"]
    );
}

#[test]
fn a_hostname_twice_in_one_site_is_named_as_such() {
    let text = "[[site]]\nhostnames = [\"a.example.com\", \"A.example.com.\"]\n";
    assert_eq!(problems(text), ["test.toml:2: site[0].hostnames[1]: `a.example.com` is listed twice in this site"]);
}

#[test]
fn two_thousand_sites_sharing_a_hostname_each_get_their_line() {
    // One parse of the file for all the problems, not one per problem (that took minutes).
    let text: String =
        (0..2000).map(|i| format!("[[site]]\nname = \"s{i}\"\nhostnames = [\"same.example.com\"]\n\n")).collect();
    let p = problems(&text);
    assert_eq!(p.len(), 1999);
    assert_eq!(
        p[0],
        "test.toml:7: site[1].hostnames[0]: `same.example.com` belongs to site[0] too: a hostname can have one site"
    );
    assert_eq!(
        p[1998],
        "test.toml:7999: site[1999].hostnames[0]: `same.example.com` belongs to site[0] too: a hostname can have one site"
    );
}

#[test]
fn control_characters_in_a_value_are_escaped_in_its_message() {
    let text = "[[site]]\nhostnames = [\"a\\u001b[31mb.example\\nforged: line\"]\n";
    assert_eq!(
        problems(text),
        [
            "test.toml:2: site[0].hostnames[0]: `a\\u{1b}[31mb.example\\nforged: line` is not a DNS hostname (IP addresses \
             and bare wildcards are not allowed)"
        ]
    );
}

#[test]
fn combinations_that_cannot_work_are_refused_with_their_line() {
    let site = |extra: &str| {
        format!("[server]\nhttps = [\"127.0.0.1:8443\"]\n\n[[site]]\nhostnames = [\"a.example.com\"]\n{extra}")
    };
    let cases: [(String, &str, &str); 9] = [
        (
            site(
                "[site.tls]\nsource = \"acme\"\ndirectory = \"letsencrypt-staging\"\ncontact = [\"mailto:ops@example.com\"]\nterms_agreed = true\nchallenge = \"http-01\"\n",
            ),
            "challenge",
            "site[0].tls.challenge: http-01 is answered on the plain-HTTP listener: add one (`[server] http = [\"0.0.0.0:80\"]`) or use \"tls-alpn-01\"",
        ),
        (
            site("[site.authorize]\npaths = [\"/healthz\"]\n"),
            "/healthz",
            "site[0].authorize.paths[0]: `/healthz` is taken by the health check, answered before any route: choose another path",
        ),
        (
            site("[site.callback]\npath = \"/v1/auth/token/callback\"\n"),
            "/v1/auth/token/callback",
            "site[0].callback.path: `/v1/auth/token/callback` is taken by the token route (token.path_prefix = \"/v1/auth/token/\"): choose another path",
        ),
        (
            site("[site.callback]\npath = \"/.well-known/acme-challenge/x\"\n"),
            "acme-challenge",
            "site[0].callback.path: `/.well-known/acme-challenge/x` is taken by ACME HTTP-01 answers: choose another path",
        ),
        (
            site("[site.callback]\npath = \"/v1/caf\u{e9}\"\n"),
            "caf",
            "site[0].callback.path: `/v1/caf\u{e9}` must be printable ASCII (percent-encode anything else)",
        ),
        (
            site("[site.callback]\npath = \"/v1/\\tx\"\n"),
            "/v1/",
            "site[0].callback.path: `/v1/\\tx` must be printable ASCII (percent-encode anything else)",
        ),
        (
            site("[site.callback]\npath = \"/v1/../callback\"\n"),
            "/v1/..",
            "site[0].callback.path: `/v1/../callback` must not have `.` or `..` segments (requests with them are refused)",
        ),
        (
            site("upstream = \"https://broker.example.com:0\"\n"),
            "broker",
            "site[0].upstream: `https://broker.example.com:0` has port 0, which nothing can be reached on",
        ),
        (
            "[server]\nhsts = \"max-age=abc\"\n\n[[site]]\nhostnames = [\"a.example.com\"]\n".to_string(),
            "hsts",
            "server.hsts: must be a Strict-Transport-Security value such as \"max-age=31536000\", or \"\" to send none",
        ),
    ];
    for (text, needle, want) in &cases {
        assert_eq!(problems(text), [format!("test.toml:{}: {want}", line(text, needle))], "{text}");
    }
    let blank = "[server]\nstorage = \"  \"\n\n[[site]]\nhostnames = [\"a.example.com\"]\n";
    assert_eq!(problems(blank), ["test.toml:2: server.storage: must name a folder, or a redis:// or rediss:// URL"]);
}

#[test]
fn two_sites_whose_names_would_share_files_are_refused() {
    let text = "[[site]]\nname = \"auth\"\nhostnames = [\"a.example.com\"]\n\n[[site]]\nname = \"auth\"\nhostnames = [\"b.example.com\"]\n\n\
                [[site]]\nname = \"my site\"\nhostnames = [\"c.example.com\"]\n\n[[site]]\nname = \"my/site\"\nhostnames = [\"d.example.com\"]\n";
    assert_eq!(
        problems(text),
        [
            "test.toml:6: site[1].name: `auth` is also site[0]'s name: names must differ".to_string(),
            "test.toml:14: site[3].name: `my/site` and site[2]'s `my site` name the same files: use names that differ in letters or digits".to_string(),
        ]
    );
}

#[test]
fn a_plain_http_route_upstream_is_a_warning() {
    let text = "[[site]]\nhostnames = [\"a.example.com\"]\n\n[site.token]\nupstream = \"http://10.0.0.5:8080\"\n";
    let config = Config::parse("test.toml", text).expect("accepted");
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        ["test.toml:5: site[0].token.upstream: plain http:// upstream: tokens and codes cross the network unencrypted"]
    );
}

/// Every wait outside `[limits]` has a range; a value outside it (the largest duration TOML
/// can say, a zero where zero is no bound) is refused at its line, so nothing in the relay adds
/// it to a clock.
#[test]
fn durations_outside_their_range_are_refused_with_their_line() {
    const HUGE: &str = "\"18446744073709551615s\"";
    let acme = "source = \"acme\"\ndirectory = \"letsencrypt-staging\"\nterms_agreed = true\n";
    let cases: [(&str, &str, &str, &str); 12] = [
        ("[health]", "upstream_probe_interval", HUGE, "10ms to 1day (or \"0s\" to turn it off)"),
        ("[health]", "upstream_probe_interval", "\"1ms\"", "10ms to 1day (or \"0s\" to turn it off)"),
        ("[health]", "upstream_probe_timeout", "\"0s\"", "100ms to 1day"),
        ("[health]", "upstream_unreachable_window", HUGE, "0s to 1day"),
        ("[health]", "cert_expiry_margin", "\"400d\"", "0s to 1year"),
        ("[health]", "clock_skew_warn", HUGE, "0s to 1day"),
        ("[site.tls]", "reload_interval", HUGE, "10ms to 1day"),
        ("[site.tls]", "retry_min", HUGE, "10ms to 1day"),
        ("[site.tls]", "retry_max", HUGE, "10ms to 1day"),
        ("[site.tls]", "renew_when_left", HUGE, "1s to 10years"),
        ("[limits]", "idle_timeout", HUGE, "100ms to 1day"),
        ("[limits]", "shutdown_grace", "\"25h\"", "0s to 1day"),
    ];
    for (table, key, value, range) in cases {
        let site = "[[site]]\nhostnames = [\"a.example.com\"]\n";
        let extra = if table == "[site.tls]" && key != "reload_interval" { acme } else { "" };
        let text = if table.starts_with("[site") {
            format!("{site}{table}\n{extra}{key} = {value}\n")
        } else {
            format!("{table}\n{key} = {value}\n\n{site}")
        };
        let path = match table {
            "[site.tls]" => format!("site[0].tls.{key}"),
            t => format!("{}.{key}", t.trim_matches(['[', ']'])),
        };
        let shown = humantime::format_duration(humantime::parse_duration(value.trim_matches('"')).unwrap());
        let want = format!("test.toml:{}: {path}: `{shown}` is out of range: use {range}", line(&text, key));
        let p = problems(&text);
        assert!(p.contains(&want), "{want}\nnot in {p:#?}");
    }
    for (key, value) in [("connect_timeout", HUGE), ("response_timeout", "\"0s\"")] {
        let text = format!("[[site]]\nhostnames = [\"a.example.com\"]\n{key} = {value}\n");
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].starts_with(&format!("test.toml:3: site[0].{key}: `")), "{p:#?}");
        assert!(p[0].ends_with("is out of range: use 100ms to 1day"), "{p:#?}");
    }
    let port = "[server]\npublic_https_port = 0\n\n[[site]]\nhostnames = [\"a.example.com\"]\n";
    assert_eq!(
        problems(port),
        ["test.toml:2: server.public_https_port: must be the port clients connect to, 1 to 65535"]
    );
}

/// Every key of the example, set or commented out, says what values it takes: a `Valid:` line
/// in the comment paragraph above it (keys written together share one).
#[test]
fn example_gives_every_key_its_valid_range() {
    let text = std::fs::read_to_string(config_dir().join("example.toml")).expect("example.toml");
    let lines: Vec<&str> = text.lines().collect();
    let is_key = |l: &str| {
        let l = l.strip_prefix("# ").unwrap_or(l);
        l.split_once(" = ").is_some_and(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
    };
    let mut unexplained = Vec::new();
    for (i, l) in lines.iter().enumerate().filter(|(_, l)| is_key(l)) {
        let above = lines[..i].iter().rev().skip_while(|l| is_key(l));
        let paragraph: Vec<&&str> = above.take_while(|l| l.starts_with('#') && l.trim() != "#").collect();
        if !paragraph.iter().any(|l| l.contains("Valid:")) && !l.starts_with("# source = ") {
            unexplained.push(format!("example.toml:{}: {l}", i + 1));
        }
    }
    assert!(unexplained.is_empty(), "keys without a `Valid:` line: {unexplained:#?}");
}

/// Listeners `serve` could not bind together are refused at the later one: the same address
/// twice, `[::]` beside `0.0.0.0` on one port (Linux binds `[::]` dual-stack), an unspecified
/// address beside one of its family, whichever of https, http and admin they belong to.
#[test]
fn overlapping_listen_addresses_are_refused_at_the_later_one() {
    let server = |lines: &str| format!("[server]\n{lines}\n\n[[site]]\nhostnames = [\"a.example.com\"]\n");
    let cases = [
        (
            "https = [\"0.0.0.0:8443\", \"[::]:8443\"]",
            "test.toml:2: server.https[1]: `[::]:8443` overlaps `0.0.0.0:8443` (server.https[0]): `[::]` takes IPv4 \
             addresses too (dual stack): list it alone to serve both; one socket cannot take both",
        ),
        (
            "https = [\"127.0.0.1:8443\"]\nhttp = [\"127.0.0.1:8443\"]",
            "test.toml:3: server.http[0]: `127.0.0.1:8443` overlaps `127.0.0.1:8443` (server.https[0]): the same \
             address; one socket cannot take both",
        ),
        (
            "https = [\"0.0.0.0:9090\"]\nadmin = \"127.0.0.1:9090\"",
            "test.toml:3: server.admin: `127.0.0.1:9090` overlaps `0.0.0.0:9090` (server.https[0]): an unspecified \
             address takes every address of its family; one socket cannot take both",
        ),
        (
            "https = [\"[::1]:8443\", \"[::ffff:127.0.0.1]:9443\", \"127.0.0.1:9443\"]",
            "test.toml:2: server.https[2]: `127.0.0.1:9443` overlaps `[::ffff:127.0.0.1]:9443` (server.https[1]): the \
             same address; one socket cannot take both",
        ),
    ];
    for (lines, want) in cases {
        assert_eq!(problems(&server(lines)), [want], "{lines}");
    }
    // Different addresses on one port, two families, and port 0 (any free port) all bind.
    for ok in [
        "https = [\"127.0.0.1:8443\", \"127.0.0.2:8443\"]",
        "https = [\"0.0.0.0:8443\", \"[::1]:8443\"]",
        "https = [\"127.0.0.1:0\"]\nhttp = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"",
    ] {
        Config::parse("test.toml", &server(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

/// A control character in any string value (written as an escape) is refused at its key, so
/// no name or path reaches a terminal, a log line or the CA with one.
#[test]
fn control_characters_are_refused_in_every_string_value() {
    let text = "[server]\nstorage = \"certs\\u0000\"\n\n[[site]]\nname = \"a\\u001b[31mred\\nforged\"\nhostnames = [\"a.example.com\"]\n\n\
                [site.tls]\nsource = \"files\"\ncert = \"/etc/tls\\tx.crt\"\nkey = \"/etc/tls/x.key\"\n";
    assert_eq!(
        problems(text),
        [
            "test.toml:2: server.storage: control characters are not allowed (found '\\0')",
            "test.toml:5: site[0].name: control characters are not allowed (found '\\u{1b}')",
            "test.toml:10: site[0].tls.cert: control characters are not allowed (found '\\t')",
        ]
    );
}
