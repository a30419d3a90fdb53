//! Listen addresses: can this user bind each one now? All are bound together, then released.
//! (Two that overlap, such as `[::]:443` beside `0.0.0.0:443`, are refused by the
//! configuration itself, with their keys.)
//!
//! Ports below 1024 need root or `CAP_NET_BIND_SERVICE` (unless the kernel's
//! `net.ipv4.ip_unprivileged_port_start` was lowered). An address in use is an error, except
//! that the relay itself holds its ports while it runs: the fix line says so.

use std::io;
use std::net::{SocketAddr, TcpListener};

use super::Finding;
use crate::config::Server;

const CHECK: &str = "listen";

/// Every configured listener: HTTPS, plain HTTP and admin, each held until all are bound, as
/// `serve` holds them: two that cannot be bound together fail here as they would at start.
pub fn check_all(server: &Server) -> Vec<Finding> {
    let https = server.https.iter().map(|a| (*a, "https"));
    let http = server.http.iter().map(|a| (*a, "http"));
    let admin = server.admin.iter().map(|a| (*a, "admin"));
    let mut held = Vec::new();
    let findings = https
        .chain(http)
        .chain(admin)
        .map(|(addr, role)| match TcpListener::bind(addr) {
            Ok(listener) => {
                held.push(listener);
                outcome(addr, role, Ok(()))
            }
            Err(e) => outcome(addr, role, Err(e)),
        })
        .collect();
    drop(held);
    findings
}

/// Binds `addr` (a `role` listener: https, http or admin) and releases it.
pub fn check(addr: SocketAddr, role: &str) -> Finding {
    outcome(addr, role, TcpListener::bind(addr).map(drop))
}

/// The finding for the result of binding `addr`.
pub fn outcome(addr: SocketAddr, role: &str, bound: io::Result<()>) -> Finding {
    let Err(e) = bound else {
        let note = if addr.port() == 0 { " (port 0: any free port)" } else { "" };
        return Finding::ok(CHECK, format!("{role} {addr} can be bound{note}"));
    };
    let port = addr.port();
    match e.kind() {
        io::ErrorKind::PermissionDenied if port < 1024 => Finding::error(
            CHECK,
            format!("{role} {addr}: permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE"),
            "grant the capability: `setcap cap_net_bind_service=+ep $(command -v oauth-relay)`, or \
             `AmbientCapabilities=CAP_NET_BIND_SERVICE` in the systemd unit (deploy/), or listen on a port >= 1024 \
             and forward to it",
        ),
        io::ErrorKind::PermissionDenied => Finding::error(
            CHECK,
            format!("{role} {addr}: permission denied ({e})"),
            "check the security policy (SELinux, AppArmor, seccomp) that stops this user binding the port",
        ),
        io::ErrorKind::AddrInUse => Finding::error(
            CHECK,
            format!("{role} {addr}: address already in use"),
            format!(
                "if oauth-relay is running, this is expected (it holds the port); otherwise find the owner with \
                 `ss -ltnp 'sport = :{port}'` and stop it, or choose another port"
            ),
        ),
        io::ErrorKind::AddrNotAvailable => Finding::error(
            CHECK,
            format!("{role} {addr}: {} is not an address of this machine", addr.ip()),
            "listen on 0.0.0.0 / [::] or on one of this machine's addresses (`ip -brief address`)",
        ),
        _ => Finding::error(CHECK, format!("{role} {addr}: cannot bind: {e}"), "fix the address in [server]"),
    }
}
