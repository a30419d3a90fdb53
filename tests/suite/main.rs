//! The integration suite, one module per area, linked into one test binary.
//!
//! One binary, not one per file: each test binary links the whole relay and its dependencies,
//! so fourteen of them cost fourteen links and gigabytes of disk on a clean build. Tests that
//! need a process of their own stay outside: `tests/metrics.rs` counts into the process-wide
//! metrics registry and installs a counting allocator.
//!
//! Run one area with `scripts/test --test suite routes::`.

#[path = "../common/mod.rs"]
mod common;

mod acme;
mod acme_recovery;
mod attacks;
mod balancer;
mod browser;
mod cli;
mod config;
mod contract;
mod deploy;
mod doctor;
mod layout;
mod lifecycle;
mod limits;
mod logs;
mod monitoring;
mod notify;
mod outbound;
mod package;
mod readiness;
mod redis_store;
mod reload;
mod replicas;
mod routes;
mod store;
mod tls;
mod tls_scan;
mod upstream;
