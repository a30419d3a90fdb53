//! The whole sign-in in a real browser: headless Chromium (Debian's `chromium`, driven by
//! Playwright for Python through `tests/browser/signin.py`) goes from the application through
//! the relay to a broker, on to an identity provider, back through the relay's callback to the
//! broker, and on to the application. The broker, identity provider and application are real
//! HTTPS servers on loopback with certificates from a test CA that Chromium trusts through its
//! NSS database (no `--ignore-certificate-errors`); host names map to 127.0.0.1 for the browser
//! only.
//!
//! One relay serves two sites: `relay.test` redirects (the default) and `proxy.test` proxies
//! both authorize and callback. Every response mode (query, form_post, fragment), an error and
//! an admin-consent callback run through both, with hostile `state` values. The broker must
//! receive exactly what the identity provider sent (as the browser encodes it: raw non-ASCII
//! bytes become `%XX`), and the application must be reached. Screenshots of the fragment page
//! and of error pages must show their text.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use serde_json::{Value, json};

use crate::common::process::{ChildGuard, free_addr};
use crate::common::{self, Pki, Recorded, RelayUnderTest, Upstream, UpstreamBehaviour};

const REDIRECTING: &str = "relay.test";
const PROXYING: &str = "proxy.test";
const IDP: &str = "idp.test";
const APP: &str = "app.test";

/// `state` values that break relays which decode and re-encode: `+`, `%2B` and `%20` (three
/// spellings that differ), percent-encoded UTF-8, repeated and empty keys and values, and raw
/// UTF-8 (which the browser sends percent-encoded).
const STATES: [&str; 3] = ["state=a+b%2Bc%20d", "state=%E2%9C%93%C3%A9&state=&k=&=v&&k=2", "state=\u{2713}\u{e9}+x%2B"];

/// How the identity provider hands its answer to the callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResponseMode {
    Query,
    FormPost,
    Fragment,
}

/// One sign-in: through which site, in which response mode, with what answer from the
/// identity provider (a query string; `session_state` names the case).
#[derive(Clone, Debug)]
struct Case {
    site: &'static str,
    mode: ResponseMode,
    answer: String,
}

/// Every sign-in the browser runs, through both sites.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for site in [REDIRECTING, PROXYING] {
        for mode in [ResponseMode::Query, ResponseMode::FormPost, ResponseMode::Fragment] {
            for state in STATES {
                let n = cases.len();
                cases.push(Case { site, mode, answer: format!("code=M.c{n}%2Bx_y&{state}&session_state={n}") });
            }
        }
        let n = cases.len();
        let error = "error=access_denied&error_description=AADSTS65004%3A+User+declined+to+consent.&state=s%2B1";
        cases.push(Case { site, mode: ResponseMode::Query, answer: format!("{error}&session_state={n}") });
        let n = cases.len();
        let consent = "admin_consent=True&tenant=72f988bf-86f1-41af-91ab-2d7cd011db47&scope=https%3A%2F%2Fgraph.\
                       microsoft.com%2F.default&state=s+1";
        cases.push(Case { site, mode: ResponseMode::Query, answer: format!("{consent}&session_state={n}") });
    }
    cases
}

/// The pairs of a query or form body, decoded.
fn pairs(text: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(text).into_owned().collect()
}

