//! The two per-request metrics, kept in plain atomics so that counting a request costs a few
//! relaxed `fetch_add`s: no lock, no hashing, no allocation. prometheus-client's `Family` takes a
//! lock and hashes the labels on every `get_or_create`, and its `Histogram` takes a lock on every
//! observation; both are fine at scrape time but not on a path benchmarked in microseconds. These
//! types implement the crate's `EncodeMetric`, so the crate still writes every byte of the
//! exposition text.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::response::RouteName;

/// Every route, in the order of [`route_index`].
pub const ROUTES: [RouteName; 9] = [
    RouteName::Callback,
    RouteName::Authorize,
    RouteName::Token,
    RouteName::Healthz,
    RouteName::Readyz,
    RouteName::HttpsRedirect,
    RouteName::AcmeChallenge,
    RouteName::DomainVerification,
    RouteName::None,
];

/// The slot of a route in the per-route arrays. A match, so that a new route fails to compile
/// here until it has a slot.
pub fn route_index(r: RouteName) -> usize {
    match r {
        RouteName::Callback => 0,
        RouteName::Authorize => 1,
        RouteName::Token => 2,
        RouteName::Healthz => 3,
        RouteName::Readyz => 4,
        RouteName::HttpsRedirect => 5,
        RouteName::AcmeChallenge => 6,
        RouteName::DomainVerification => 7,
        RouteName::None => 8,
    }
}

/// The `route` label: the access log's route name, except `none` for requests no route took
/// (the log's `-` reads badly in a query).
pub fn route_label(r: RouteName) -> &'static str {
    match r {
        RouteName::None => "none",
        other => other.as_str(),
    }
}

/// The statuses counted without a lock: what the routes answer themselves plus what upstreams
/// commonly answer. Any other status is counted through a labelled family.
pub const STATUSES: [u16; 24] = [
    200, 201, 204, 301, 302, 303, 307, 308, 400, 401, 403, 404, 405, 408, 413, 414, 415, 421, 429, 431, 500, 502, 503,
    504,
];

const NO_SLOT: u8 = u8::MAX;

/// `SLOT_OF[status]`: the index of `status` in [`STATUSES`], or [`NO_SLOT`].
const SLOT_OF: [u8; 600] = {
    let mut table = [NO_SLOT; 600];
    let mut i = 0;
    while i < STATUSES.len() {
        table[STATUSES[i] as usize] = i as u8;
        i += 1;
    }
    table
};

fn status_slot(status: u16) -> Option<usize> {
    match SLOT_OF.get(status as usize) {
        Some(&s) if s != NO_SLOT => Some(s as usize),
        _ => None,
    }
}

/// The labels of one request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: &'static str,
    pub status: u16,
}

/// Requests by route and status: an atomic per (route, common status), a family for the rest.
/// Counters still at zero are not exported, like a family's unseen label sets.
#[derive(Clone, Debug)]
pub struct RequestCounts(Arc<RequestCountsInner>);

#[derive(Debug)]
struct RequestCountsInner {
    fast: [[AtomicU64; STATUSES.len()]; ROUTES.len()],
    other: Family<RouteStatus, Counter>,
}

impl RequestCounts {
    pub fn new() -> RequestCounts {
        let fast = std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0)));
        RequestCounts(Arc::new(RequestCountsInner { fast, other: Family::default() }))
    }

    /// Counts one request; lock-free for the statuses in [`STATUSES`].
    #[inline]
    pub fn inc(&self, route: RouteName, status: u16) {
        match status_slot(status) {
            Some(s) => {
                self.0.fast[route_index(route)][s].fetch_add(1, Relaxed);
            }
            None => {
                self.0.other.get_or_create(&RouteStatus { route: route_label(route), status }).inc();
            }
        }
    }
}

impl EncodeMetric for RequestCounts {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        for (r, route) in ROUTES.iter().enumerate() {
            for (s, status) in STATUSES.iter().enumerate() {
                let v = self.0.fast[r][s].load(Relaxed);
                if v > 0 {
                    let labels = RouteStatus { route: route_label(*route), status: *status };
                    encoder.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
        }
        self.0.other.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Latency bucket upper bounds in nanoseconds: 100 µs to 30 s. The relay answers a redirect in
/// tens of microseconds, an upstream in milliseconds to seconds; the response timeout defaults
/// to 30 s.
const BOUNDS_NS: [u64; 17] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
];

/// A histogram of durations in atomics: one counter per bucket (the last one above every bound)
/// and the sum in nanoseconds. The count is the sum of the buckets, so the `+Inf` bucket and
/// `_count` always agree.
#[derive(Debug)]
struct AtomicHistogram {
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    fn new() -> AtomicHistogram {
        AtomicHistogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_ns: AtomicU64::new(0) }
    }

    #[inline]
    fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.iter().position(|b| ns <= *b).unwrap_or(BOUNDS_NS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// `(sum in seconds, count, finite buckets as (upper bound, count in that bucket alone))`.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let count = counts.iter().sum();
        let buckets = BOUNDS_NS.iter().zip(&counts).map(|(b, c)| (*b as f64 / 1e9, *c)).collect();
        (self.sum_ns.load(Relaxed) as f64 / 1e9, count, buckets)
    }
}

/// One duration histogram per route, exported with a `route` label; routes with no observation
/// are left out.
#[derive(Clone, Debug)]
pub struct RouteHistograms(Arc<[AtomicHistogram; ROUTES.len()]>);

impl RouteHistograms {
    pub fn new() -> RouteHistograms {
        RouteHistograms(Arc::new(std::array::from_fn(|_| AtomicHistogram::new())))
    }

    #[inline]
    pub fn observe(&self, route: RouteName, d: Duration) {
        self.0[route_index(route)].observe(d);
    }
}

impl EncodeMetric for RouteHistograms {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        for (route, h) in ROUTES.iter().zip(self.0.iter()) {
            let (sum, count, buckets) = h.snapshot();
            if count > 0 {
                let labels = [("route", route_label(*route))];
                encoder.encode_family(&labels)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_common_status_has_its_own_slot() {
        for (i, s) in STATUSES.iter().enumerate() {
            assert_eq!(status_slot(*s), Some(i));
        }
        assert_eq!(status_slot(418), None);
        assert_eq!(status_slot(999), None);
        for (i, r) in ROUTES.iter().enumerate() {
            assert_eq!(route_index(*r), i);
        }
    }

    #[test]
    fn a_duration_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let h = AtomicHistogram::new();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert_eq!(buckets[0], (0.0001, 1));
        assert_eq!(buckets[1], (0.00025, 1));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 2, "60 s is only in +Inf");
        assert!((sum - 60.000201).abs() < 1e-9, "{sum}");
    }
}
