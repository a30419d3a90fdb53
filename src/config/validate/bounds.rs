//! The valid range of every duration key outside `[limits]`: health checks, site timeouts,
//! certificate polling, ACME retries and renewal. A value outside its range is refused where
//! the file is read, so no sum or product of a configured wait can overflow a clock anywhere
//! in the relay (a deadline a million years away panics `Instant + Duration`).

use std::time::Duration;

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);
/// A year as durations are written in the file ("1y" is 365.25 days), so the range reads
/// back as "1year".
const YEAR: Duration = Duration::from_secs(31_557_600);

/// The inclusive range of one duration key; `off` is a zero that means "turned off" and is
/// allowed outside the range.
#[derive(Clone, Copy)]
pub(super) struct Wait {
    pub min: Duration,
    pub max: Duration,
    pub off: bool,
}

impl Wait {
    /// Any wait from `min` up to `max`.
    pub const fn between(min: Duration, max: Duration) -> Wait {
        Wait { min, max, off: false }
    }

    /// A timer: fires no more often than every 10 ms (a shorter period is a busy loop), at
    /// most once a day.
    pub const TIMER: Wait = Wait::between(Duration::from_millis(10), DAY);
    /// A timeout: at least 100 ms (shorter cuts off any peer on a real network, or one
    /// scheduled a little late), at most a day.
    pub const TIMEOUT: Wait = Wait::between(Duration::from_millis(100), DAY);
    /// A margin or threshold compared with ages: zero allowed, at most a day.
    pub const WINDOW: Wait = Wait::between(Duration::ZERO, DAY);
    /// A margin compared with certificate lifetimes: zero to a year.
    pub const CERT_MARGIN: Wait = Wait::between(Duration::ZERO, YEAR);
    /// `renew_when_left`: one second to ten years (longer than any certificate's lifetime,
    /// which means "renew at once", a rehearsal).
    pub const RENEW_LEFT: Wait = Wait::between(Duration::from_secs(1), YEAR.saturating_mul(10));
}

impl Validator<'_> {
    /// Refuses `d` at `key` when it is outside `range`; true when it is inside.
    pub(super) fn wait(&mut self, key: &[Seg], d: Duration, range: Wait) -> bool {
        if (range.off && d.is_zero()) || (range.min..=range.max).contains(&d) {
            return true;
        }
        let show = |d: Duration| humantime::format_duration(d).to_string();
        let off = if range.off { " (or \"0s\" to turn it off)" } else { "" };
        self.error(key, format!("`{}` is out of range: use {} to {}{off}", show(d), show(range.min), show(range.max)));
        false
    }
}
