//! TLS session tickets that every replica can open: the keys come from the shared store, so a
//! browser that got its ticket from one replica resumes on whichever the load balancer picks
//! next (after the round trip to the identity provider, that is rarely the same one).
//!
//! The store holds a short list of [`TicketKey`]s, each with the time it becomes current. The
//! newest key whose time has come seals new tickets; every key in the list opens them. A key is
//! published one period before it becomes current, so each replica already holds it when the
//! first ticket sealed with it arrives, and kept for one period after its successor took over,
//! so tickets handed out just before a rotation still open. While rotation runs, a key lives
//! three periods: forward secrecy is bounded by the rotation, as rustls's own rotator bounds it.
//!
//! Tickets are `id (8) || nonce (12) || AES-256-GCM(session) || tag`, the id as associated
//! data. Keys are secrets: in a shared store they are sealed like private keys.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls::server::ProducesTickets;
use serde::{Deserialize, Serialize};

use crate::crypto::{hex, unhex};

/// How long a key seals new tickets; also the lifetime clients are told.
pub const PERIOD: Duration = Duration::from_secs(6 * 3600);

const ID_LEN: usize = 8;

/// One ticket key as the store keeps it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketKey {
    /// 8 random bytes, hex: what a ticket names its key by.
    pub id: String,
    /// 32 random bytes, base64.
    pub secret: String,
    /// From when it seals new tickets.
    #[serde(with = "humantime_serde")]
    pub activates: SystemTime,
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKey").field("id", &self.id).field("activates", &self.activates).finish_non_exhaustive()
    }
}

impl TicketKey {
    /// A new random key that becomes current at `activates`.
    pub fn generate(activates: SystemTime) -> TicketKey {
        let mut id = [0u8; ID_LEN];
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut id).expect("the system's random number generator");
        aws_lc_rs::rand::fill(&mut secret).expect("the system's random number generator");
        TicketKey { id: hex(&id), secret: STANDARD.encode(secret), activates }
    }
}

/// The list after a rotation at `now`: a key current now (made if missing or overdue), its
/// successor published one period ahead, and keys whose successor took over more than one
/// period ago dropped. Replicas run it under the store's lease, so one of them rotates.
pub fn rotate(keys: &[TicketKey], now: SystemTime, period: Duration) -> Vec<TicketKey> {
    let mut keys: Vec<TicketKey> = keys.to_vec();
    keys.sort_by_key(|k| k.activates);
    let current = keys.iter().rev().find(|k| k.activates <= now).map(|k| k.activates);
    let current = match current {
        Some(at) if at + period > now => at,
        // None yet, or the current one is past its period (nobody rotated for a while).
        _ => {
            keys.push(TicketKey::generate(now));
            now
        }
    };
    if !keys.iter().any(|k| k.activates > current) {
        keys.push(TicketKey::generate(current + period));
    }
    keys.sort_by_key(|k| k.activates);
    // Keep a key while its successor has been current for less than one period.
    let successors: Vec<SystemTime> =
        keys.iter().skip(1).map(|k| k.activates).chain([SystemTime::UNIX_EPOCH]).collect();
    keys.into_iter()
        .zip(successors)
        .filter(|(k, next)| k.activates >= current || *next + period > now)
        .map(|(k, _)| k)
        .collect()
}

/// A key ready to seal and open.
struct Installed {
    id: [u8; ID_LEN],
    activates: SystemTime,
    key: LessSafeKey,
}

/// The session ticketer of every TLS configuration of the process, fed with the store's keys.
/// Until keys are installed it issues no tickets (sessions are then resumed from rustls's
/// per-process cache).
pub struct SharedTicketer {
    keys: ArcSwap<Vec<Installed>>,
}

impl std::fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTicketer").field("keys", &self.keys.load().len()).finish()
    }
}

impl SharedTicketer {
    pub fn new() -> Arc<SharedTicketer> {
        Arc::new(SharedTicketer { keys: ArcSwap::from_pointee(Vec::new()) })
    }

