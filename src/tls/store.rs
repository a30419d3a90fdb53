//! The certificate store: one slot per hostname, each holding the certificate currently served.
//! A source (files watcher, self-signed, ACME) swaps a slot at any moment; the next handshake
//! sees the new certificate and established connections keep theirs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{AlpnChallenges, LoadedCert};
use crate::config::Config;

/// The certificate served for one hostname, and why there is none when there is none.
#[derive(Debug)]
pub struct Slot {
    /// Index of the owning site in the configuration.
    pub site: usize,
    /// The hostname as configured (lower case, maybe `*.example.com`).
    pub hostname: String,
    cert: ArcSwapOption<LoadedCert>,
    waiting: Mutex<String>,
}

impl Slot {
    /// The certificate served now, if any.
    pub fn current(&self) -> Option<Arc<LoadedCert>> {
        self.cert.load_full()
    }

    /// Serves `cert` from the next handshake on.
    pub fn install(&self, cert: Arc<LoadedCert>) {
        self.cert.store(Some(cert));
    }

    /// Records why no certificate is available yet (shown by `/readyz`).
    pub fn set_waiting(&self, reason: impl Into<String>) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = reason.into();
        }
    }

    /// Why this hostname is not ready, or `None` when it serves a currently valid certificate
    /// that names it (clients refuse one that does not).
    pub fn not_ready(&self, now: SystemTime) -> Option<String> {
        match self.current() {
            Some(c) if !c.covers(&self.hostname) => {
                Some(format!("{}: the certificate does not name this hostname", self.hostname))
            }
            Some(c) if c.valid_at(now) => None,
            Some(c) if now < c.not_before => Some(format!("{}: certificate not valid yet", self.hostname)),
            Some(_) => Some(format!("{}: certificate expired", self.hostname)),
            None => {
                let why = self.waiting.lock().map(|w| w.clone()).unwrap_or_default();
                let why = if why.is_empty() { "no certificate loaded".to_string() } else { why };
                Some(format!("{}: {why}", self.hostname))
            }
        }
    }
}

/// Every hostname's slot, looked up by SNI; also the rustls certificate resolver.
#[derive(Debug)]
pub struct CertStore {
    by_name: HashMap<String, Arc<Slot>>,
    slots: Vec<Arc<Slot>>,
    default: Option<Arc<Slot>>,
    /// The answers to pending TLS-ALPN-01 validations, served by the handshake.
    challenges: Arc<dyn AlpnChallenges>,
}

impl CertStore {
    /// Empty slots for every hostname of every site; TLS-ALPN-01 validations are answered from
    /// `challenges`.
    pub fn new(config: &Config, challenges: Arc<dyn AlpnChallenges>) -> CertStore {
        let mut by_name = HashMap::new();
        let mut slots = Vec::new();
        let mut default = None;
        for (i, site) in config.sites.iter().enumerate() {
            for h in &site.hostnames {
                let slot = Arc::new(Slot {
                    site: i,
                    hostname: h.clone(),
                    cert: ArcSwapOption::empty(),
                    waiting: Mutex::new(String::new()),
                });
                if site.default && default.is_none() {
                    default = Some(slot.clone());
                }
                by_name.insert(h.clone(), slot.clone());
                slots.push(slot);
            }
        }
        CertStore { by_name, slots, default, challenges }
    }

    /// The answers to pending TLS-ALPN-01 validations.
    pub fn challenges(&self) -> &dyn AlpnChallenges {
        &*self.challenges
    }

    /// The slot for a ClientHello's SNI (`None`: no SNI or an IP literal, so the default site).
    /// Exact names win over `*.` wildcards.
    pub fn lookup(&self, sni: Option<&str>) -> Option<&Arc<Slot>> {
        let Some(name) = sni else {
            return self.default.as_ref();
        };
        let name = name.trim_end_matches('.');
        let lowered;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        if let Some(slot) = self.by_name.get(name) {
            return Some(slot);
        }
        let (_, parent) = name.split_once('.')?;
        self.by_name.get(&format!("*.{parent}"))
    }

    /// All slots, in configuration order.
    pub fn slots(&self) -> &[Arc<Slot>] {
        &self.slots
    }

    /// The slots of one site.
    pub fn site_slots(&self, site: usize) -> impl Iterator<Item = &Arc<Slot>> {
        self.slots.iter().filter(move |s| s.site == site)
    }

    /// Every reason the relay is not ready to serve TLS; empty when it is.
    pub fn not_ready(&self, now: SystemTime) -> Vec<String> {
        self.slots.iter().filter_map(|s| s.not_ready(now)).collect()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let slot = self.lookup(hello.server_name())?;
        slot.cert.load().as_ref().map(|c| c.key.clone())
    }
}
