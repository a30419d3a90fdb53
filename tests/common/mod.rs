//! Test support: a throwaway PKI made with rcgen, a real upstream HTTP(S) server that records
//! what it receives, a rogue upstream that answers with raw scripted bytes, the relay started
//! in-process on ephemeral loopback ports, and real TLS clients. Nothing here is a mock: every
//! byte crosses a socket.

#![allow(dead_code, unused_imports)]

pub mod acme_front;
pub mod client;
pub mod pebble;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod relay;
pub mod rogue;
pub mod upstream;

pub use client::{Reply, TlsClient};
pub use pki::Pki;
pub use relay::RelayUnderTest;
pub use upstream::{Recorded, Upstream, UpstreamBehaviour};

/// A `[[site]]` table with a `files` certificate from `leaf`; `extra` goes under `[[site]]`.
pub fn files_site(name: &str, hostnames: &[&str], leaf: &pki::Leaf, extra: &str) -> String {
    let hosts = hostnames.iter().map(|h| format!("\"{h}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "\n[[site]]\nname = \"{name}\"\nhostnames = [{hosts}]\n{extra}\n\n[site.tls]\nsource = \"files\"\n\
         cert = \"{cert}\"\nkey = \"{key}\"\n",
        cert = leaf.cert_path.display(),
        key = leaf.key_path.display(),
    )
}

/// The usual test relay: HTTPS on an ephemeral port and one site `auth.example.test` with a
/// certificate from `pki`; `server`, `limits` and `site` are extra lines for those tables.
pub fn one_site_config(pki: &Pki, server: &str, limits: &str, site: &str) -> String {
    let leaf = pki.leaf("relay", &["auth.example.test"]);
    format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\n{server}\n\n[limits]\n{limits}\n{}",
        files_site("auth", &["auth.example.test"], &leaf, site)
    )
}
