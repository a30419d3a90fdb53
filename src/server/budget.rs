//! The connection budget: how many connections the relay holds at once (`max_connections`),
//! how many of them one client address may hold (`max_connections_per_ip`), and which ones go
//! first when every slot is taken.
//!
//! A flood from one address meets the per-address cap: its connections beyond the cap are
//! closed as soon as they are accepted (behind a load balancer that sends the PROXY protocol,
//! the address it names counts). A flood from many addresses meets the global cap: then, like
//! nginx reusing its keep-alive connections, the relay closes the connections that cost others
//! the most and serve nobody, in this order: answers stalled on a client that does not read,
//! handshakes and headers begun and never finished, then the longest idle keep-alive
//! connections, up to [`RECLAIM_BATCH`] at a time. A connection that is answering a request is
//! never chosen.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::deadline::STALLED;

/// A connection a shortage of slots may close.
pub trait Reclaim: Send + Sync {
    /// How readily it goes (lower first; see the module docs), `None` when it must not.
    fn reclaim_rank(&self) -> Option<(u8, Instant)>;
    /// Asks it to go now.
    fn reclaim(&self);
}

/// A connection before its first request can be read: reading its PROXY header and its TLS
/// handshake. One that has not finished within [`STALLED`] ranks with unfinished headers.
pub struct Handshaking {
    started: Instant,
    reclaimed: Notify,
}

impl Handshaking {
    pub fn new() -> Arc<Handshaking> {
        Arc::new(Handshaking { started: Instant::now(), reclaimed: Notify::new() })
    }

    /// Completes when a shortage of slots asks this connection to go.
    pub async fn reclaimed(&self) {
        self.reclaimed.notified().await;
    }
}

impl Reclaim for Handshaking {
    fn reclaim_rank(&self) -> Option<(u8, Instant)> {
        (self.started.elapsed() >= STALLED).then_some((1, self.started))
    }

    fn reclaim(&self) {
        // notify_one keeps the permit for a waiter that is not polled yet.
        self.reclaimed.notify_one();
    }
}

/// Connections the admin listener holds at most, beside `max_connections`.
pub const ADMIN_SLOTS: usize = 64;

/// How many connections one shortage of slots closes at most.
pub const RECLAIM_BATCH: usize = 32;

/// The relay's connection budget (one per process, resized on reload).
pub struct Budget {
    /// Connection slots: `limits.max_connections`.
    pub permits: Arc<Semaphore>,
    /// The admin listener's own slots ([`ADMIN_SLOTS`]): a flood that takes every public slot
    /// leaves health checks and metrics scrapes their way in.
    pub admin: Arc<Semaphore>,
    size: Mutex<usize>,
    /// Open connections by client address (an IPv6 client by its /64).
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// Open connections (but the admin listener's), for [`Budget::reclaim`].
    open: Mutex<HashMap<u64, Weak<dyn Reclaim>>>,
    next_id: AtomicU64,
    /// Whether a refusal was already logged as a warning (the first one is; later ones at
    /// debug level).
    refused: AtomicBool,
}

impl Budget {
    pub fn new(size: usize) -> Budget {
        Budget {
            permits: Arc::new(Semaphore::new(size)),
            admin: Arc::new(Semaphore::new(ADMIN_SLOTS)),
            size: Mutex::new(size),
            per_address: Mutex::new(HashMap::new()),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            refused: AtomicBool::new(false),
        }
    }

    /// Grows at once; shrinks as connections close (the surplus slots are taken and dropped
    /// as they come free, so no open connection is cut).
    pub fn resize(&self, new: usize) {
        let Ok(mut size) = self.size.lock() else { return };
        if new > *size {
            self.permits.add_permits(new - *size);
        } else if new < *size {
            let (permits, surplus) = (self.permits.clone(), u32::try_from(*size - new).unwrap_or(u32::MAX));
            tokio::spawn(async move {
                // Ends with an error once the semaphore is closed at shutdown.
                if let Ok(taken) = permits.acquire_many_owned(surplus).await {
                    taken.forget();
                }
            });
        }
        *size = new;
    }

