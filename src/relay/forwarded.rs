//! Who the client is when an HTTP proxy the operator trusts stands in front of the relay (an L7
//! load balancer or WAF that re-encrypts to it, `[server] trusted_proxies`), and what the
//! upstream is told about it.
//!
//! Such a proxy names the client in `X-Forwarded-For`; anyone else's `X-Forwarded-For` is a
//! claim the client makes about itself and is replaced. The client is the rightmost address in
//! the header that is not itself a trusted proxy, as nginx's `real_ip_recursive` and Caddy's
//! `trusted_proxies_strict` read it: entries further left were written by the client or by
//! proxies nobody vouches for.
//!
//! One policy for every header that tells the upstream who the client is or how it came
//! ([`ConnInfo::write_forwarding_headers`]): a header is the relay's own, or a trusted proxy's,
//! never a client's.
//! - `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `X-Real-IP` are always
//!   written by the relay; `X-Real-IP` is the client it determined, the access line's `client`.
//! - `Forwarded` (RFC 7239) and every other `X-Forwarded-*` (`-Port`, `-Prefix`, `-Server`, ...)
//!   go on only from a trusted proxy, as it sent them; from anyone else they are removed.
//!   Traefik treats `X-Forwarded-*` and `X-Real-IP` so (and sets `X-Real-IP` itself), Caddy
//!   `X-Forwarded-For/Proto/Host`; nginx, HAProxy, Caddy and Traefik all pass `Forwarded` on
//!   from anyone, and an upstream that reads it cannot tell a client's from a proxy's.
//! - The relay does not write `Forwarded` itself: an upstream that prefers it (Spring's
//!   `ForwardedHeaderFilter`) would then stop reading the `X-Forwarded-*` it relies on today.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

use super::ConnInfo;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

impl ConnInfo {
    /// This connection's facts for one request from a peer in `trusted`: the client taken from
    /// the request's `X-Forwarded-For`, and that header with the peer appended for the upstream.
    /// `None` when the peer is not trusted (the connection's own facts stand).
    pub fn behind_proxy(&self, headers: &HeaderMap, trusted: &[IpNet]) -> Option<ConnInfo> {
        let is_trusted = |ip: IpAddr| crate::config::in_networks(trusted, ip);
        if trusted.is_empty() || !is_trusted(self.remote.ip()) {
            return None;
        }
        // Every field, in order, as one list; a field that is not text is not read, and empty
        // elements (`a,,b`, an empty field) are skipped as RFC 9110 section 5.6.1.2 asks.
        let chain: Vec<&str> = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        let mut client = self.remote.ip();
        for entry in chain.iter().rev() {
            // A hop that is not an address ends the walk at the last one that was.
            let Some(ip) = address(entry) else { break };
            client = ip.to_canonical();
            if !is_trusted(client) {
                break;
            }
        }
        let peer = self.remote.ip().to_canonical();
        let mut forwarded = chain.join(", ");
        if !forwarded.is_empty() {
            forwarded.push_str(", ");
        }
        forwarded.push_str(&peer.to_string());
        Some(ConnInfo {
            client_ip: HeaderValue::try_from(client.to_string()).ok()?,
            forwarded_for: HeaderValue::try_from(forwarded).ok(),
            trusted_proxy: true,
            ..self.clone()
        })
    }

    /// Writes the headers that tell the upstream who the client is and how it came, over what
    /// the request brought (see the module's policy); `host` is the request's host.
    pub(super) fn write_forwarding_headers(&self, headers: &mut HeaderMap, host: &str) {
        if !self.trusted_proxy {
            headers.remove(header::FORWARDED);
            // Bounded: every turn removes one name. Usually no turn at all.
            while let Some(name) = headers.keys().find(|n| n.as_str().starts_with("x-forwarded-")).cloned() {
                headers.remove(name);
            }
        }
        headers.insert(X_FORWARDED_FOR, self.forwarded_for.as_ref().unwrap_or(&self.client_ip).clone());
        headers.insert(X_REAL_IP, self.client_ip.clone());
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if self.https { "https" } else { "http" }));
        match HeaderValue::from_str(host) {
            Ok(h) => headers.insert(X_FORWARDED_HOST, h),
            Err(_) => headers.remove(X_FORWARDED_HOST),
        };
    }
}

