//! Flow ids: a short keyed hash of an OAuth `state`, put on the authorize, callback and token
//! access lines so an operator can follow one sign-in across them without the `state` (which
//! can carry application data) or the authorization code ever reaching a log.
//!
//! The id is the first 8 bytes of HMAC-SHA256(key, state), in hex. The token exchange carries
//! no `state`, only the code, so the callback remembers a keyed hash of its code (never the
//! code) with the flow id for ten minutes, the life of an authorization code; the token line
//! looks its code up there. The key is random per process unless `[log] flow_key` is set, so
//! that several replicas print the same id for the same flow.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use base64::Engine;

/// How many callback codes are remembered at most; the oldest go first.
pub const MAX_CODES: usize = 10_000;
/// How long a callback code is remembered: about the life of an authorization code.
pub const CODE_TTL: Duration = Duration::from_secs(600);

/// The `[log] flow_key` secret. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct FlowKey(Vec<u8>);

impl fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FlowKey(<set>)")
    }
}

impl FlowKey {
    /// The shortest key accepted, in bytes.
    pub const MIN_LEN: usize = 16;

    /// Reads a key written in hex or base64 (standard or URL-safe, padded or not).
    pub fn parse(text: &str) -> Result<FlowKey, String> {
        let t = text.trim();
        let is_hex = !t.is_empty() && t.len() % 2 == 0 && t.bytes().all(|b| b.is_ascii_hexdigit());
        let bytes = if is_hex {
            (0..t.len()).step_by(2).filter_map(|i| u8::from_str_radix(&t[i..i + 2], 16).ok()).collect()
        } else {
            use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
            [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD].iter().find_map(|e| e.decode(t).ok()).ok_or_else(
                || "must be a secret in hex or base64 (e.g. the output of `openssl rand -hex 32`)".to_string(),
            )?
        };
        if bytes.len() < Self::MIN_LEN {
            return Err(format!(
                "is {} bytes long; use at least {} random bytes (e.g. `openssl rand -hex 32`)",
                bytes.len(),
                Self::MIN_LEN
            ));
        }
        Ok(FlowKey(bytes))
    }
}

/// A flow id: printed as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId([u8; 8]);

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Computes flow ids and remembers callback codes.
pub struct Flows {
    /// What this instance was made from (`None`: a random key), to hand the same instance to a
    /// reloaded relay with the same setting.
    configured: Option<FlowKey>,
    state_key: hmac::Key,
    code_key: hmac::Key,
    codes: Mutex<Codes>,
}

impl fmt::Debug for Flows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flows").field("configured", &self.configured.is_some()).finish_non_exhaustive()
    }
}

/// The instance in use, reused while the key setting stays the same, so that a configuration
/// reload neither changes the ids nor forgets the codes of flows in progress.
static CURRENT: Mutex<Option<Arc<Flows>>> = Mutex::new(None);

impl Flows {
    /// The flows for a `[log] flow_key` setting; `None` only when the system's random generator
    /// fails (flow ids are then left out of the logs).
    pub fn for_key(key: Option<&FlowKey>) -> Option<Arc<Flows>> {
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = current.as_ref().filter(|f| f.configured.as_ref() == key) {
            return Some(f.clone());
        }
        let flows = match key {
            Some(k) => Flows::with_key(&k.0, Some(k.clone())),
            None => {
                let mut random = [0u8; 32];
                if aws_lc_rs::rand::fill(&mut random).is_err() {
                    tracing::warn!("no randomness for the flow id key; access lines carry no flow id");
                    return None;
                }
                Flows::with_key(&random, None)
            }
        };
        let flows = Arc::new(flows);
        *current = Some(flows.clone());
        Some(flows)
    }

    fn with_key(secret: &[u8], configured: Option<FlowKey>) -> Flows {
        let master = hmac::Key::new(hmac::HMAC_SHA256, secret);
        // Separate keys, so that a code's hash never equals a state's flow id.
        let derive = |label: &[u8]| hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&master, label).as_ref());
        Flows {
            configured,
            state_key: derive(b"oauth-relay flow id of a state, v1"),
            code_key: derive(b"oauth-relay flow id of a code, v1"),
            codes: Mutex::new(Codes::default()),
        }
    }

    /// The flow id of a `state` value.
    pub fn of_state(&self, state: &str) -> FlowId {
        let tag = hmac::sign(&self.state_key, state.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&tag.as_ref()[..8]);
        FlowId(id)
    }

    fn code_hash(&self, code: &str) -> u128 {
        let tag = hmac::sign(&self.code_key, code.as_bytes());
        let mut h = [0u8; 16];
        h.copy_from_slice(&tag.as_ref()[..16]);
        u128::from_be_bytes(h)
    }

    /// The authorize request: the flow of its `state`, if it has one.
    pub fn authorize(&self, query: Option<&str>) -> Option<FlowId> {
        let (state, _) = state_and_code(query?);
        state.map(|s| self.of_state(&s))
    }

    /// The callback: the flow of its `state`; its `code` (when there is one) is remembered so
    /// the token exchange gets the same flow id.
    pub fn callback(&self, query: Option<&str>) -> Option<FlowId> {
        let (state, code) = state_and_code(query?);
        let flow = self.of_state(&state?);
        if let Some(code) = code {
            let hash = self.code_hash(&code);
            if let Ok(mut codes) = self.codes.lock() {
                codes.remember(hash, flow, Instant::now());
            }
        }
        Some(flow)
    }

    /// The token exchange: the flow whose callback carried this code (the last path segment,
    /// percent-encoded as sent), if this process saw it in the last ten minutes.
    pub fn token(&self, code_segment: &str) -> Option<FlowId> {
        let code = percent_encoding::percent_decode_str(code_segment).decode_utf8().ok()?;
        let hash = self.code_hash(&code);
        self.codes.lock().ok()?.lookup(hash, Instant::now())
    }
}