/// The value of `key` in a query or form body.
fn value_of(text: &[u8], key: &str) -> Option<String> {
    pairs(text).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// `text` as a browser sends it in a URL: every byte outside ASCII as `%XX`.
fn browser_encoded(text: &str) -> String {
    text.bytes().map(|b| if b.is_ascii() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// Text for an HTML attribute value in double quotes.
fn attribute(text: &str) -> String {
    text.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;")
}

fn redirect_to(location: &str) -> Response<Full<Bytes>> {
    Response::builder().status(302).header("location", location).body(Full::new(Bytes::new())).unwrap()
}

fn html(extra: &[(&str, &str)], body: String) -> Response<Full<Bytes>> {
    let mut r = Response::builder().header("content-type", "text/html; charset=utf-8");
    for (k, v) in extra {
        r = r.header(*k, *v);
    }
    r.body(Full::new(Bytes::from(body))).unwrap()
}

/// The case a request names with `case=N` in its query, or `session_state=N` in its query or
/// form body.
fn case_of(rec: &Recorded, cases: &[Case]) -> Option<usize> {
    let query = rec.target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let n = value_of(query.as_bytes(), "case")
        .or_else(|| value_of(query.as_bytes(), "session_state"))
        .or_else(|| value_of(&rec.body, "session_state"))?;
    n.parse().ok().filter(|n| *n < cases.len())
}

/// The identity provider: its authorize endpoint answers the case's callback in its response
/// mode, to the `redirect_uri` the broker sent.
fn identity_provider(cases: Arc<Vec<Case>>) -> UpstreamBehaviour {
    UpstreamBehaviour::respond(move |rec| {
        let query = rec.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let (Some(n), Some(back)) = (case_of(rec, &cases), value_of(query.as_bytes(), "redirect_uri")) else {
            return html(&[], "no such sign-in".into());
        };
        let case = &cases[n];
        match case.mode {
            ResponseMode::Query => redirect_to(&format!("{back}?{}", case.answer)),
            ResponseMode::Fragment => redirect_to(&format!("{back}#{}", case.answer)),
            ResponseMode::FormPost => {
                let fields: String = pairs(case.answer.as_bytes())
                    .iter()
                    .filter(|(k, _)| !k.is_empty())
                    .map(|(k, v)| {
                        format!("<input type=\"hidden\" name=\"{}\" value=\"{}\">", attribute(k), attribute(v))
                    })
                    .collect();
                html(
                    &[],
                    format!(
                        "<!doctype html><html><body><form method=\"post\" action=\"{}\">{fields}</form>\
                         <script>document.forms[0].submit()</script></body></html>",
                        attribute(&back)
                    ),
                )
            }
        }
    })
}

/// The broker: authorize sends the browser (by a relative `Location`) to a consent page of its
/// own, which the relay does not route; that page sends it to the identity provider with the
/// relay's callback as `redirect_uri`; the callback sends it on to the application.
fn broker(cases: Arc<Vec<Case>>, origins: Arc<OnceLock<Origins>>) -> UpstreamBehaviour {
    UpstreamBehaviour::respond(move |rec| {
        let o = origins.get().expect("origins set before the browser starts");
        let path = rec.target.split('?').next().unwrap_or("");
        let Some(n) = case_of(rec, &cases) else {
            return Response::builder().status(400).body(Full::new(Bytes::from("callback without code\n"))).unwrap();
        };
        match path {
            "/v1/auth/authorize" => redirect_to(&format!("/v1/auth/consent?case={n}")),
            "/v1/auth/consent" => {
                let callback = format!("https://{}:{}/v1/auth/callback", cases[n].site, o.relay_port);
                let query = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("client_id", "entra-app")
                    .append_pair("redirect_uri", &callback)
                    .append_pair("case", &n.to_string())
                    .finish();
                redirect_to(&format!("{}/authorize?{query}", o.idp))
            }
            "/v1/auth/callback" => redirect_to(&format!("{}/done?case={n}", o.app)),
            _ => Response::builder().status(404).body(Full::new(Bytes::new())).unwrap(),
        }
    })
}

/// The application: where the broker sends the browser at the end, and a page whose inline
/// script its CSP forbids (it proves that CSP violations are seen).
fn application() -> UpstreamBehaviour {
    UpstreamBehaviour::respond(|rec| {
        if rec.target.starts_with("/csp-probe") {
            return html(
                &[("content-security-policy", "default-src 'none'")],
                "<!doctype html><p>probe</p><script>document.title='ran'</script>".into(),
            );
        }
        html(&[], format!("<!doctype html><h1>Signed in</h1><p>{}</p>", attribute(&rec.target)))
    })
}

/// Where the parts answer, once they are bound.
struct Origins {
    relay_port: u16,
    idp: String,
    app: String,
}

/// The Python that has Playwright: `OAUTH_RELAY_BROWSER_PYTHON`, else the virtual environment
/// `scripts/test` makes under the target folder.
fn browser_python() -> PathBuf {
    if let Some(p) = std::env::var_os("OAUTH_RELAY_BROWSER_PYTHON") {
        return p.into();
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target folder").to_path_buf();
    target.join("test-venv/bin/python")
}

/// Runs `signin.py` on `cases` (at most 3 minutes) and returns its result per case.
async fn run_browser(pki: &Pki, cases: Vec<Value>) -> Vec<Value> {
    let home = tempfile::tempdir().expect("tempdir");
    let spec = json!({
        "home": home.path(),
        "ca": pki.ca_path,
        "chromium": "/usr/bin/chromium",
        "hosts": [REDIRECTING, PROXYING, IDP, APP],
        "cases": cases,
    });
    let spec_path = home.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).expect("write spec");
    let python = browser_python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/signin.py");
    // Output to files: a pipe nobody reads while the test waits could fill and stall the child.
    let (out_path, err_path) = (home.path().join("results.json"), home.path().join("stderr.txt"));
    let child = std::process::Command::new(&python)
        .arg(&script)
        .arg(&spec_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("results file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test installs Playwright there)", python.display()));
    let mut child = ChildGuard(child);
    let status = child.exit_within(Duration::from_secs(180)).await;
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("the browser run did not end within 3 minutes: {stderr}"));
    assert!(status.success(), "signin.py failed: {stderr}");
    let out = std::fs::read(&out_path).expect("results");
    serde_json::from_slice(&out).unwrap_or_else(|e| panic!("signin.py printed no results ({e}): {stderr}"))
}

/// The screenshot in `shot` shows text (dark pixels on a light page) and the page says `text`.
fn shows(shot: &Value, text: &str, what: &str) {
    assert!(shot["dark_pixels"].as_u64().unwrap_or(0) > 50, "{what}: a blank screenshot: {shot}");
    assert!(shot["grey_range"].as_u64().unwrap_or(0) > 100, "{what}: no contrast: {shot}");
    assert!(shot["text"].as_str().unwrap_or("").contains(text), "{what}: not {text:?}: {shot}");
}

#[tokio::test]
async fn a_real_browser_signs_in_through_the_relay_in_every_mode() {
    let pki = Pki::new();
    let cases = Arc::new(cases());
    let origins = Arc::new(OnceLock::new());
    let serve = |names: &[&str]| pki.server_config(&pki.leaf(names[0], names), &[b"h2", b"http/1.1"]);
    let broker = Upstream::start(Some(serve(&["127.0.0.1"])), broker(cases.clone(), origins.clone())).await;
    let idp = Upstream::start(Some(serve(&[IDP])), identity_provider(cases.clone())).await;
    let app = Upstream::start(Some(serve(&[APP])), application()).await;

    let https = free_addr();
    let upstream = format!(
        "upstream = \"https://127.0.0.1:{}\"\nupstream_ca_file = \"{}\"\n",
        broker.addr.port(),
        pki.ca_path.display()
    );
    let proxied = format!("{upstream}[site.callback]\nmode = \"proxy\"\n[site.authorize]\nmode = \"proxy\"\n");
    let toml = format!(
        "[server]\nhttps = [\"{https}\"]\n{}{}",
        common::files_site("redirect", &[REDIRECTING], &pki.leaf(REDIRECTING, &[REDIRECTING]), &upstream),
        common::files_site("proxy", &[PROXYING], &pki.leaf(PROXYING, &[PROXYING]), &proxied),
    );
    let mut relay = RelayUnderTest::start(&toml).await;
    let (idp_origin, app_origin) =
        (format!("https://{IDP}:{}", idp.addr.port()), format!("https://{APP}:{}", app.addr.port()));
    let _ = origins.set(Origins { relay_port: https.port(), idp: idp_origin.clone(), app: app_origin.clone() });

    let relay_origin = |site: &str| format!("https://{site}:{}", https.port());
    let broker_origin = format!("https://127.0.0.1:{}", broker.addr.port());
    let done = format!("{app_origin}/done?case=");
    let mut pages: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(n, case)| {
            let return_url =
                url::form_urlencoded::byte_serialize(format!("{app_origin}/return").as_bytes()).collect::<String>();
            let url =
                format!("{}/v1/auth/authorize?clientId=app&case={n}&returnUrl={return_url}", relay_origin(case.site));
            json!({ "url": url, "until": format!("{done}{n}") })
        })
        .collect();
    // The fragment page on screen while its navigation is held: to the broker's callback when
    // redirecting, to the relay's own when proxying.
    let fragment = |site| cases.iter().position(|c| c.site == site && c.mode == ResponseMode::Fragment).unwrap();
    pages[fragment(REDIRECTING)]["hold"] = json!(format!("{broker_origin}/v1/auth/callback?"));
    pages[fragment(PROXYING)]["hold"] = json!(format!("{}/v1/auth/callback?", relay_origin(PROXYING)));
    for site in [REDIRECTING, PROXYING] {
        pages[fragment(site)]["hold_text"] = json!("Signing in\u{2026}");
    }
    let extra = pages.len();
    let no_answer = format!("{}/v1/auth/callback", relay_origin(REDIRECTING));
    let bad_path = format!("{}/v1/auth/token/a%2fb", relay_origin(PROXYING));
    let probe = format!("{app_origin}/csp-probe");
    for url in [&no_answer, &bad_path, &probe] {
        pages.push(json!({ "url": url, "until": url, "shot": true }));
    }

    let results = run_browser(&pki, pages).await;
    assert_eq!(results.len(), extra + 3);

    let callbacks: Vec<Recorded> =
        broker.requests.lock().unwrap().iter().filter(|r| r.target.starts_with("/v1/auth/callback")).cloned().collect();
    let reached: Vec<String> = app.requests.lock().unwrap().iter().map(|r| r.target.clone()).collect();
    for (n, case) in cases.iter().enumerate() {
        let result = &results[n];
        let what = format!("case {n} ({case:?})");
        assert!(result.get("error").is_none(), "{what}: {result}");
        assert!(reached.contains(&format!("/done?case={n}")), "{what}: the application was not reached: {reached:?}");
        let got: Vec<&Recorded> = callbacks.iter().filter(|r| case_of(r, &cases) == Some(n)).collect();
        assert_eq!(got.len(), 1, "{what}: the broker's callback got {got:?}");
        let got = got[0];
        match case.mode {
            ResponseMode::Query | ResponseMode::Fragment => {
                assert_eq!(got.method, "GET", "{what}");
                assert_eq!(got.target, format!("/v1/auth/callback?{}", browser_encoded(&case.answer)), "{what}");
            }
            ResponseMode::FormPost => {
                assert_eq!(got.method, "POST", "{what}");
                // The body the browser posted to the relay, byte for byte, and the fields the
                // identity provider put in its form.
                let posted = result["requests"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["method"] == "POST" && r["url"].as_str().unwrap().starts_with(&relay_origin(case.site)))
                    .unwrap_or_else(|| panic!("{what}: no POST to the relay: {result}"));
                assert_eq!(Some(&got.body[..]), posted["body"].as_str().map(str::as_bytes), "{what}");
                let sent: Vec<_> = pairs(case.answer.as_bytes()).into_iter().filter(|(k, _)| !k.is_empty()).collect();
                assert_eq!(pairs(&got.body), sent, "{what}");
                assert_eq!(got.headers["content-type"], "application/x-www-form-urlencoded", "{what}");
                // After the relay's cross-origin 307 Chromium says `Origin: null`; through the
                // proxying site the broker gets the browser's own `Origin` (the identity
                // provider's), as the relay forwards it.
                let origin = if case.site == REDIRECTING { "null".to_string() } else { idp_origin.clone() };
                assert_eq!(got.headers["origin"], origin.as_str(), "{what}");
            }
        }
        assert_eq!(result["issues"], json!([]), "{what}: Chromium reported issues");
    }
    for site in [REDIRECTING, PROXYING] {
        let held = &results[fragment(site)]["held"];
        shows(held, "Signing in\u{2026}", &format!("the fragment page of {site}"));
    }
    shows(
        &results[extra]["shot"],
        "carries no answer from the sign-in service",
        "the fragment page without a fragment",
    );
    shows(&results[extra + 1]["shot"], "encoded / or \\ in the path", "the relay's 400");
    let probe = &results[extra + 2];
    assert!(
        probe["issues"].as_array().unwrap().iter().any(|i| i == "ContentSecurityPolicyIssue"),
        "a CSP violation is seen when there is one: {probe}"
    );
    relay.stop().await;
}