/// An `X-Forwarded-For` entry's address: `192.0.2.7`, `2001:db8::1`, and with a port as some
/// balancers write it (Azure Application Gateway): `192.0.2.7:5123`, `[2001:db8::1]:5123`.
fn address(entry: &str) -> Option<IpAddr> {
    entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    /// (client, forwarded) for a request from `peer` with these `X-Forwarded-For` fields.
    fn seen(peer: &str, xff: &[&str], trusted: &[&str]) -> Option<(String, String)> {
        let conn = ConnInfo::new(peer.parse().unwrap(), true, None);
        let mut headers = HeaderMap::new();
        for v in xff {
            headers.append(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        let c = conn.behind_proxy(&headers, &nets(trusted))?;
        let client = c.client_ip.to_str().unwrap().to_string();
        Some((client, c.forwarded_for.unwrap().to_str().unwrap().to_string()))
    }

    fn pair(a: &str, b: &str) -> Option<(String, String)> {
        Some((a.to_string(), b.to_string()))
    }

    #[test]
    fn only_a_trusted_peer_names_the_client() {
        assert_eq!(
            seen("10.0.0.5:443", &["203.0.113.7"], &["10.0.0.0/8"]),
            pair("203.0.113.7", "203.0.113.7, 10.0.0.5")
        );
        assert_eq!(seen("198.51.100.9:443", &["203.0.113.7"], &["10.0.0.0/8"]), None);
        assert_eq!(seen("10.0.0.5:443", &["203.0.113.7"], &[]), None);
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        // The client wrote 1.2.3.4 itself; the trusted balancer appended what it saw.
        let xff = ["1.2.3.4, 203.0.113.7", "10.1.1.1"];
        assert_eq!(
            seen("10.0.0.5:443", &xff, &["10.0.0.0/8"]),
            pair("203.0.113.7", "1.2.3.4, 203.0.113.7, 10.1.1.1, 10.0.0.5")
        );
        // Only trusted hops: the leftmost is the client.
        assert_eq!(seen("10.0.0.5:443", &["10.9.9.9"], &["10.0.0.0/8"]), pair("10.9.9.9", "10.9.9.9, 10.0.0.5"));
        // No header: the peer itself.
        assert_eq!(seen("10.0.0.5:443", &[], &["10.0.0.0/8"]), pair("10.0.0.5", "10.0.0.5"));
    }

    #[test]
    fn ports_brackets_and_garbage() {
        let trusted = ["10.0.0.0/8"];
        assert_eq!(seen("10.0.0.5:443", &["203.0.113.7:5123"], &trusted).unwrap().0, "203.0.113.7");
        assert_eq!(seen("10.0.0.5:443", &["[2001:db8::1]:5123"], &trusted).unwrap().0, "2001:db8::1");
        assert_eq!(seen("10.0.0.5:443", &["2001:db8::1"], &trusted).unwrap().0, "2001:db8::1");
        // Empty elements are no hops: they neither stop the walk nor reach the upstream.
        assert_eq!(
            seen("10.0.0.5:443", &["203.0.113.7, , 10.2.2.2,", ""], &trusted),
            pair("203.0.113.7", "203.0.113.7, 10.2.2.2, 10.0.0.5")
        );
        // A hop that is not an address stops the walk at the last address seen.
        assert_eq!(seen("10.0.0.5:443", &["203.0.113.7, unknown"], &trusted).unwrap().0, "10.0.0.5");
        assert_eq!(seen("10.0.0.5:443", &["unknown, 10.2.2.2"], &trusted).unwrap().0, "10.2.2.2");
        // An IPv4 peer on a dual-stack listener (::ffff:10.0.0.5) is the IPv4 address.
        assert_eq!(
            seen("[::ffff:10.0.0.5]:443", &["203.0.113.7"], &trusted),
            pair("203.0.113.7", "203.0.113.7, 10.0.0.5")
        );
    }

    /// The forwarding headers the upstream gets for a request with `sent` from `peer`.
    fn written(peer: &str, sent: &[(&str, &str)], trusted: &[&str]) -> Vec<(String, String)> {
        let conn = ConnInfo::new(peer.parse().unwrap(), true, None);
        let mut headers = HeaderMap::new();
        for (n, v) in sent {
            headers.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        let conn = conn.behind_proxy(&headers, &nets(trusted)).unwrap_or(conn);
        conn.write_forwarding_headers(&mut headers, "auth.example.test");
        let mut out: Vec<(String, String)> =
            headers.iter().map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string())).collect();
        out.sort();
        out
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_client_names_itself_in_no_forwarding_header() {
        let sent = [
            ("authorization", "Basic eDp5"),
            ("forwarded", "for=1.2.3.4;proto=https"),
            ("x-real-ip", "1.2.3.4"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-port", "8443"),
            ("x-forwarded-prefix", "/evil"),
        ];
        let expected = [
            ("authorization", "Basic eDp5"),
            ("x-forwarded-for", "198.51.100.9"),
            ("x-forwarded-host", "auth.example.test"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "198.51.100.9"),
        ];
        assert_eq!(written("198.51.100.9:443", &sent, &[]), pairs(&expected));
        assert_eq!(written("198.51.100.9:443", &sent, &["10.0.0.0/8"]), pairs(&expected));
    }

    #[test]
    fn a_trusted_proxy_names_the_client_and_keeps_what_it_forwarded() {
        let sent = [
            ("forwarded", "for=203.0.113.7;proto=https"),
            ("forwarded", "for=10.1.1.1"),
            ("x-real-ip", "10.1.1.1"),
            ("x-forwarded-for", "1.2.3.4, 203.0.113.7"),
            ("x-forwarded-host", "other.example"),
            ("x-forwarded-port", "443"),
        ];
        let expected = [
            ("forwarded", "for=10.1.1.1"),
            ("forwarded", "for=203.0.113.7;proto=https"),
            ("x-forwarded-for", "1.2.3.4, 203.0.113.7, 10.0.0.5"),
            ("x-forwarded-host", "auth.example.test"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-proto", "https"),
            // The client the relay determined, whatever the proxy said in X-Real-IP.
            ("x-real-ip", "203.0.113.7"),
        ];
        assert_eq!(written("10.0.0.5:443", &sent, &["10.0.0.0/8"]), pairs(&expected));
    }

    use proptest::prelude::*;

    /// `X-Forwarded-For` entries as balancers and clients write them: addresses in and out of
    /// 10.0.0.0/8 and fd00::/8, with ports, and garbage.
    fn entry() -> impl Strategy<Value = String> {
        prop_oneof![
            (prop_oneof![Just(10u8), Just(203), Just(127)], any::<[u8; 3]>())
                .prop_map(|(a, [b, c, d])| format!("{a}.{b}.{c}.{d}")),
            (any::<bool>(), any::<[u16; 3]>()).prop_map(|(ula, [a, b, c])| {
                format!("{}::{a:x}:{b:x}:{c:x}", if ula { "fd00" } else { "2001:db8" })
            }),
            (1u8..255, any::<u16>()).prop_map(|(d, port)| format!("10.0.0.{d}:{port}")),
            any::<u16>().prop_map(|port| format!("[2001:db8::7]:{port}")),
            Just("unknown".to_string()),
            Just(String::new()),
            Just("::ffff:10.9.9.9".to_string()),
            "[ -~]{0,12}".prop_map(|s| s.replace(',', "")),
        ]
    }

    proptest! {
        #[test]
        fn the_client_is_the_peer_or_the_rightmost_hop_not_vouched_for(
            fields in proptest::collection::vec(proptest::collection::vec(entry(), 0..4), 0..3),
            peer in prop_oneof![Just("10.0.0.5:443"), Just("[fd00::5]:443"), Just("198.51.100.9:443")],
        ) {
            let trusted = nets(&["10.0.0.0/8", "fd00::/8"]);
            let is_trusted = |ip: IpAddr| crate::config::in_networks(&trusted, ip);
            let mut headers = HeaderMap::new();
            for field in &fields {
                headers.append(X_FORWARDED_FOR, HeaderValue::from_str(&field.join(", ")).unwrap());
            }
            let conn = ConnInfo::new(peer.parse().unwrap(), true, None);
            let Some(behind) = conn.behind_proxy(&headers, &trusted) else {
                prop_assert!(!is_trusted(conn.remote.ip()));
                return Ok(());
            };
            let chain: Vec<String> =
                fields.concat().iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
            let client: IpAddr = behind.client_ip.to_str().unwrap().parse().unwrap();
            // Walking from the right, every hop passed over is a trusted address; the client
            // is where the walk stopped, or the peer when it never started.
            let passed = chain.iter().rev().take_while(|e| address(e).is_some_and(|ip| is_trusted(ip.to_canonical())));
            let passed = passed.count();
            let stop = chain.len().checked_sub(passed + 1).map(|i| chain[i].as_str());
            let expected = match stop.and_then(address) {
                Some(ip) => ip.to_canonical(),
                None if passed > 0 => address(&chain[chain.len() - passed]).unwrap().to_canonical(),
                None => conn.remote.ip().to_canonical(),
            };
            prop_assert_eq!(client, expected);
            // The upstream's X-Forwarded-For is the chain as sent, then the peer.
            let mut forwarded = chain;
            forwarded.push(conn.remote.ip().to_canonical().to_string());
            let upstream = behind.forwarded_for.expect("a trusted proxy's chain");
            prop_assert_eq!(upstream.to_str().unwrap(), forwarded.join(", "));
        }

        #[test]
        fn only_the_relay_and_trusted_proxies_write_forwarding_headers(
            sent in proptest::collection::vec(
                (prop_oneof![
                    Just("forwarded"), Just("x-real-ip"), Just("x-forwarded-for"), Just("x-forwarded-port"),
                    Just("x-forwarded-prefix"), Just("x-forwarded-host"), Just("cookie"), Just("x-request-id"),
                ], "[!-~]{0,16}"),
                0..8,
            ),
            peer in prop_oneof![Just("10.0.0.5:443"), Just("198.51.100.9:443")],
        ) {
            let sent: Vec<(&str, &str)> = sent.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let out = written(peer, &sent, &["10.0.0.0/8"]);
            let trusted = peer.starts_with("10.");
            let values = |list: &[(String, String)], name: &str| -> Vec<String> {
                let mut v: Vec<String> = list.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect();
                v.sort();
                v
            };
            let sent = pairs(&sent);
            let real_ip = values(&out, "x-real-ip");
            prop_assert_eq!(real_ip.len(), 1);
            prop_assert_eq!(values(&out, "x-forwarded-for").len(), 1);
            prop_assert_eq!(values(&out, "x-forwarded-host"), ["auth.example.test"]);
            for name in ["forwarded", "x-forwarded-port", "x-forwarded-prefix"] {
                let expected = if trusted { values(&sent, name) } else { Vec::new() };
                prop_assert_eq!(values(&out, name), expected, "{}", name);
            }
            // What is no forwarding header goes on as sent.
            for name in ["cookie", "x-request-id"] {
                prop_assert_eq!(values(&out, name), values(&sent, name));
            }
            if !trusted {
                prop_assert_eq!(&real_ip[0], "198.51.100.9");
            }
        }
    }
}
