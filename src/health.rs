//! Liveness and readiness, answered on every listener (public and admin) before any Host check,
//! so load balancers can probe by IP. `/healthz` says the process serves; `/readyz` says every
//! hostname has a currently valid certificate, and names the ones that do not.

use std::time::SystemTime;

use http::{Method, Response, StatusCode};

use crate::relay::{RelayBody, RouteName};
use crate::tls::CertStore;

/// The health answer for `path`, or `None` when `path` is not a health path.
pub fn answer(path: &str, method: &Method, store: &CertStore) -> Option<(RouteName, Response<RelayBody>)> {
    let route = match path {
        "/healthz" => RouteName::Healthz,
        "/readyz" => RouteName::Readyz,
        _ => return None,
    };
    if method != Method::GET && method != Method::HEAD {
        return Some((route, crate::relay::method_not_allowed("GET, HEAD")));
    }
    let (status, body) = match route {
        RouteName::Healthz => (StatusCode::OK, "ok".to_string()),
        _ => readiness(store),
    };
    let mut r = Response::new(RelayBody::full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    Some((route, r))
}

/// `200 ready` or `503` with one line per reason.
fn readiness(store: &CertStore) -> (StatusCode, String) {
    let reasons = store.not_ready(SystemTime::now());
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        let mut body = String::from("not ready\n");
        for r in reasons {
            body.push_str(&r);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}
