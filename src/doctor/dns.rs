//! Hostnames: each resolves (A/AAAA) and, where this machine's public address can be known,
//! points at it.
//!
//! This machine's addresses are read from the kernel (`/proc/net/fib_trie` for IPv4,
//! `/proc/net/if_inet6` for IPv6); no outside "what is my IP" service is asked. Behind NAT or a
//! load balancer no interface holds a public address, and the comparison is skipped with a note.
//!
//! A name that does not resolve is a warning with `self-signed` and `files` sources (local use,
//! a hosts-file entry, DNS not made yet) and an error with `acme`, whose CA must reach it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Finding, TIMEOUT};

const CHECK: &str = "dns";

/// Resolves `host` and compares the answer with this machine's addresses. `acme`: the site's
/// certificate source is ACME, so a name that does not resolve is an error.
pub async fn check_hostname(host: &str, acme: bool) -> Vec<Finding> {
    if host.starts_with("*.") {
        return vec![Finding::ok(CHECK, format!("{host}: wildcard, not looked up; check each name in use"))];
    }
    match resolve(host).await {
        Ok(addrs) => {
            let list = join(&addrs);
            let mut out = vec![Finding::ok(CHECK, format!("{host} resolves to {list}"))];
            out.push(points_here(host, &addrs, local_addresses().as_deref(), acme));
            out
        }
        Err(why) => vec![unresolved(host, &why, acme)],
    }
}

/// The A/AAAA addresses of `host` (sorted, without duplicates), within [`TIMEOUT`].
pub async fn resolve(host: &str) -> Result<Vec<IpAddr>, String> {
    match tokio::time::timeout(TIMEOUT, tokio::net::lookup_host((host, 443))).await {
        Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(addrs)) => {
            let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            ips.sort();
            ips.dedup();
            if ips.is_empty() { Err("no A or AAAA record".into()) } else { Ok(ips) }
        }
    }
}

/// The finding for a name that does not resolve: `why` is the resolver's answer.
pub fn unresolved(host: &str, why: &str, acme: bool) -> Finding {
    let message = format!("{host} does not resolve ({why})");
    if acme {
        Finding::error(
            CHECK,
            format!("{message}; the ACME CA cannot validate it"),
            format!("add an A/AAAA record for {host} pointing at this machine (or its load balancer)"),
        )
    } else {
        Finding::warning(
            CHECK,
            format!("{message}; browsers will not reach the relay by this name"),
            format!("add an A/AAAA record for {host}, or a hosts-file entry for local use"),
        )
    }
}

/// Whether `resolved` (the hostname's addresses) include this machine, given its interface
/// addresses `local` (`None` when they cannot be read). Pure, so tests can feed any addresses.
pub fn points_here(host: &str, resolved: &[IpAddr], local: Option<&[IpAddr]>, acme: bool) -> Finding {
    let Some(local) = local else {
        return Finding::ok(CHECK, format!("{host}: not compared with this machine (its addresses cannot be read)"));
    };
    let here: Vec<IpAddr> = resolved.iter().copied().filter(|a| a.is_loopback() || local.contains(a)).collect();
    if !here.is_empty() {
        if here.iter().all(IpAddr::is_loopback) {
            let message =
                format!("{host} points at this machine's loopback ({}); only this machine reaches it", join(&here));
            return if acme {
                Finding::warning(
                    CHECK,
                    format!("{message}, not the ACME CA"),
                    format!("point {host} at this machine's public address (fine only with a local test CA)"),
                )
            } else {
                Finding::ok(CHECK, message)
            };
        }
        return Finding::ok(CHECK, format!("{host} points at this machine ({})", join(&here)));
    }
    let public: Vec<IpAddr> = local.iter().copied().filter(is_public).collect();
    if public.is_empty() {
        return Finding::ok(
            CHECK,
            format!(
                "{host}: not compared with this machine, which has no public address on its interfaces (NAT or a \
                 load balancer in front?)"
            ),
        );
    }
    Finding::warning(
        CHECK,
        format!("{host} resolves to {}, not to this machine's public address {}", join(resolved), join(&public)),
        format!(
            "point the A/AAAA record of {host} at {} (ignore if a load balancer forwards to this machine)",
            join(&public)
        ),
    )
}

/// This machine's interface addresses, from the kernel's tables; `None` off Linux or when
/// `/proc` is not mounted.
pub fn local_addresses() -> Option<Vec<IpAddr>> {
    let v4 = std::fs::read_to_string("/proc/net/fib_trie").ok().map(|t| parse_fib_trie(&t));
    let v6 = std::fs::read_to_string("/proc/net/if_inet6").ok().map(|t| parse_if_inet6(&t));
    if v4.is_none() && v6.is_none() {
        return None;
    }
    let mut all: Vec<IpAddr> = v4.into_iter().flatten().chain(v6.into_iter().flatten()).collect();
    all.sort();
    all.dedup();
    Some(all)
}

/// The addresses marked `/32 host LOCAL` in `/proc/net/fib_trie`: the line before names the
/// address (`|-- 192.0.2.2`).
pub fn parse_fib_trie(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(addr) = t.strip_prefix("|-- ") {
            last = addr.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL") {
            out.extend(last.take().map(IpAddr::V4));
        }
    }
    out
}

/// The addresses in `/proc/net/if_inet6`: 32 hex digits first on each line.
pub fn parse_if_inet6(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|hex| u128::from_str_radix(hex, 16).ok())
        .map(|n| IpAddr::V6(Ipv6Addr::from(n)))
        .collect()
}

/// Reachable from the Internet: not loopback, private, link-local, shared (CGNAT),
/// documentation, benchmarking, multicast or reserved.
pub fn is_public(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || (a == 192 && b == 0 && c == 0)
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            // Global unicast is 2000::/3; 2001:db8::/32 is documentation.
            (s[0] & 0xe000) == 0x2000 && !(s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

fn join(addrs: &[IpAddr]) -> String {
    addrs.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
}
