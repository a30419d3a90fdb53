//! When to renew and when to retry: pure functions of the certificate's dates, the CA's
//! renewal information (ARI, RFC 9773), and a random draw, so tests pin every choice.
//!
//! - With ARI, renew at a uniformly random time inside the CA's suggested window (at once when
//!   that time has passed).
//! - Without ARI, renew once a third of the lifetime is left (90-day certificates at 30 days,
//!   6-day certificates at 2 days), at a random point of a short window after that mark so
//!   many relays do not all call the CA at the same second.
//! - After a failure, retry with exponential backoff and jitter: `min` doubling to `max`.

use std::time::{Duration, SystemTime};

/// The share of the lifetime the randomised window after the one-third mark spans.
const WINDOW_SHARE: u32 = 30;

/// Where a renewal time came from (shown by `cert status` and the logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    Ari,
    OneThird,
    Override,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Ari => "ACME renewal information",
            Basis::OneThird => "one third of the lifetime left",
            Basis::Override => "renew_when_left",
        }
    }
}

/// The default renewal window: from the moment a third of the lifetime is left, for a
/// thirtieth of the lifetime.
pub fn one_third_window(not_before: SystemTime, not_after: SystemTime) -> (SystemTime, SystemTime) {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let start = not_after - lifetime / 3;
    (start, start + lifetime / WINDOW_SHARE)
}

/// A point of `[start, end]` chosen by `unit` (0.0 ..= 1.0).
pub fn pick_in_window(start: SystemTime, end: SystemTime, unit: f64) -> SystemTime {
    let span = end.duration_since(start).unwrap_or_default();
    start + span.mul_f64(unit.clamp(0.0, 1.0))
}

/// The renewal time for a new certificate when the CA offers no ARI.
pub fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_when_left: Option<Duration>,
    unit: f64,
) -> (SystemTime, Basis) {
    match renew_when_left {
        Some(left) => (not_after.checked_sub(left).unwrap_or(not_before).max(not_before), Basis::Override),
        None => {
            let (start, end) = one_third_window(not_before, not_after);
            (pick_in_window(start, end, unit), Basis::OneThird)
        }
    }
}

/// The renewal time inside an ARI suggested window; `now` when the chosen point has passed
/// (RFC 9773 section 4.2: renew immediately).
pub fn ari_renew_at(start: SystemTime, end: SystemTime, now: SystemTime, unit: f64) -> SystemTime {
    pick_in_window(start, end.max(start), unit).max(now)
}

/// How long to honour an ARI `Retry-After` before asking again: at least a minute (a CA
/// cannot make us poll hot), at most a day (RFC 9773 suggests re-checking daily).
pub fn ari_recheck(retry_after: Duration) -> Duration {
    retry_after.clamp(Duration::from_secs(60), Duration::from_secs(24 * 3600))
}

/// The delay before retry number `failures` (1 = after the first failure): `min * 2^(n-1)`
/// capped at `max`, then jittered down to between half and all of it.
pub fn backoff(failures: u32, min: Duration, max: Duration, unit: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    let full = min.saturating_mul(1u32 << exp.min(31)).min(max);
    let half = full / 2;
    half + half.mul_f64(unit.clamp(0.0, 1.0))
}

/// How far a new certificate's `notBefore` may lie behind this machine's clock: CAs backdate it
/// (Let's Encrypt by an hour, some to the start of the day).
pub const CLOCK_AHEAD_TOLERANCE: Duration = Duration::from_secs(25 * 3600);
/// How far a new certificate's `notBefore` may lie ahead of this machine's clock.
pub const CLOCK_BEHIND_TOLERANCE: Duration = Duration::from_secs(300);

/// A warning when a certificate issued just now starts far from `now`: this machine's clock
/// and the CA's disagree, and renewal times (computed from the certificate's dates on this
/// clock) will be off by as much.
pub fn clock_warning(not_before: SystemTime, now: SystemTime) -> Option<String> {
    let at = |t: SystemTime| humantime::format_rfc3339_seconds(t);
    let human = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs()));
    if let Ok(ahead) = now.duration_since(not_before)
        && ahead > CLOCK_AHEAD_TOLERANCE
    {
        return Some(format!(
            "clock: this machine's clock ({}) is about {} ahead of the CA's (a certificate issued now starts at {}); fix the clock (NTP)",
            at(now),
            human(ahead),
            at(not_before)
        ));
    }
    if let Ok(behind) = not_before.duration_since(now)
        && behind > CLOCK_BEHIND_TOLERANCE
    {
        return Some(format!(
            "clock: this machine's clock ({}) is about {} behind the CA's (a certificate issued now starts only at {}; clients with a right clock accept it, this relay calls it not valid yet); fix the clock (NTP)",
            at(now),
            human(behind),
            at(not_before)
        ));
    }
    None
}

