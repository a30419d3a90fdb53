//! The one crypto provider of the process (aws-lc-rs through rustls), for every TLS server and
//! client configuration and for the random numbers the relay draws. A leaf, so the TLS
//! terminator, the upstream and ACME clients and the lock owners all reach it without reaching
//! each other.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider used everywhere (aws-lc-rs), installed once as the process default so
/// that every rustls user in the process (upstream client, ACME client) agrees.
pub fn provider() -> Arc<CryptoProvider> {
    if let Some(p) = CryptoProvider::get_default() {
        return p.clone();
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    CryptoProvider::get_default().expect("a provider was just installed").clone()
}

/// `bytes` as lower-case hex: how the relay writes digests, key ids and random tokens.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes a [`hex`] string stands for; `None` for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
        assert_eq!(unhex(&hex(&[0, 255, 16])), Some(vec![0, 255, 16]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("é1"), None);
    }
}
