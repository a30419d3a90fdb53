//! Headers the relay rewrites on their way through a forwarded route: the request's cookie
//! crumbs become one `Cookie` line.

use http::header::{self, HeaderMap, HeaderValue};

/// Joins every `Cookie` field into one, `; ` between them (RFC 9113 section 8.2.3). An HTTP/2
/// client sends each cookie as a field of its own; an HTTP/1.1 upstream expects one line and
/// many read only the first, losing the session. Nothing is allocated for one field or none.
pub fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for crumb in headers.get_all(header::COOKIE).iter().filter(|c| !c.is_empty()) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    // Valid field values joined by `; ` are a valid field value.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookies(h: &HeaderMap) -> Vec<&str> {
        h.get_all(header::COOKIE).iter().map(|v| v.to_str().unwrap()).collect()
    }

    #[test]
    fn cookie_crumbs_become_one_line_in_their_order() {
        let mut h = HeaderMap::new();
        for c in ["sid=a%3Db", "", "lb=7", "theme=dark; lang=en"] {
            h.append(header::COOKIE, HeaderValue::from_static(c));
        }
        h.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        join_cookie_crumbs(&mut h);
        assert_eq!(cookies(&h), ["sid=a%3Db; lb=7; theme=dark; lang=en"]);
        assert_eq!(h.len(), 2);

        let mut one = HeaderMap::new();
        one.append(header::COOKIE, HeaderValue::from_static("sid=1"));
        join_cookie_crumbs(&mut one);
        assert_eq!(cookies(&one), ["sid=1"]);
    }
}
