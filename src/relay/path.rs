//! The path a route is chosen by, and the paths the relay refuses to pass on.
//!
//! The relay and the server behind it must agree on which resource a path names. Where that
//! depends on how a server resolves dot-segments or decodes `%2f`, the relay refuses the request
//! instead of guessing: `POST /v1/auth/token/..%2f..%2fadmin` once matched the token route here
//! and reached an upstream that decodes `%2f` as `POST /v1/admin`.
//!
//! The rules, on the path only (the query is never read here, and goes on as received):
//!
//! 1. **Refused** with `400` and a one-line plain-text body once the request's site is known,
//!    before routing (so before anything goes upstream), on both listeners:
//!    - a dot-segment: a segment that is `.` or `..`, any of its dots also written `%2e` or
//!      `%2E`, also with path parameters after it (`..;x`, which Tomcat and Jetty resolve as
//!      `..`);
//!    - an encoded slash or backslash: `%2f` or `%5c`, in any case, anywhere in the path;
//!    - a raw backslash `\`, which some servers read as `/`.
//! 2. **Routes match the normalised path**: percent-encoded unreserved characters (letters,
//!    digits, `-._~`) decoded and every other percent-encoding's hex digits in upper case, the
//!    two normalisations RFC 3986 section 6.2.2 says keep a URI's meaning (a path with a stray
//!    `%` is compared as received: decoding beside it could make a new escape). Nothing else is
//!    folded: paths are case-sensitive, `//` is not merged and a trailing `/` counts, so
//!    `//v1/auth/token/x` and `/v1/auth/callback/` are not routes (404). Merging them here while
//!    the upstream gets the bytes as received would let the two disagree again.
//! 3. **What goes upstream is the path and query as received**, byte for byte.

use std::borrow::Cow;

/// Why a path is refused; [`BadPath::body`] is the `400` answer's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    DotSegment,
    EncodedSlash,
    Backslash,
}

impl BadPath {
    pub fn body(self) -> &'static str {
        match self {
            BadPath::DotSegment => "dot-segment in the path\n",
            BadPath::EncodedSlash => "encoded / or \\ in the path\n",
            BadPath::Backslash => "backslash in the path\n",
        }
    }
}

/// The normalised form of a request path, or why it is refused (the module's rules 1 and 2).
/// Borrows when the path is already normal, as nearly every real one is.
pub fn normalise(path: &str) -> Result<Cow<'_, str>, BadPath> {
    if path.contains('\\') {
        return Err(BadPath::Backslash);
    }
    if path.split('/').any(is_dot_segment) {
        return Err(BadPath::DotSegment);
    }
    if !path.contains('%') {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut normal = String::new();
    // `path[copied..]` is not yet in `normal`; every index here is at an ASCII `%`.
    let mut copied = 0;
    // A `%` that starts no valid escape: the path is then compared as received, since decoding
    // next to it could make a new escape (`%2%65` would become `%2e`).
    let mut stray = false;
    let mut i = 0;
    while i < bytes.len() {
        let Some(octet) = encoded_octet(bytes, i) else {
            stray |= bytes[i] == b'%';
            i += 1;
            continue;
        };
        if octet == b'/' || octet == b'\\' {
            return Err(BadPath::EncodedSlash);
        }
        let upper = [b'%', HEX[usize::from(octet >> 4)], HEX[usize::from(octet & 0xf)]];
        if is_unreserved(octet) || bytes[i..i + 3] != upper {
            normal.push_str(&path[copied..i]);
            if is_unreserved(octet) {
                normal.push(char::from(octet));
            } else {
                upper.iter().for_each(|&b| normal.push(char::from(b)));
            }
            copied = i + 3;
        }
        i += 3;
    }
    if copied == 0 || stray {
        return Ok(Cow::Borrowed(path));
    }
    normal.push_str(&path[copied..]);
    Ok(Cow::Owned(normal))
}

/// A configured route path in the form request paths are compared in. A path that could never
/// be requested (it has a dot-segment) is kept as it is: no request matches it.
pub fn normalised_route(configured: &str) -> String {
    normalise(configured).map(Cow::into_owned).unwrap_or_else(|_| configured.to_string())
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The octet a `%XX` triplet at `i` encodes, if there is a valid one there.
fn encoded_octet(bytes: &[u8], i: usize) -> Option<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    match bytes.get(i..i + 3)? {
        [b'%', hi, lo] => Some(u8::try_from(hex(*hi)? * 16 + hex(*lo)?).ok()?),
        _ => None,
    }
}