    /// A place for one more connection from `ip`, or `None` when it already holds `cap`.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<AddressSlot> {
        let key = address_key(ip);
        let mut counts = self.per_address.lock().ok()?;
        let count = counts.entry(key).or_insert(0);
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(AddressSlot { budget: self.clone(), key })
    }

    /// True for the first refusal of a per-address cap in this process.
    pub fn first_refusal(&self) -> bool {
        !self.refused.swap(true, Ordering::Relaxed)
    }

    /// Lists a connection for [`Budget::reclaim`] until the returned guard drops.
    pub fn register<R: Reclaim + 'static>(self: &Arc<Self>, conn: &Arc<R>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let weak: Weak<dyn Reclaim> = Arc::downgrade(conn) as Weak<dyn Reclaim>;
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, weak);
        }
        Registered { budget: self.clone(), id }
    }

    /// Every slot is taken: asks up to [`RECLAIM_BATCH`] of the connections that serve nobody to
    /// close, stalled ones first, then the longest idle. Returns how many were asked.
    pub fn reclaim(&self) -> usize {
        let Ok(open) = self.open.lock() else { return 0 };
        let mut victims: Vec<_> =
            open.values().filter_map(Weak::upgrade).filter_map(|c| Some((c.reclaim_rank()?, c))).collect();
        drop(open);
        victims.sort_by_key(|(rank, _)| *rank);
        victims.truncate(RECLAIM_BATCH);
        for (_, conn) in &victims {
            conn.reclaim();
        }
        victims.len()
    }
}

/// The key a client address is counted under: IPv4 (also mapped into IPv6) as it is, IPv6 by
/// its /64, since one host or one customer site commonly holds a whole /64.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
        v4 => v4,
    }
}

/// One connection counted against its client address until dropped.
pub struct AddressSlot {
    budget: Arc<Budget>,
    key: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.budget.per_address.lock() {
            if let Some(count) = counts.get_mut(&self.key) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&self.key);
                }
            }
        }
    }
}

/// A connection listed for reclaiming until dropped.
pub struct Registered {
    budget: Arc<Budget>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut open) = self.budget.open.lock() {
            open.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_its_cap_and_gets_its_slots_back() {
        let budget = Arc::new(Budget::new(100));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let slots: Vec<_> = (0..3).map(|_| budget.admit(ip, 3).expect("under the cap")).collect();
        assert!(budget.admit(ip, 3).is_none(), "a fourth is refused");
        assert!(budget.admit("192.0.2.8".parse().unwrap(), 3).is_some(), "another address is not");
        drop(slots);
        assert!(budget.admit(ip, 3).is_some(), "slots come back as connections close");
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_unfinished_for_a_second_is_reclaimed_first_of_all_but_stalled_answers() {
        let budget = Arc::new(Budget::new(2));
        let slow = Handshaking::new();
        let _listed = budget.register(&slow);
        assert_eq!(budget.reclaim(), 0, "a handshake under way is left alone");
        tokio::time::sleep(STALLED).await;
        let waiting = tokio::spawn({
            let slow = slow.clone();
            async move { slow.reclaimed().await }
        });
        assert_eq!(budget.reclaim(), 1);
        waiting.await.expect("the handshake is told to go");
        assert_eq!(slow.reclaim_rank().map(|(class, _)| class), Some(1));
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let budget = Arc::new(Budget::new(100));
        let _a = budget.admit("2001:db8:1:2::1".parse().unwrap(), 1).expect("first");
        assert!(budget.admit("2001:db8:1:2:ffff::9".parse().unwrap(), 1).is_none(), "same /64");
        assert!(budget.admit("2001:db8:1:3::1".parse().unwrap(), 1).is_some(), "another /64");
        let _b = budget.admit("198.51.100.1".parse().unwrap(), 1).expect("ipv4");
        assert!(budget.admit("::ffff:198.51.100.1".parse().unwrap(), 1).is_none(), "the same client, mapped");
    }
}
