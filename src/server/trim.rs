//! Gives memory back to the system after a burst of connections, as HAProxy does when it
//! releases its pools. glibc keeps freed heap pages resident when the heap cannot shrink from
//! the top (it rarely can: a few live allocations pin it), so without this a relay that once
//! held a thousand connections would keep their peak RSS for good, and each later burst would
//! add its own fragmentation on top.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the open-connection count is looked at.
const EVERY: Duration = Duration::from_secs(2);

/// A trim is worth it once at least this many connections have gone since the last one (each
/// held tens of KiB); smaller changes are churn, not a burst that ended.
const BURST: usize = 64;

/// Trims the heap whenever the open connections (`tracker`) have fallen by a burst's worth
/// since the last trim; returns when `stop` fires. A trim holds this thread for a few ms with a
/// heap of tens of MiB (3 ms after 1000 connections here), and only runs once a burst is over.
pub(super) async fn after_bursts(tracker: TaskTracker, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut high = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let open = tracker.len();
        if burst_ended(&mut high, open) {
            release();
        }
    }
}

/// Tracks the high-water mark of open connections and says when a burst has ended.
fn burst_ended(high: &mut usize, open: usize) -> bool {
    *high = (*high).max(open);
    if *high - open >= BURST {
        *high = open;
        return true;
    }
    false
}

/// Returns free heap pages to the system (glibc; other C libraries need nothing here).
#[allow(unsafe_code)]
fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::time::Instant::now();
        // SAFETY: malloc_trim only walks the allocator's own free lists under its own locks.
        let released = unsafe { libc::malloc_trim(0) } == 1;
        tracing::debug!(released, took = ?started.elapsed(), "returned free heap memory after a burst");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_follows_a_burst_that_ended_not_churn() {
        let mut high = 0;
        assert!(!burst_ended(&mut high, 1000), "a burst in progress");
        assert!(!burst_ended(&mut high, 990), "churn");
        assert!(burst_ended(&mut high, 10), "the burst is over");
        assert!(!burst_ended(&mut high, 0), "nothing new since the last trim");
        assert!(!burst_ended(&mut high, 64));
        assert!(burst_ended(&mut high, 0));
    }
}
