//! Who the client is when an HTTP proxy the operator trusts stands in front of the relay (an L7
//! load balancer or WAF that re-encrypts to it, `[server] trusted_proxies`). Such a proxy names
//! the client in `X-Forwarded-For`; anyone else's `X-Forwarded-For` is a claim the client makes
//! about itself and is replaced. The client is the rightmost address in the header that is not
//! itself a trusted proxy, as nginx's `real_ip_recursive` and Caddy's `trusted_proxies_strict`
//! read it: entries further left were written by the client or by proxies nobody vouches for.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

use super::ConnInfo;
use super::proxy::X_FORWARDED_FOR;

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
            ..self.clone()
        })
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
}