/// RFC 3986 section 2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// `.` or `..`, each dot maybe `%2e`, before any `;` path parameters.
fn is_dot_segment(segment: &str) -> bool {
    let name = segment.split(';').next().unwrap_or_default().as_bytes();
    let mut rest = name;
    let mut dots = 0;
    while !rest.is_empty() && dots <= 2 {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
            _ => return false,
        };
        dots += 1;
    }
    rest.is_empty() && (1..=2).contains(&dots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dot_segments_encoded_slashes_and_backslashes_are_refused() {
        for path in [
            "/v1/auth/token/..",
            "/v1/auth/token/.",
            "/v1/auth/token/%2e%2e",
            "/v1/auth/token/%2E.",
            "/v1/auth/token/.%2E",
            "/v1/auth/token/..;jsessionid=x",
            "/v1/auth/./callback",
            "/v1/auth/token/../../admin",
            "/..",
            "/%2e%2e/v1/auth/callback",
        ] {
            assert_eq!(normalise(path), Err(BadPath::DotSegment), "{path}");
        }
        for path in ["/v1/auth/token/..%2f..%2fadmin", "/v1/auth/token/a%2Fb", "/v1/auth/token/a%5cb", "/x%5C", "/a%2F"]
        {
            assert_eq!(normalise(path), Err(BadPath::EncodedSlash), "{path}");
        }
        assert_eq!(normalise("/v1\\auth"), Err(BadPath::Backslash));
    }

    #[test]
    fn what_is_not_a_dot_segment_passes() {
        for path in ["/", "/v1/auth/token/...", "/v1/auth/token/.x", "/v1/auth/token/a..b", "//v1/auth/token/x", "/a/"]
        {
            assert_eq!(normalise(path), Ok(Cow::Borrowed(path)), "{path}");
        }
        assert_eq!(normalise("/v1/auth/token/%2e%2e%2e").as_deref(), Ok("/v1/auth/token/..."));
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_upper_cased() {
        assert_eq!(normalise("/v1/auth/c%61llback").as_deref(), Ok("/v1/auth/callback"));
        assert_eq!(normalise("/v1/auth/token/c%2bd%7E").as_deref(), Ok("/v1/auth/token/c%2Bd~"));
        // A stray `%`: decoding `%65` would turn `%2%65` into `%2e`, so nothing is decoded.
        assert!(matches!(normalise("/v1/auth/%74oken/%2%65"), Ok(Cow::Borrowed(_))));
        assert_eq!(normalise("/v1/auth/token/%2%2f"), Err(BadPath::EncodedSlash));
        // Already normal: nothing is copied.
        assert!(matches!(normalise("/v1/auth/token/c%2Bd%C3%A9"), Ok(Cow::Borrowed(_))));
    }

    /// Every valid `%XX` decoded, as a server behind the relay would read the path.
    fn decoded(path: &str) -> Vec<u8> {
        let bytes = path.as_bytes();
        let (mut out, mut i) = (Vec::new(), 0);
        while i < bytes.len() {
            match encoded_octet(bytes, i) {
                Some(octet) => {
                    out.push(octet);
                    i += 3;
                }
                None => {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
        }
        out
    }

    /// Path-like text with the pieces the rules are about, often enough to matter.
    fn path_like() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just(";".to_string()),
            Just("\\".to_string()),
            "%[0-9a-fA-F]{2}",
            "%2[eEfF]",
            "%5[cC]",
            "%[0-9a-zA-Z]?",
            "[a-zA-Z0-9._~!$&'()*+,=:@-]{1,6}",
            any::<char>().prop_map(String::from),
        ];
        proptest::collection::vec(piece, 0..16).prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    proptest! {
        #[test]
        fn normalise_never_panics(path in any::<String>()) {
            let _ = normalise(&path);
        }

        #[test]
        fn accepted_paths_have_no_dot_segment_or_slash_once_decoded(path in path_like()) {
            if let Ok(normal) = normalise(&path) {
                let meaning = decoded(&path);
                prop_assert!(!meaning.contains(&b'\\'));
                prop_assert_eq!(meaning.split(|&b| b == b'/').count(), path.split('/').count());
                for segment in meaning.split(|&b| b == b'/') {
                    prop_assert!(segment != b"." && segment != b"..", "{:?}", path);
                }
                // Normalising keeps the meaning, and a second time changes nothing.
                prop_assert_eq!(decoded(&normal), meaning);
                prop_assert_eq!(normalise(&normal), Ok(Cow::Borrowed(&*normal)));
            }
        }

        #[test]
        fn a_plain_path_is_its_own_normal_form(
            segments in proptest::collection::vec("[a-zA-Z0-9_~!$&'()*+,=:@-][a-zA-Z0-9._~!$&'()*+,=:@-]{0,8}", 0..8),
            slash in any::<bool>(),
        ) {
            let path = format!("/{}{}", segments.join("/"), if slash { "/" } else { "" });
            prop_assert_eq!(normalise(&path), Ok(Cow::Borrowed(path.as_str())));
        }
    }
}
