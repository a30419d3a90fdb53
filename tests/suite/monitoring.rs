//! What an operator's Prometheus and Grafana get from deploy/: the alert rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`: firing and quiet
//! cases), every runbook link leads to a section of docs/monitoring.md, the dashboard's queries
//! are valid PromQL, and every metric the rules and the dashboard query is exported by a
//! running relay's `/metrics`.
//!
//! scripts/test puts promtool (from Debian's prometheus package) on the PATH; without it the
//! promtool checks say so and pass.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use common::client::plain_get;
use common::pebble::{Pebble, PebbleOptions};
use common::{Pki, RelayUnderTest, Upstream, UpstreamBehaviour};
use serde::Deserialize;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The rules file, as far as these tests read it.
#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<Group>,
}

#[derive(Deserialize)]
struct Group {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

fn rules() -> Vec<Rule> {
    let file: RuleFile = serde_norway::from_str(&read("deploy/prometheus/alerts.yaml")).expect("alerts.yaml");
    file.groups.into_iter().flat_map(|g| g.rules).collect()
}

/// Every PromQL query of the dashboard, with Grafana's variables replaced by what Prometheus
/// would receive (`$instance` matching every relay).
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/oauth-relay.json")).expect("dashboard JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel {title} has no targets"));
        assert!(!targets.is_empty(), "panel {title} has no queries");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title}: a target without expr"));
            out.push((title.clone(), expr.replace("$__rate_interval", "5m").replace("$instance", ".+")));
        }
    }
    let vars = dash["templating"]["list"].as_array().expect("templating");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        // label_values(metric, label): only the metric is PromQL.
        let q = v["definition"].as_str().expect("query variable definition");
        let metric = q.trim_start_matches("label_values(").split(',').next().expect("metric").trim();
        out.push((format!("variable {}", v["name"]), metric.to_string()));
    }
    out
}

/// The `oauth_relay_*` names a PromQL expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("oauth_relay_") {
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

fn promtool(args: &[&str], dir: &Path) -> Option<Output> {
    let out = Command::new("promtool").args(args).current_dir(dir).output();
    match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped: promtool is not installed (scripts/test puts it on the PATH)");
            None
        }
        other => Some(other.expect("run promtool")),
    }
}

fn assert_success(what: &str, o: &Output) {
    assert!(
        o.status.success(),
        "{what}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo().join("deploy/prometheus");
    let Some(check) = promtool(&["check", "rules", "alerts.yaml"], &dir) else { return };
    assert_success("promtool check rules", &check);
    let n = rules().len();
    assert!(String::from_utf8_lossy(&check.stdout).contains(&format!("SUCCESS: {n} rules found")));
    let test = promtool(&["test", "rules", "alerts.test.yaml"], &dir).expect("promtool");
    assert_success("promtool test rules", &test);

    // Every alert has a firing case and a quiet case in the unit tests.
    let tests = read("deploy/prometheus/alerts.test.yaml");
    for rule in rules() {
        let cases: Vec<&str> = tests.lines().filter(|l| l.contains(&format!("alertname: {}", rule.alert))).collect();
        assert!(cases.iter().any(|l| l.contains("exp_alerts: []")), "{}: no case where it stays quiet", rule.alert);
        assert!(cases.iter().any(|l| !l.contains("exp_alerts: []")), "{}: no case where it fires", rule.alert);
    }
}

#[test]
fn the_alerts_the_issue_asks_for_exist_each_with_summary_and_runbook() {
    let names: Vec<String> = rules().iter().map(|r| r.alert.clone()).collect();
    for want in [
        "OAuthRelayCertificateRenewalFailing",
        "OAuthRelayAcmeFailuresRepeating",
        "OAuthRelayUpstreamUnreachable",
        "OAuthRelayNotReady",
        "OAuthRelayTokenErrors",
        "OAuthRelayConnectionCapReached",
        "OAuthRelayReloadRefused",
        "OAuthRelayClockSkew",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    // Runbook links go to a heading of docs/monitoring.md (GitHub's anchor for `### Not ready`
    // is `#not-ready`).
    let doc = read("docs/monitoring.md");
    let anchors: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == ' ' || *c == '-')
                .collect::<String>()
                .replace(' ', "-")
        })
        .collect();
    for rule in rules() {
        let summary = rule.annotations.get("summary").map(String::as_str).unwrap_or_default();
        assert!(!summary.is_empty(), "{} has no summary", rule.alert);
        let url = rule.annotations.get("runbook_url").unwrap_or_else(|| panic!("{} has no runbook_url", rule.alert));
        let anchor = url.strip_prefix("docs/monitoring.md#").unwrap_or_else(|| panic!("{}: {url}", rule.alert));
        assert!(anchors.contains(anchor), "{}: no `### ` heading for #{anchor} in docs/monitoring.md", rule.alert);
        assert!(doc.contains(&format!("`{}`", rule.alert)), "docs/monitoring.md does not name {}", rule.alert);
    }
}

#[test]
fn dashboard_queries_are_valid_promql() {
    // promtool parses PromQL when it checks rules: one recording rule per query.
    let queries = dashboard_queries();
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        file.push_str(&format!("      - record: dashboard:query_{i}\n        expr: {}\n", serde_json::json!(expr)));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("dashboard.yaml"), file).expect("write rules");
    let Some(check) = promtool(&["check", "rules", "dashboard.yaml"], dir.path()) else { return };
    assert_success("promtool check rules (the dashboard's queries)", &check);
}

