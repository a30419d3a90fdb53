//! Test support: a throwaway PKI made with rcgen, a real upstream HTTP(S) server that records
//! what it receives, the relay started in-process on ephemeral loopback ports, and real TLS
//! clients. Nothing here is a mock: every byte crosses a socket.

#![allow(dead_code, unused_imports)]

pub mod client;
pub mod pebble;
pub mod pki;
pub mod relay;
pub mod upstream;

pub use client::{Reply, TlsClient};
pub use pki::Pki;
pub use relay::RelayUnderTest;
pub use upstream::{Recorded, Upstream, UpstreamBehaviour};
