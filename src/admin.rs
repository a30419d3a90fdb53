//! The admin listener (`[server] admin`): what an operator's tools ask the relay, and nothing
//! relayed. `GET /healthz` and `/readyz` (also answered on the public listeners, see
//! [`crate::health`]), `GET /metrics` in the Prometheus text format, and `POST /reload`.

use http::{Method, Request, StatusCode};
use prometheus_client::encoding::prometheus_text;

use crate::app::{Live, ReloadError};
use crate::reload::ReloadHandle;
use crate::response::{Reply, method_not_allowed, plain, uncached_text};

/// Answers one request on the admin listener.
pub fn handle<B>(req: Request<B>, live: &Live, reload: &ReloadHandle) -> Reply {
    let (path, method) = (req.uri().path(), req.method());
    if path == "/reload" {
        if method != Method::POST {
            return Reply::ready(method_not_allowed("POST"));
        }
        if let Some(refused) = other_file(req.uri().query(), &live.config().file) {
            return Reply::ready(refused);
        }
        let reload = reload.clone();
        return Reply::Later(Box::pin(async move { reloaded(reload.reload().await) }));
    }
    if path == "/metrics" {
        return Reply::ready(metrics(method, live));
    }
    match crate::health::answer(path, method, &live.health) {
        Some((_, r)) => Reply::ready(r),
        None => Reply::ready(plain(StatusCode::NOT_FOUND, "not found\n")),
    }
}

/// `409` when `POST /reload?file=PATH` (what `oauth-relay reload --config PATH` sends) names
/// another file than the one this relay runs: a reload re-reads the relay's own file, so
/// "reloaded" would be a lie about PATH. Files are compared by their canonical paths (a symlink
/// or a relative path naming the same file is the same file). Without `file`, any reload goes.
fn other_file(query: Option<&str>, own: &str) -> Option<http::Response<crate::response::RelayBody>> {
    let given = url::form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == "file")?.1;
    let canonical = |p: &str| std::fs::canonicalize(p).ok();
    if canonical(own).is_some_and(|own| canonical(&given).is_some_and(|given| given == own)) {
        return None;
    }
    let body = format!(
        "not reloaded: this relay runs {own}, not {given}; a reload re-reads the relay's own file. Edit {own} and \
         reload again, or restart the relay with --config {given}\n"
    );
    Some(uncached_text(StatusCode::CONFLICT, "text/plain; charset=utf-8", body))
}

/// `GET /metrics`: every series, with the expiry of each certificate served now and the
/// readiness, connection cap and upstream probe results in force.
fn metrics(method: &Method, live: &Live) -> http::Response<crate::response::RelayBody> {
    if method != Method::GET && method != Method::HEAD {
        return method_not_allowed("GET, HEAD");
    }
    let certs: Vec<_> =
        live.store.slots().iter().filter_map(|s| Some((s.hostname.as_str(), s.current()?.not_after))).collect();
    let mut text = crate::metrics::global().render(certs);
    text.push_str(&live.health.readings(live.limits().max_connections).render());
    uncached_text(StatusCode::OK, prometheus_text::CONTENT_TYPE, text)
}

/// `200 reloaded` (plus a `warning:` line each), `400` with one problem per line, or `503` when
/// the relay is shutting down.
fn reloaded(outcome: Result<crate::app::Reloaded, ReloadError>) -> http::Response<crate::response::RelayBody> {
    let (status, body) = match outcome {
        Ok(r) => {
            let mut body = String::from("reloaded\n");
            for w in &r.warnings {
                body.push_str(&format!("warning: {w}\n"));
            }
            (StatusCode::OK, body)
        }
        Err(e) => {
            let status = if matches!(e, ReloadError::Stopped) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_REQUEST
            };
            (status, e.lines().iter().map(|l| format!("{l}\n")).collect())
        }
    };
    uncached_text(status, "text/plain; charset=utf-8", body)
}