#[test]
fn dashboard_shows_what_operators_look_at() {
    let used: BTreeSet<String> = dashboard_queries().iter().flat_map(|(_, q)| metric_names(q)).collect();
    for name in [
        "oauth_relay_requests_total",
        "oauth_relay_request_duration_seconds_bucket",
        "oauth_relay_tls_handshakes_total",
        "oauth_relay_tls_handshake_failures_total",
        "oauth_relay_open_connections",
        "oauth_relay_certificate_not_after_seconds",
        "oauth_relay_acme_orders_total",
        "oauth_relay_acme_order_failures_total",
        "oauth_relay_upstream_duration_seconds_bucket",
        "oauth_relay_upstream_errors_total",
    ] {
        assert!(used.contains(name), "the dashboard does not query {name}");
    }
}

/// The sample names `/metrics` can carry, from its `# TYPE` lines: a family declared there is
/// exported even before its first labelled series exists (an ACME failure, a probe).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().expect("name"), parts.next().expect("type"));
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(if name.ends_with(s) { name.to_string() } else { format!("{name}{s}") });
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().expect("sample name");
            names.insert(name.to_string());
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_dashboard_query_is_exported_by_a_running_relay() {
    // A relay with an admin listener and two sites: one with a certificate from files and a
    // probed upstream (the probe series), one whose ACME orders Pebble accepts and then cannot
    // validate, its validation ports refusing (the order and failure series, which appear with
    // their first event).
    let pki = Pki::new();
    let now = SystemTime::now();
    let leaf = pki.leaf_with_validity(
        "relay",
        &["auth.example.test"],
        now - Duration::from_secs(3600),
        now + Duration::from_secs(30 * 86400),
    );
    let up_leaf = pki.leaf("upstream", &["127.0.0.1"]);
    let upstream = Upstream::start_at(
        "127.0.0.1:0".parse().unwrap(),
        Some(pki.server_config(&up_leaf, &[b"http/1.1"])),
        UpstreamBehaviour::fixed(404, &[], "no such page"),
    )
    .await;
    // Bound and never listening: connections to it are refused, and no other test takes it.
    let held = tokio::net::TcpSocket::new_v4().expect("socket");
    held.bind(([127, 0, 0, 1], 0).into()).expect("bind");
    let dead = held.local_addr().expect("addr").port();
    let pebble = Pebble::start(PebbleOptions::new(dead, dead)).await;
    let config = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\npublic_https_port = 443\nstorage = \"{storage}\"\n\n\
         [health]\nupstream_probe_interval = \"50ms\"\nupstream_probe_timeout = \"1s\"\n\n\
         [[site]]\nname = \"auth\"\nhostnames = [\"auth.example.test\"]\n\
         upstream = \"https://{up}\"\nupstream_ca_file = \"{ca}\"\n\n\
         [site.tls]\nsource = \"files\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
         [[site]]\nname = \"acme\"\nhostnames = [\"acme.relay.test\"]\nupstream = \"https://{up}\"\n\
         upstream_ca_file = \"{ca}\"\n\n\
         [site.tls]\nsource = \"acme\"\ndirectory = \"{directory}\"\ndirectory_ca_file = \"{acme_ca}\"\n\
         contact = [\"ops@relay.test\"]\nterms_agreed = true\nretry_min = \"100ms\"\nretry_max = \"400ms\"\n",
        storage = pki.dir.path().join("certs").display(),
        up = upstream.addr,
        ca = pki.ca_path.display(),
        cert = leaf.cert_path.display(),
        key = leaf.key_path.display(),
        directory = pebble.directory_url(),
        acme_ca = pebble.ca_path().display(),
    );
    let mut relay = RelayUnderTest::start(&config).await;
    let admin = relay.admin.expect("admin listener");

    // Scrape until the first probe's and the first failed order's series are in (bounded: 30 s).
    let until = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let reply = plain_get(admin, "localhost", "/metrics").await;
        assert_eq!(reply.status, 200);
        let text = String::from_utf8(reply.body.to_vec()).expect("utf-8 metrics");
        let has = |s: &str| text.contains(&format!("{s}{{"));
        if has("oauth_relay_upstream_clock_skew_seconds") && has("oauth_relay_acme_order_failures_total") {
            break text;
        }
        assert!(Instant::now() < until, "no probe result or ACME failure in /metrics within 30 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let upstream_label = format!("upstream=\"https://{}\"", upstream.addr);
    assert!(text.contains(&format!("oauth_relay_upstream_up{{{upstream_label}}} 1\n")), "{text}");
    // Not ready: the ACME site has no certificate yet.
    assert!(text.contains("\noauth_relay_ready 0\n"), "{text}");
    assert!(text.contains("\noauth_relay_connections_max 10000\n"), "{text}");
    assert!(text.contains("oauth_relay_certificate_not_after_seconds{hostname=\"auth.example.test\"} "), "{text}");
    assert!(text.contains("oauth_relay_acme_orders_total{hostname=\"acme.relay.test\"} "), "{text}");

    let exported = exported_names(&text);
    let mut queried: Vec<(String, String)> = Vec::new();
    for rule in rules() {
        queried.extend(metric_names(&rule.expr).into_iter().map(|n| (format!("alert {}", rule.alert), n)));
    }
    for (panel, q) in dashboard_queries() {
        queried.extend(metric_names(&q).into_iter().map(|n| (format!("panel {panel}"), n)));
    }
    assert!(queried.len() > 20, "the name extraction found too little: {queried:?}");
    let missing: Vec<&(String, String)> = queried.iter().filter(|(_, n)| !exported.contains(n)).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}\nexported: {exported:?}");
    relay.stop().await;
}