/// A uniform draw in `[0, 1)` from the crypto provider's random source.
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if crate::crypto::provider().secure_random.fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn without_ari_a_90_day_certificate_renews_with_30_days_left() {
        let nb = t(1_000_000);
        let na = nb + 90 * DAY;
        let (at, basis) = renew_at(nb, na, None, 0.0);
        assert_eq!(basis, Basis::OneThird);
        assert_eq!(at, na - 30 * DAY);
        // The window spans 3 days; the draw moves inside it, never past it.
        assert_eq!(renew_at(nb, na, None, 1.0).0, na - 27 * DAY);
        assert_eq!(renew_at(nb, na, None, 0.5).0, na - 30 * DAY + DAY + DAY / 2);
    }

    #[test]
    fn short_lived_certificates_keep_the_same_share() {
        let nb = t(0);
        let na = nb + 6 * DAY;
        assert_eq!(renew_at(nb, na, None, 0.0).0, na - 2 * DAY);
    }

    #[test]
    fn the_override_counts_back_from_not_after_and_never_before_not_before() {
        let nb = t(0);
        let na = nb + 90 * DAY;
        assert_eq!(renew_at(nb, na, Some(10 * DAY), 0.3), (na - 10 * DAY, Basis::Override));
        assert_eq!(renew_at(nb, na, Some(1000 * DAY), 0.3).0, nb);
    }

    #[test]
    fn ari_picks_inside_the_window_and_renews_at_once_when_it_has_passed() {
        let now = t(10_000);
        assert_eq!(ari_renew_at(t(20_000), t(30_000), now, 0.25), t(22_500));
        assert_eq!(ari_renew_at(t(20_000), t(30_000), now, 1.0), t(30_000));
        assert_eq!(ari_renew_at(t(1_000), t(2_000), now, 0.5), now);
        // A window whose end is before its start collapses to its start.
        assert_eq!(ari_renew_at(t(20_000), t(15_000), now, 0.9), t(20_000));
        assert_eq!(ari_recheck(Duration::from_secs(5)), Duration::from_secs(60));
        assert_eq!(ari_recheck(Duration::from_secs(6 * 3600)), Duration::from_secs(6 * 3600));
        assert_eq!(ari_recheck(Duration::from_secs(90 * 86400)), DAY);
    }

    #[test]
    fn backoff_doubles_from_one_minute_to_six_hours_with_jitter() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(6 * 3600));
        assert_eq!(backoff(1, min, max, 1.0), Duration::from_secs(60));
        assert_eq!(backoff(1, min, max, 0.0), Duration::from_secs(30));
        assert_eq!(backoff(2, min, max, 1.0), Duration::from_secs(120));
        assert_eq!(backoff(5, min, max, 1.0), Duration::from_secs(960));
        assert_eq!(backoff(9, min, max, 1.0), Duration::from_secs(15360));
        assert_eq!(backoff(10, min, max, 1.0), max);
        assert_eq!(backoff(200, min, max, 0.0), max / 2);
        let d = backoff(3, min, max, random_unit());
        assert!(d >= Duration::from_secs(120) && d <= Duration::from_secs(240), "{d:?}");
    }

    #[test]
    fn a_certificate_starting_far_from_this_clock_is_a_clock_warning() {
        let now = t(100 * 86400);
        assert_eq!(clock_warning(now - Duration::from_secs(3600), now), None, "backdated an hour");
        assert_eq!(clock_warning(now - 24 * 3600 * Duration::from_secs(1), now), None, "to the start of the day");
        assert_eq!(clock_warning(now + Duration::from_secs(60), now), None, "a minute of drift");
        let ahead = clock_warning(now - 2 * DAY, now).unwrap();
        assert!(
            ahead.starts_with("clock: this machine's clock (1970-04-11T00:00:00Z) is about 2days ahead of the CA's"),
            "{ahead}"
        );
        let behind = clock_warning(now + Duration::from_secs(3600), now).unwrap();
        assert!(behind.contains("is about 1h behind the CA's"), "{behind}");
    }

    #[test]
    fn random_units_are_in_range_and_vary() {
        let draws: Vec<f64> = (0..64).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(draws.iter().any(|u| *u != draws[0]));
    }
}
