//! systemd's service notifications (sd_notify), so a `Type=notify` / `Type=notify-reload` unit
//! knows when the relay really serves, when it reloads, when it stops, and that it is alive.
//!
//! - `READY=1` once the listeners are bound and the certificates loaded (when [`crate::run`]
//!   starts serving): `systemctl start` returns then, and units ordered after it start.
//! - `RELOADING=1` with `MONOTONIC_USEC` when a reload starts, `READY=1` when it is over,
//!   whatever its outcome (systemd's notify-reload protocol; `STATUS=` says how it went).
//! - `STOPPING=1` when the drain starts.
//! - `WATCHDOG=1` every half `WATCHDOG_USEC` when the unit sets `WatchdogSec=`; the pings come
//!   from a task on the same runtime as the connections, so a wedged runtime stops them.
//!
//! Everything is a no-op without `NOTIFY_SOCKET` (not started by systemd, tests in-process).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Serving: listeners bound, certificates loaded.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts; [`ready`] must follow when it is over.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status("reloading the configuration")]),
        // systemd drops a RELOADING=1 without MONOTONIC_USEC; say it anyway for older ones.
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The drain starts.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping: draining connections")]);
}

/// Pings the watchdog every half `WATCHDOG_USEC` until `stop`, when systemd asked for it.
pub fn spawn_watchdog(stop: &CancellationToken) {
    let Some(timeout) = sd_notify::watchdog_enabled() else { return };
    let every = (timeout / 2).max(Duration::from_millis(1));
    tracing::info!(every = ?every, "systemd watchdog on");
    let stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => send(&[NotifyState::Watchdog]),
            }
        }
    });
}
