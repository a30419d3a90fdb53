//! The connection budget: how many connections the relay holds at once (`max_connections`),
//! how many of them one client address may hold (`max_connections_per_ip`), and which ones go
//! first when every slot is taken.
//!
//! A flood from one address meets the per-address cap: its connections beyond the cap are
//! closed as soon as they are accepted (behind a load balancer that sends the PROXY protocol,
//! the address it names counts). A flood from many addresses meets the global cap: then, like
//! nginx reusing its keep-alive connections, the relay closes the connections that cost others
//! the most and serve nobody, in this order: answers stalled on a client that does not read,
//! headers begun and never finished, then the longest idle keep-alive connections, up to
//! [`RECLAIM_BATCH`] at a time. A connection that is answering a request is never chosen.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Semaphore;

use super::deadline::Watch;

/// How many connections one shortage of slots closes at most.
pub const RECLAIM_BATCH: usize = 32;

/// The relay's connection budget (one per process, resized on reload).
pub struct Budget {
    /// Connection slots: `limits.max_connections`.
    pub permits: Arc<Semaphore>,
    size: Mutex<usize>,
    /// Open connections by client address (an IPv6 client by its /64).
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// Connections past their handshake, for [`Budget::reclaim`].
    open: Mutex<HashMap<u64, Weak<Watch>>>,
    next_id: AtomicU64,
    /// Whether a refusal was already logged as a warning (the first one is; later ones at
    /// debug level).
    refused: AtomicBool,
}

impl Budget {
    pub fn new(size: usize) -> Budget {
        Budget {
            permits: Arc::new(Semaphore::new(size)),
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
    pub fn register(self: &Arc<Self>, watch: &Arc<Watch>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, Arc::downgrade(watch));
        }
        Registered { budget: self.clone(), id }
    }

    /// Every slot is taken: asks up to [`RECLAIM_BATCH`] of the connections that serve nobody to
    /// close, stalled ones first, then the longest idle. Returns how many were asked.
    pub fn reclaim(&self) -> usize {
        let Ok(open) = self.open.lock() else { return 0 };
        let mut victims: Vec<_> =
            open.values().filter_map(Weak::upgrade).filter_map(|w| Some((w.reclaim_rank()?, w))).collect();
        drop(open);
        victims.sort_by_key(|(rank, _)| *rank);
        victims.truncate(RECLAIM_BATCH);
        for (_, watch) in &victims {
            watch.reclaim();
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