/// The first `state` and `code` of a query, decoded as a form.
fn state_and_code(query: &str) -> (Option<String>, Option<String>) {
    let (mut state, mut code) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "state" if state.is_none() => state = Some(v.into_owned()),
            "code" if code.is_none() => code = Some(v.into_owned()),
            _ => {}
        }
        if state.is_some() && code.is_some() {
            break;
        }
    }
    (state, code)
}

/// Code hash -> flow id, bounded in size and age. `order` holds insertions oldest first; an
/// entry leaves the map when its own insertion leaves `order`.
#[derive(Default)]
struct Codes {
    map: HashMap<u128, (FlowId, Instant)>,
    order: VecDeque<(u128, Instant)>,
}

impl Codes {
    fn remember(&mut self, hash: u128, flow: FlowId, now: Instant) {
        self.expire(now);
        while self.order.len() >= MAX_CODES {
            self.pop_oldest();
        }
        self.map.insert(hash, (flow, now));
        self.order.push_back((hash, now));
    }

    fn lookup(&mut self, hash: u128, now: Instant) -> Option<FlowId> {
        self.expire(now);
        self.map.get(&hash).map(|(flow, _)| *flow)
    }

    fn expire(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) >= CODE_TTL) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((hash, at)) = self.order.pop_front() {
            // A code seen again later has a newer entry, which stays.
            if self.map.get(&hash).is_some_and(|(_, t)| *t == at) {
                self.map.remove(&hash);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flows() -> Flows {
        Flows::with_key(b"0123456789abcdef", None)
    }

    #[test]
    fn one_flow_one_id_across_authorize_callback_and_token() {
        let f = flows();
        let a = f.authorize(Some("clientId=x&state=a%2Bb%20c&responseType=code")).expect("authorize flow");
        let c = f.callback(Some("code=C%2F1&state=a%2Bb+c")).expect("callback flow");
        assert_eq!(a, c, "the same state, encoded differently, is the same flow");
        assert_eq!(f.token("C%2F1"), Some(a));
        assert_eq!(f.token("C%2f1"), Some(a));
        assert_eq!(f.token("other"), None);
        assert_ne!(f.of_state("s1"), f.of_state("s2"));
        assert_eq!(a.to_string().len(), 16);
        assert_eq!(f.callback(Some("code=x")), None, "no state, no flow");
        assert_eq!(f.authorize(None), None);
    }

    #[test]
    fn the_key_decides_the_id() {
        let a = Flows::with_key(b"0123456789abcdef", None).of_state("s");
        let b = Flows::with_key(b"0123456789abcdeX", None).of_state("s");
        assert_ne!(a, b);
        assert_eq!(a, Flows::with_key(b"0123456789abcdef", None).of_state("s"));
    }

    #[test]
    fn codes_expire_and_the_oldest_go_first() {
        let mut codes = Codes::default();
        let t0 = Instant::now();
        let id = FlowId([1; 8]);
        codes.remember(1, id, t0);
        assert_eq!(codes.lookup(1, t0 + CODE_TTL - Duration::from_secs(1)), Some(id));
        assert_eq!(codes.lookup(1, t0 + CODE_TTL), None);
        assert!(codes.map.is_empty() && codes.order.is_empty());
        for i in 0..(MAX_CODES as u128 + 5) {
            codes.remember(i, id, t0);
        }
        assert_eq!(codes.map.len(), MAX_CODES);
        assert_eq!(codes.lookup(4, t0), None);
        assert_eq!(codes.lookup(5, t0), Some(id));
        // Seen again: the newer entry outlives the eviction of the older one.
        let t1 = t0 + Duration::from_secs(1);
        codes.remember(9, FlowId([2; 8]), t1);
        for i in 0..5 {
            codes.remember(1_000_000 + i, id, t1);
        }
        assert_eq!(codes.lookup(8, t1), None);
        assert_eq!(codes.lookup(9, t1), Some(FlowId([2; 8])));
    }

    #[test]
    fn keys_are_read_from_hex_or_base64_and_never_shown() {
        let hex = FlowKey::parse("00112233445566778899aabbccddeeff").expect("hex");
        assert_eq!(hex.0.len(), 16);
        let b64 = FlowKey::parse("ABEiM0RVZneImaq7zN3u/w==").expect("base64");
        assert_eq!(hex, b64);
        assert!(FlowKey::parse("abcd").unwrap_err().contains("2 bytes"));
        assert!(FlowKey::parse("not a key!").is_err());
        assert_eq!(format!("{hex:?}"), "FlowKey(<set>)");
    }
}
