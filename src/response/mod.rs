//! What every answer is made of: the one response body type, the route names that label
//! answers in logs and metrics, and the small fixed answers (a status with a short text body
//! that reveals no internal detail). A leaf: the routes, health, metrics and the admin
//! endpoints all build their answers from it.

mod body;

use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Response, StatusCode, header};

pub use body::{BodyEnd, BodyError, BodyStalled, EndHook, OnEnd, RelayBody};

/// Which route answered; the access log's `route` field and the metrics' `route` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteName {
    Callback,
    Authorize,
    Token,
    Healthz,
    Readyz,
    HttpsRedirect,
    AcmeChallenge,
    /// `/.well-known/microsoft-identity-association.json` (publisher domain verification).
    DomainVerification,
    None,
}

impl RouteName {
    /// The label used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteName::Callback => "callback",
            RouteName::Authorize => "authorize",
            RouteName::Token => "token",
            RouteName::Healthz => "healthz",
            RouteName::Readyz => "readyz",
            RouteName::HttpsRedirect => "https_redirect",
            RouteName::AcmeChallenge => "acme_challenge",
            RouteName::DomainVerification => "domain_verification",
            RouteName::None => "-",
        }
    }
}

/// A request's response: ready when routing gave it at once, else the trip that brings it.
/// Owns everything it needs, so hyper can hold it past the request.
pub enum Reply {
    Ready(std::future::Ready<Response<RelayBody>>),
    Later(Pin<Box<dyn Future<Output = Response<RelayBody>> + Send>>),
}

impl Reply {
    pub fn ready(resp: Response<RelayBody>) -> Reply {
        Reply::Ready(std::future::ready(resp))
    }
}

impl Future for Reply {
    type Output = Response<RelayBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Reply::Ready(resp) => Pin::new(resp).poll(cx),
            Reply::Later(trip) => trip.as_mut().poll(cx),
        }
    }
}

/// A status with a short plain-text body.
pub fn plain(status: StatusCode, text: &'static str) -> Response<RelayBody> {
    let mut r = Response::new(RelayBody::full(text));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `405 Method Not Allowed` naming the methods the route takes.
pub fn method_not_allowed(allow: &'static str) -> Response<RelayBody> {
    method_not_allowed_value(HeaderValue::from_static(allow))
}

/// `405` with a computed `Allow` value.
pub fn method_not_allowed_value(allow: HeaderValue) -> Response<RelayBody> {
    let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    r.headers_mut().insert(header::ALLOW, allow);
    r
}

/// A redirect with no body.
pub fn redirect(status: StatusCode, location: HeaderValue) -> Response<RelayBody> {
    let mut r = Response::new(RelayBody::Empty);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::LOCATION, location);
    // The target carries an authorization code: nobody may cache it.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A `text/plain` answer that no cache keeps (health, readiness, metrics, reload), with `text`
/// as its body.
pub fn uncached_text(status: StatusCode, content_type: &'static str, text: String) -> Response<RelayBody> {
    let mut r = Response::new(RelayBody::full(text));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