    /// Replaces the keys with `keys` (a malformed one is skipped and named in the log).
    pub fn install(&self, keys: &[TicketKey]) {
        let mut installed: Vec<Installed> = keys
            .iter()
            .filter_map(|k| {
                let id = unhex(&k.id).and_then(|id| <[u8; ID_LEN]>::try_from(id).ok());
                let parsed = id.zip(STANDARD.decode(&k.secret).ok());
                let Some((id, secret)) = parsed else {
                    tracing::warn!(id = %k.id, "a session ticket key in the store is malformed; skipped");
                    return None;
                };
                let key = UnboundKey::new(&AES_256_GCM, &secret).ok()?;
                Some(Installed { id, activates: k.activates, key: LessSafeKey::new(key) })
            })
            .collect();
        installed.sort_by_key(|k| k.activates);
        self.keys.store(Arc::new(installed));
    }
}

impl ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        !self.keys.load().is_empty()
    }

    fn lifetime(&self) -> u32 {
        PERIOD.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.load();
        let now = SystemTime::now();
        // The newest key whose time has come; with a clock behind every key's, the oldest.
        let key = keys.iter().rev().find(|k| k.activates <= now).or_else(|| keys.first())?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(key.id), &mut sealed).ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < ID_LEN + NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (id, rest) = cipher.split_at(ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys.load();
        let key = keys.iter().find(|k| k.id == id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key.key.open_in_place(nonce, Aad::from(&key.id), &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

/// The store name of the shared ticket keys (sealed like a private key).
pub const STORE_NAME: &str = "tls/tickets.json";
/// The lock the replica that rotates the keys holds.
const ROTATE_LOCK: &str = "tls/tickets";
/// How often the keys are looked at (a rotation is due every [`PERIOD`]).
const CHECK_EVERY: Duration = Duration::from_secs(600);

/// Keeps `ticketer` fed with the keys in the shared store until `stop`: installs them at start
/// and whenever another replica changed them, and rotates them (under a lock, so one replica
/// does) when the list is missing or due.
pub async fn follow(
    shared: Arc<crate::storage::shared::Shared>,
    ticketer: Arc<SharedTicketer>,
    stop: tokio_util::sync::CancellationToken,
) {
    let path = shared.root().join(STORE_NAME);
    let mut changes = shared.subscribe();
    let owner = format!("tickets/{}/{:x}", std::process::id(), rand_u64());
    loop {
        let mut keys = read(&path);
        let now = SystemTime::now();
        if rotate(&keys, now, PERIOD) != keys {
            match rotate_shared(&shared, &path, &owner, now).await {
                Ok(fresh) => keys = fresh,
                Err(e) => tracing::debug!(error = %e, "session ticket keys not rotated now; trying again later"),
            }
        }
        ticketer.install(&keys);
        tracing::debug!(keys = keys.len(), path = %path.display(), "session ticket keys installed");
        tokio::select! {
            () = stop.cancelled() => return,
            _ = changes.changed() => {}
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

/// Under the rotation lock: the list as it is in the store now, rotated, written back.
async fn rotate_shared(
    shared: &crate::storage::shared::Shared,
    path: &std::path::Path,
    owner: &str,
    now: SystemTime,
) -> Result<Vec<TicketKey>, crate::storage::shared::SharedError> {
    use crate::storage::redis::Taken;
    if shared.try_lock(ROTATE_LOCK, owner, Duration::from_secs(30)).await? != Taken::Held {
        return Ok(read(path));
    }
    let result = async {
        shared.pull_name(STORE_NAME).await?;
        let keys = rotate(&read(path), now, PERIOD);
        let json = serde_json::to_vec(&keys).expect("ticket keys serialize");
        crate::fsutil::write_private(path, &json)
            .map_err(|source| crate::storage::shared::SharedError::Io { path: path.display().to_string(), source })?;
        shared.push_fenced(&[STORE_NAME.to_string()], ROTATE_LOCK, owner).await?;
        tracing::info!(keys = keys.len(), "session ticket keys rotated in the shared store");
        Ok(keys)
    }
    .await;
    let _ = shared.release(ROTATE_LOCK, owner).await;
    result
}

/// The keys in the folder's copy of the store; none when missing or unreadable.
fn read(path: &std::path::Path) -> Vec<TicketKey> {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = PERIOD;

    fn at(periods_tenths: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + P / 10 * periods_tenths as u32
    }

    fn times(keys: &[TicketKey]) -> Vec<SystemTime> {
        keys.iter().map(|k| k.activates).collect()
    }

    #[test]
    fn a_key_is_published_a_period_ahead_and_kept_a_period_after() {
        let keys = rotate(&[], at(0), P);
        assert_eq!(times(&keys), [at(0), at(10)], "current now, the next one published");
        assert_eq!(rotate(&keys, at(5), P), keys, "nothing to do mid-period");
        let later = rotate(&keys, at(11), P);
        assert_eq!(times(&later), [at(0), at(10), at(20)], "the previous key still opens tickets");
        assert_eq!(later[..2], keys[..], "existing keys are kept as they are");
        let after = rotate(&later, at(21), P);
        assert_eq!(times(&after), [at(10), at(20), at(30)], "the first key is gone");
    }

    #[test]
    fn a_list_nobody_rotated_for_long_gets_a_fresh_current_key() {
        let keys = rotate(&[], at(0), P);
        let stale = rotate(&keys, at(55), P);
        // The key replicas kept sealing with stays one more period; the one before it goes.
        assert_eq!(times(&stale), [at(10), at(55), at(65)]);
    }

    fn ticketer(keys: &[TicketKey]) -> Arc<SharedTicketer> {
        let t = SharedTicketer::new();
        t.install(keys);
        t
    }

    #[test]
    fn a_ticket_opens_wherever_its_key_is_held_and_nowhere_else() {
        let now = SystemTime::now();
        let keys = rotate(&[], now, P);
        let (a, b) = (ticketer(&keys), ticketer(&keys));
        assert!(a.enabled() && !SharedTicketer::new().enabled());
        let ticket = a.encrypt(b"session state").unwrap();
        assert_eq!(hex(&ticket[..ID_LEN]), keys[0].id, "sealed with the current key");
        assert_eq!(b.decrypt(&ticket).as_deref(), Some(&b"session state"[..]), "another replica opens it");

        let mut flipped = ticket.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(b.decrypt(&flipped), None);
        assert_eq!(b.decrypt(&ticket[..20]), None);
        assert_eq!(ticketer(&rotate(&[], now, P)).decrypt(&ticket), None, "other keys");

        // Rotated: the old key still opens for a period, then not.
        let rotated = rotate(&keys, now + P + Duration::from_secs(1), P);
        assert_eq!(ticketer(&rotated).decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        let gone = rotate(&rotated, now + 2 * P + Duration::from_secs(2), P);
        assert_eq!(ticketer(&gone).decrypt(&ticket), None);
    }

    /// A TLS 1.3 handshake of `client` with `server` over an in-memory pipe; whether it resumed.
    /// The server writes a byte once done, so the client has read its ticket before this ends.
    async fn handshake(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (c, s) = tokio::io::duplex(64 * 1024);
        let served = async move {
            let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(s).await.expect("server handshake");
            tls.write_all(b"!").await.unwrap();
            tls.flush().await.unwrap();
            tls
        };
        let name = rustls::pki_types::ServerName::try_from("auth.example.test").unwrap();
        let connected = async move {
            let mut tls = tokio_rustls::TlsConnector::from(client).connect(name, c).await.expect("client handshake");
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.unwrap();
            tls
        };
        let (_server, client) = tokio::join!(served, connected);
        client.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    #[tokio::test]
    async fn a_client_resumes_on_another_replica_that_holds_the_same_keys() {
        crate::crypto::provider();
        let cert = rcgen::generate_simple_self_signed(vec!["auth.example.test".to_string()]).unwrap();
        let der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let replica = |ticketer: Arc<SharedTicketer>| {
            let mut config = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(vec![der.clone()], key.clone_key())
                .unwrap();
            config.ticketer = ticketer;
            Arc::new(config)
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der.clone()).unwrap();
        let client =
            || Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots.clone()).with_no_client_auth());

        let keys = rotate(&[], SystemTime::now(), PERIOD);
        let (a, b) = (replica(ticketer(&keys)), replica(ticketer(&keys)));
        let browser = client();
        assert!(!handshake(a.clone(), browser.clone()).await, "the first visit is a full handshake");
        assert!(handshake(b.clone(), browser.clone()).await, "resumed on the other replica");

        let stranger = replica(ticketer(&rotate(&[], SystemTime::now(), PERIOD)));
        let other_browser = client();
        handshake(a, other_browser.clone()).await;
        assert!(!handshake(stranger, other_browser).await, "a replica with other keys cannot resume it");
    }

    #[test]
    fn keys_never_show_their_secret() {
        let key = TicketKey::generate(SystemTime::UNIX_EPOCH);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.secret) && shown.contains(&key.id), "{shown}");
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(serde_json::from_str::<TicketKey>(&json).unwrap(), key);
    }
}
