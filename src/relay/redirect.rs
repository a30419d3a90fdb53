//! Redirect routes: the callback relayed to the upstream (query, form_post and fragment modes),
//! the authorize endpoints in redirect mode, and the plain-HTTP upgrade to HTTPS. The query is
//! copied byte for byte: never decoded, never re-encoded.

use base64::Engine;
use http::{HeaderValue, Request, Response, StatusCode, header};

use super::SiteRoutes;
use crate::response::{RelayBody, plain, redirect};

/// `{target}?{raw query}` (or just `{target}` without a query) as a redirect.
pub fn to_upstream(target: &str, query: Option<&str>, status: StatusCode) -> Response<RelayBody> {
    let location = match query {
        Some(q) => {
            let mut s = String::with_capacity(target.len() + 1 + q.len());
            s.push_str(target);
            s.push('?');
            s.push_str(q);
            s
        }
        None => target.to_string(),
    };
    match HeaderValue::try_from(location) {
        Ok(v) => redirect(status, v),
        Err(_) => plain(StatusCode::BAD_REQUEST, "query string not allowed in a redirect\n"),
    }
}

/// `GET` on the callback: relay the query, or serve the fragment page when there is none.
pub fn callback_get<B>(req: &Request<B>, routes: &SiteRoutes) -> Response<RelayBody> {
    let cb = &routes.site.callback;
    match req.uri().query() {
        Some(q) if !q.is_empty() => to_upstream(&routes.callback_target, Some(q), cb.status),
        _ if cb.fragment_page => fragment_page(&routes.callback_target),
        _ => to_upstream(&routes.callback_target, None, cb.status),
    }
}

/// Whether a callback `GET` in `proxy` mode gets the fragment page (it has no query) rather
/// than going upstream: the broker needs the code in the query, and only the browser can read
/// the fragment, so the page moves it into the query of the relay's own callback, which then
/// goes upstream like any other.
pub fn wants_fragment_page<B>(req: &Request<B>, routes: &SiteRoutes) -> bool {
    routes.site.callback.fragment_page && req.uri().query().is_none_or(str::is_empty)
}

/// The fragment page of a callback in `proxy` mode: it goes on to the relay's own callback path
/// (same origin), which forwards the query it then carries.
pub fn fragment_page_to_relay(routes: &SiteRoutes) -> Response<RelayBody> {
    fragment_page(&routes.site.callback.path)
}

/// Whether a POSTed callback is a form (Entra's `response_mode=form_post`).
pub fn is_form<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
}

/// `415` for a POSTed callback that is not a form.
pub fn not_a_form() -> Response<RelayBody> {
    plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, "expected application/x-www-form-urlencoded\n")
}

/// `POST` on the callback: 307 so the browser re-posts the identical body to the upstream.
pub fn callback_form_post<B>(req: &Request<B>, routes: &SiteRoutes) -> Response<RelayBody> {
    if is_form(req) {
        to_upstream(&routes.callback_target, req.uri().query(), StatusCode::TEMPORARY_REDIRECT)
    } else {
        not_a_form()
    }
}

/// A page that moves `location.hash` into the query and navigates to the (fixed) callback
/// `target`: the upstream's, or in `proxy` mode the relay's own path. The target is a constant
/// of the configuration; the fragment can only ever become the query of that URL. Meanwhile
/// the page says "Signing in…" (a slow broker otherwise leaves a blank page), in plain text:
/// no style, image or font, so the CSP stays `default-src 'none'`. Without a fragment there is
/// nothing to pass on, and going on would bring a `proxy` callback straight back here; the page
/// says so and stays.
fn fragment_page(target: &str) -> Response<RelayBody> {
    let mut nonce = [0u8; 18];
    if crate::crypto::provider().secure_random.fill(&mut nonce).is_err() {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "no randomness available\n");
    }
    let nonce = base64::engine::general_purpose::STANDARD.encode(nonce);
    // JSON string syntax is valid JavaScript; `<` is escaped so no `</script>` can appear.
    let target_js = serde_json_string(target);
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"referrer\" content=\"no-referrer\">\
<title>Signing in</title></head><body><p id=\"m\">Signing in\u{2026}</p>\
<noscript>JavaScript is needed to finish signing in.</noscript>\
<script nonce=\"{nonce}\">(function(){{var f=window.location.hash.slice(1);\
if(!f){{document.getElementById(\"m\").textContent=\"{NO_ANSWER}\";return;}}\
window.location.replace({target_js}+\"?\"+f);}})();</script></body></html>\n"
    );
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    let mut r = Response::new(RelayBody::full(html));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::try_from(csp).expect("nonce is base64"));
    r
}

/// What the fragment page says when it was reached with neither a query nor a fragment.
const NO_ANSWER: &str =
    "This address carries no answer from the sign-in service. Start signing in again from the application.";

/// `s` as a JavaScript string literal safe inside a `<script>` element.
fn serde_json_string(s: &str) -> String {
    serde_json::to_string(s)
        .expect("a str always serializes")
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// Plain HTTP: `308` to the same path and query on HTTPS for a configured host.
pub fn to_https<B>(req: &Request<B>, host: &str, port: u16) -> Response<RelayBody> {
    let pq = req.uri().path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    let location = if port == 443 { format!("https://{host}{pq}") } else { format!("https://{host}:{port}{pq}") };
    match HeaderValue::try_from(location) {
        Ok(v) => redirect(StatusCode::PERMANENT_REDIRECT, v),
        Err(_) => plain(StatusCode::BAD_REQUEST, "bad request target\n"),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every query `http::Uri` accepts: visible ASCII but `"`, `#`, `<` and `>`, and UTF-8.
    pub(in crate::relay) const QUERY: &str = "[!$-;=?-~\u{a0}-\u{d7ff}\u{1f300}-\u{1f5ff}]{0,64}";

    proptest! {
        #[test]
        fn the_query_goes_on_byte_for_byte(query in QUERY, status in prop_oneof![Just(302u16), Just(303), Just(307)]) {
            let uri: http::Uri = format!("/v1/auth/callback?{query}").parse().expect("a query the strategy allows");
            let status = StatusCode::from_u16(status).unwrap();
            let resp = to_upstream("https://broker.example/base/v1/auth/callback", uri.query(), status);
            prop_assert_eq!(resp.status(), status);
            let expected = format!("https://broker.example/base/v1/auth/callback?{query}");
            prop_assert_eq!(resp.headers()[header::LOCATION].as_bytes(), expected.as_bytes());
        }
    }
}
