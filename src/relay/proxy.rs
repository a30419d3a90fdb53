//! Forwarding to the upstream: the token exchange and the authorize/callback routes in `proxy`
//! mode. The request body is read whole under a size limit (so nothing is sent upstream before
//! it is complete), sent once and never retried, and the upstream's answer is streamed back with
//! hop-by-hop headers removed and, for browser routes, `Location` and cookie domains rewritten.

use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};

use super::{ConnInfo, UpstreamBase, UpstreamClient, UpstreamOutcome};
use crate::config::{Limits, Site};
use crate::metrics::UpstreamErrorKind;
use crate::response::{RelayBody, plain};

/// Everything one forwarded request needs.
pub struct Forward<'a> {
    pub client: &'a UpstreamClient,
    pub site: &'a Site,
    pub base: &'a UpstreamBase,
    /// The request's host (no port), for `X-Forwarded-Host` and rewriting.
    pub host: &'a str,
    pub conn: &'a ConnInfo,
    pub limits: &'a Limits,
    /// On a browser route, the site's routes in `proxy` mode: `Location`s naming one of them
    /// and `Set-Cookie` domains are rewritten to the relay (`rewrite`). `None`: nothing is.
    pub rewrite: Option<&'a [super::rewrite::ProxiedRoute]>,
    pub public_https_port: u16,
}

impl Forward<'_> {
    /// Sends the request upstream once and answers with the upstream's response.
    pub async fn send<B>(&self, req: Request<B>, outcome: &mut UpstreamOutcome) -> Response<RelayBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let max = self.limits.max_body_bytes;
        if declared_len(&parts.headers).is_some_and(|len| len > max) {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
        }
        let read = Limited::new(body, max as usize).collect();
        let body = match tokio::time::timeout(self.limits.header_read_timeout, read).await {
            Err(_) => {
                return plain(StatusCode::REQUEST_TIMEOUT, "request body not received in time\n");
            }
            Ok(Err(e)) if e.is::<LengthLimitError>() => {
                return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
            }
            Ok(Err(_)) => {
                return plain(StatusCode::BAD_REQUEST, "request body could not be read\n");
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };

        let mut up = Request::new(Full::new(body));
        *up.method_mut() = parts.method;
        *up.uri_mut() = match self.base.uri(parts.uri.into_parts().path_and_query) {
            Ok(u) => u,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "bad request target\n"),
        };
        let requested = self.rewrite.map(|_| up.uri().clone());
        let headers = up.headers_mut();
        *headers = parts.headers;
        strip_hop_by_hop(headers);
        headers.remove(header::HOST);
        super::rewrite::join_cookie_crumbs(headers);
        self.conn.write_forwarding_headers(headers, self.host);

        let started = Instant::now();
        let result = tokio::time::timeout(self.client.response_timeout, self.client.send(up)).await;
        outcome.latency_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        let resp = match result {
            Err(_) => return self.timed_out("response"),
            Ok(Err(e)) if e.is_invalid() => return self.refused(&e),
            Ok(Err(e)) => return self.failed(UpstreamErrorKind::of(&e, e.is_connect()), &e, "request"),
            Ok(Ok(resp)) => resp,
        };
        outcome.status = Some(resp.status());
        if resp.status().is_server_error() {
            crate::metrics::global().upstream_error(UpstreamErrorKind::Status5xx);
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let (Some(proxied), Some(requested)) = (self.rewrite, &requested) {
            self.rewrite_headers(proxied, requested, &mut parts.headers);
        }
        let body = if declared_len(&parts.headers).is_some_and(|n| n <= BUFFERED_BODY_MAX) {
            // A small body of known length (a token response) is read whole before answering,
            // like nginx's proxy buffering: the client gets head and body in one TLS record and
            // one write, and an upstream that breaks off mid-body still gets a clean 502.
            match tokio::time::timeout(self.client.response_timeout, body.collect()).await {
                Ok(Ok(collected)) => RelayBody::full(collected.to_bytes()),
                Ok(Err(e)) => return self.failed(UpstreamErrorKind::of(&e, false), &e, "response body"),
                Err(_) => return self.timed_out("response body"),
            }
        } else {
            RelayBody::upstream(body, self.client.response_timeout)
        };
        Response::from_parts(parts, body)
    }

    /// `504` when the upstream stays silent past the response timeout (`what`: which part).
    fn timed_out(&self, what: &str) -> Response<RelayBody> {
        crate::metrics::global().upstream_error(UpstreamErrorKind::Timeout);
        tracing::warn!(site = %self.site.name, "upstream {what} did not arrive within {:?}", self.client.response_timeout);
        plain(StatusCode::GATEWAY_TIMEOUT, "upstream did not answer in time\n")
    }

    /// `502` for a failed exchange; the body says nothing about the upstream, the log says why.
    fn failed(&self, kind: UpstreamErrorKind, e: &dyn std::error::Error, what: &str) -> Response<RelayBody> {
        crate::metrics::global().upstream_error(kind);
        tracing::warn!(site = %self.site.name, kind = kind.as_str(), error = %crate::egress::error_chain(e), "upstream {what} failed");
        plain(StatusCode::BAD_GATEWAY, "upstream unreachable\n")
    }

    /// `502` for an answer that breaks HTTP (see `upstream::Invalid`): it is never forwarded.
    fn refused(&self, e: &super::upstream::SendError) -> Response<RelayBody> {
        crate::metrics::global().upstream_error(UpstreamErrorKind::Request);
        tracing::warn!(site = %self.site.name, error = %crate::egress::error_chain(e), "upstream answer refused");
        plain(StatusCode::BAD_GATEWAY, "invalid upstream response\n")
    }
}

/// Upstream bodies up to this size with a declared length are buffered (see `send`).
const BUFFERED_BODY_MAX: u64 = 64 * 1024;

/// The `Content-Length` a message declares, when it declares a valid one.
fn declared_len(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Removes the headers that belong to one hop (RFC 9110 section 7.6.1), including any the
/// `Connection` header names. Allocation-free unless `Connection` names a field that is there:
/// an upstream's `Connection: keep-alive` on every response costs one pass over the names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let mut named = Vec::new();
    for token in connection_tokens(headers) {
        if !HOP_BY_HOP.iter().any(|h| h.as_str().eq_ignore_ascii_case(token)) && headers.contains_key(token) {
            named.extend(HeaderName::from_bytes(token.as_bytes()).ok());
        }
    }
    for n in named {
        headers.remove(n);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(n);
        }
    }
}

/// The options of every `Connection` header field, trimmed (a field that is not text has none).
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::CONNECTION).iter().flat_map(|v| v.to_str().unwrap_or_default().split(',').map(str::trim))
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1, plus `Proxy-*` and the legacy `Keep-Alive` and
/// `Proxy-Connection`), the first being `Connection`.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive, X-Trace-Hop , close"),
            ("keep-alive", "timeout=5"),
            ("x-trace-hop", "1"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("authorization", "Basic YTpi"),
            ("content-type", "application/json"),
            ("x-trace-end", "2"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["authorization", "content-type", "x-trace-end"]);

        // The common case, nothing to remove: the map is left as it was.
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }
}
