//! The life of one hostname's certificate: serve what the store has, renew when due, retry
//! with backoff on failure, pick up what another replica renewed.
//!
//! The store is the truth shared by replicas: every wake-up re-reads it (every `poll_interval`
//! at least), the order runs under the hostname's `order.lock`, and the backoff state lives in
//! `status.json` so replicas back off together.

use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::{Duration, SystemTime};

use instant_acme::CertificateIdentifier;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::challenge::Challenges;
use super::client::AccountCell;
use super::lock;
use super::renew::{self, Basis};
use super::store::{AcmeStore, CertMeta, HostStatus, PendingOrder, StoredCert};
use super::{AcmeError, order};
use crate::config::AcmeSettings;
use crate::tls::{LoadedCert, Slot};

/// The longest one issuance may take, from order to download.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(300);
/// `order.lock` expiry. The holder renews it every third of this while it works, so only the
/// lock of a relay that died or hung (on another machine: one on this machine is seen dead at
/// once) waits this long to be taken over.
const ORDER_LOCK_TTL: Duration = Duration::from_secs(90);
/// How long to wait before asking the CA for renewal information again after it failed.
const ARI_RETRY: Duration = Duration::from_secs(3600);
/// How long a directory without ARI is believed: then its directory is read again (a CA may
/// turn ARI on; an upgraded Pebble or step-ca does).
const ARI_UNSUPPORTED_RECHECK: Duration = Duration::from_secs(24 * 3600);
/// The longest `Retry-After` of a `rateLimited` answer that is honoured as given.
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the CA's renewal information says about the stored certificate.
struct Ari {
    serial: String,
    at: Option<SystemTime>,
    recheck: SystemTime,
}

/// What an attempt did.
pub enum Attempt {
    /// A new certificate was issued and stored.
    Issued(StoredCert),
    /// Under the lock, the store already held a certificate that is not due (another replica
    /// renewed it).
    Loaded(StoredCert),
    /// Another replica holds the order lock.
    Busy { owner: String },
}

/// One hostname of one ACME site.
pub struct HostTask {
    pub host: String,
    pub settings: Arc<AcmeSettings>,
    pub store: Arc<AcmeStore>,
    pub account: Arc<AccountCell>,
    pub challenges: Arc<Challenges>,
    /// The slot to serve from; `None` for `cert renew`, which only writes the store. Swapped
    /// for the new configuration's slot when a reload keeps this task running.
    pub slot: Option<Arc<ArcSwap<Slot>>>,
    pub owner: String,
    installed: Option<String>,
    last_store_error: Option<String>,
    ari: Option<Ari>,
    /// The CA offered no ARI when last asked; asked again after this time.
    ari_unsupported: Option<SystemTime>,
    ari_unit: f64,
    hold_until: Option<SystemTime>,
    /// New certificates in a row that were due at once (a clock far ahead): drives their backoff.
    early: u32,
    /// Wakes when the shared store brought changes into the folder (`None`: no shared store).
    changes: Option<watch::Receiver<u64>>,
    /// The files the last stored certificate replaced, for the shared store to remove too.
    replaced: Vec<String>,
}

impl HostTask {
    pub fn new(
        host: String,
        settings: Arc<AcmeSettings>,
        store: Arc<AcmeStore>,
        account: Arc<AccountCell>,
        challenges: Arc<Challenges>,
        slot: Option<Arc<ArcSwap<Slot>>>,
        owner: String,
    ) -> HostTask {
        HostTask {
            host,
            settings,
            account,
            challenges,
            slot,
            owner,
            installed: None,
            last_store_error: None,
            ari: None,
            ari_unsupported: None,
            ari_unit: renew::random_unit(),
            hold_until: None,
            early: 0,
            changes: store.shared().map(|s| s.subscribe()),
            replaced: Vec::new(),
            store,
        }
    }

    /// Reads the store and serves its certificate when it is new to this task.
    pub fn load_stored(&mut self) -> Option<StoredCert> {
        match self.store.load_cert(&self.host) {
            Ok(Some(c)) => {
                self.last_store_error = None;
                self.install(&c, "certificate loaded from the store");
                Some(c)
            }
            Ok(None) => None,
            Err(e) => {
                let msg = e.to_string();
                if self.last_store_error.as_deref() != Some(&msg) {
                    tracing::warn!(hostname = %self.host, error = %msg, "stored certificate unreadable; a new one will be ordered");
                    self.last_store_error = Some(msg);
                }
                None
            }
        }
    }

    fn install(&mut self, c: &StoredCert, what: &str) {
        if self.installed.as_deref() == Some(&c.meta.serial) {
            return;
        }
        if let Some(slot) = &self.slot {
            slot.load().install(c.cert.clone());
        }
        self.installed = Some(c.meta.serial.clone());
        tracing::info!(
            hostname = %self.host,
            serial = %c.meta.serial,
            not_after = %humantime::format_rfc3339_seconds(c.meta.not_after),
            "{what}"
        );
    }

    fn waiting(&self, why: String) {
        if let Some(slot) = &self.slot {
            if self.installed.is_none() {
                slot.load().set_waiting(why);
            }
        }
    }

    /// When the stored certificate is due for renewal (`now` when there is none).
    fn due_at(&self, stored: Option<&StoredCert>, now: SystemTime) -> SystemTime {
        let Some(c) = stored else { return now };
        let m = &c.meta;
        if let Some(left) = self.settings.renew_when_left {
            return renew::renew_at(m.not_before, m.not_after, Some(left), 0.0).0;
        }
        match &self.ari {
            Some(Ari { serial, at: Some(at), .. }) if *serial == m.serial => *at,
            _ => m.renew_at,
        }
    }

    /// Asks the CA for renewal information (RFC 9773) when it is time to, and the CA offers it.
    async fn refresh_ari(&mut self, c: &StoredCert, now: SystemTime) {
        if self.settings.renew_when_left.is_some() {
            return;
        }
        match self.ari_unsupported {
            Some(until) if now < until => return,
            Some(_) => {
                // Read the directory again: the CA may offer ARI now.
                self.ari_unsupported = None;
                self.account.reload().await;
            }
            None => {}
        }
        if self.ari.as_ref().is_some_and(|a| a.serial == c.meta.serial && now < a.recheck) {
            return;
        }
        let serial = c.meta.serial.clone();
        let keep = self.ari.as_ref().filter(|a| a.serial == serial).and_then(|a| a.at);
        let account = match self.account.get().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(hostname = %self.host, error = %e, "no renewal information: account unavailable");
                self.ari = Some(Ari { serial, at: keep, recheck: now + ARI_RETRY });
                return;
            }
        };
        let der = CertificateDer::from(c.leaf_der.clone());
        let Ok(id) = CertificateIdentifier::try_from(&der) else {
            self.ari_unsupported = Some(now + ARI_UNSUPPORTED_RECHECK);
            return;
        };
        match account.renewal_info(&id).await {
            Ok((info, retry_after)) => {
                let w = info.suggested_window;
                let (start, end) = (SystemTime::from(w.start), SystemTime::from(w.end));
                let at = renew::ari_renew_at(start, end, now, self.ari_unit);
                tracing::info!(
                    hostname = %self.host,
                    window_start = %humantime::format_rfc3339_seconds(start),
                    window_end = %humantime::format_rfc3339_seconds(end),
                    renew_at = %humantime::format_rfc3339_seconds(at),
                    explanation = info.explanation_url.as_deref().unwrap_or("-"),
                    "ACME renewal information"
                );
                self.ari = Some(Ari { serial, at: Some(at), recheck: now + renew::ari_recheck(retry_after) });
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                tracing::debug!(hostname = %self.host, "the directory offers no renewal information; renewing at one third");
                self.ari_unsupported = Some(now + ARI_UNSUPPORTED_RECHECK);
            }
            Err(e) => {
                tracing::warn!(hostname = %self.host, error = %e, "renewal information unavailable; keeping the current schedule");
                self.ari = Some(Ari { serial, at: keep, recheck: now + ARI_RETRY });
            }
        }
    }

    /// Serves and renews until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let now = SystemTime::now();
            let stored = self.load_stored();
            if let Some(c) = &stored {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.refresh_ari(c, now) => {}
                }
            }
            let status = self.store.load_status(&self.host);
            let due = self.due_at(stored.as_ref(), now);
            let attempt_at =
                [Some(due), status.next_attempt, self.hold_until].into_iter().flatten().max().unwrap_or(now);
            let mut pause = self.settings.poll_interval;
            if attempt_at <= now {
                if stored.is_none() {
                    self.waiting(format!("ordering its first certificate from {}", self.settings.directory));
                }
                let outcome = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = self.attempt(false) => r,
                };
                match outcome {
                    Ok(Attempt::Issued(c)) => {
                        self.after_issue(&c).await;
                        pause = Duration::ZERO;
                    }
                    Ok(Attempt::Loaded(_)) => pause = Duration::ZERO,
                    Ok(Attempt::Busy { owner }) => {
                        self.waiting(format!("another relay ({owner}) is ordering its certificate"));
                    }
                    Err((e, next)) => {
                        self.waiting(format!(
                            "no certificate yet: {e} (next attempt at {})",
                            humantime::format_rfc3339_seconds(next)
                        ));
                        // Also in memory, in case status.json could not be written.
                        self.hold_until = Some(next);
                        pause = Duration::ZERO;
                    }
                }
            } else {
                pause = pause.min(attempt_at.duration_since(now).unwrap_or_default());
            }
            if pause.is_zero() {
                continue;
            }
            let changes = async {
                let changed = match self.changes.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => false,
                };
                if !changed {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                // Another replica renewed (or failed): look at the store again now.
                () = changes => {}
            }
        }
    }

    /// Checks a new certificate's dates against this machine's clock, and holds off when it is
    /// due at once: a clock far ahead of the CA's makes every new certificate look old, and the
    /// wait before the next one grows (as after failures) instead of ordering one every
    /// `retry_min`.
    async fn after_issue(&mut self, c: &StoredCert) {
        let now = SystemTime::now();
        let m = &c.meta;
        let mut warning = renew::clock_warning(m.not_before, now);
        if self.due_at(Some(c), now) <= now {
            self.early = self.early.saturating_add(1);
            let wait =
                renew::backoff(self.early, self.settings.retry_min, self.settings.retry_max, renew::random_unit());
            let until = now + wait;
            let next = humantime::format_rfc3339_seconds(until);
            let lifetime = m.not_after.duration_since(m.not_before).unwrap_or_default();
            if self.settings.renew_when_left.is_some_and(|left| left >= lifetime) {
                tracing::warn!(hostname = %self.host, %next, "the new certificate is due at once: renew_when_left is at least its lifetime; renewing again no sooner than {next}");
            } else {
                warning.get_or_insert_with(|| {
                    format!(
                        "clock: {} certificate issued now is already due for renewal by this machine's clock ({}); \
                         is the clock far ahead? (the certificate starts at {})",
                        self.host,
                        humantime::format_rfc3339_seconds(now),
                        humantime::format_rfc3339_seconds(m.not_before)
                    )
                });
            }
            self.hold_until = Some(until);
        } else {
            self.early = 0;
            self.hold_until = None;
        }
        if let Some(w) = &warning {
            match self.hold_until {
                Some(until) => {
                    tracing::warn!(hostname = %self.host, early_renewals = self.early, "{w}; renewing again no sooner than {}", humantime::format_rfc3339_seconds(until))
                }
                None => tracing::warn!(hostname = %self.host, "{w}"),
            }
        }
        let mut status = self.store.load_status(&self.host);
        if status.clock_warning != warning {
            status.clock_warning = warning;
            if let Err(e) = self.store.save_status(&self.host, &status) {
                tracing::warn!(hostname = %self.host, error = %e, "cannot record the clock warning");
            }
            self.share_status().await;
        }
    }

    /// Copies the attempt record to the shared store, if there is one (logged on failure: the
    /// folder keeps it, and the next attempt writes it again).
    async fn share_status(&self) {
        if let Err(e) = self.store.share_status(&self.host).await {
            tracing::warn!(hostname = %self.host, error = %e, "cannot copy the attempt record to the shared store");
        }
    }

    /// Forgets the pending order, in the shared store too.
    async fn forget_pending(&self) {
        self.store.clear_pending(&self.host);
        if let Err(e) = self.store.share_pending(&self.host, &self.owner).await {
            tracing::warn!(hostname = %self.host, error = %e, "cannot remove the pending order from the shared store");
        }
    }

    /// One attempt under the hostname's order lock. `force` renews even when not due. A
    /// failure comes with the time of the next attempt.
    pub async fn attempt(&mut self, force: bool) -> Result<Attempt, (AcmeError, SystemTime)> {
        let locks = self.store.locks();
        let name = AcmeStore::order_lock(&self.host);
        let acquired =
            lock::acquire(&locks, &name, &self.owner, "order a certificate", ORDER_LOCK_TTL).await.map_err(|source| {
                AcmeError::Io { path: self.store.order_lock_path(&self.host).display().to_string(), source }
            });
        let guard = match acquired {
            Ok(Ok(g)) => g,
            Ok(Err((owner, _))) => {
                tracing::info!(hostname = %self.host, %owner, "another relay holds the order lock; waiting for its certificate");
                return Ok(Attempt::Busy { owner });
            }
            Err(e) => return Err(self.record_failure(e).await),
        };
        // Under the lock the store is the truth: another replica may have renewed meanwhile.
        if let Err(e) = self.store.sync_host(&self.host).await {
            guard.release().await;
            return Err(self.record_failure(e.into()).await);
        }
        let now = SystemTime::now();
        let stored = self.load_stored();
        if let Some(c) = stored.as_ref().filter(|c| !force && self.due_at(Some(c), now) > now) {
            return Ok(Attempt::Loaded(c.clone()));
        }
        let result = match tokio::time::timeout(ISSUE_TIMEOUT, self.issue(stored.as_ref())).await {
            Ok(r) => r,
            Err(_) => Err(AcmeError::Timeout(ISSUE_TIMEOUT)),
        };
        let outcome = match result {
            Ok(c) => {
                if let Err(e) = self.store.save_status(&self.host, &HostStatus::default()) {
                    tracing::warn!(hostname = %self.host, error = %e, "cannot clear the error record");
                }
                let replaced = std::mem::take(&mut self.replaced);
                match self.store.share_cert(&self.host, &self.owner, &c.meta, &replaced).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(hostname = %self.host, "the order lock was lost before the new certificate reached the shared store; the certificate the next holder stored stands");
                        // Serve what the shared store holds, like every other replica.
                        if self.store.sync_host(&self.host).await.is_ok()
                            && let Some(theirs) = self.load_stored()
                        {
                            guard.release().await;
                            return Ok(Attempt::Loaded(theirs));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(hostname = %self.host, error = %e, "the new certificate could not be copied to the shared store; other replicas keep theirs")
                    }
                }
                self.share_status().await;
                self.install(&c, "new certificate in use for new handshakes");
                Ok(Attempt::Issued(c))
            }
            // Another replica is creating the shared account: wait for it, no backoff.
            Err(AcmeError::Busy { owner, .. }) => Ok(Attempt::Busy { owner }),
            Err(e) => Err(self.record_failure(e).await),
        };
        if guard.lost() {
            tracing::warn!(hostname = %self.host, "the order lock was taken over while this relay held it (it stalled past the expiry)");
        }
        guard.release().await;
        outcome
    }

    /// Gets a certificate: from the order an interrupted attempt left pending, else from a new
    /// order. When the CA no longer knows the stored account, registers a new one (once).
    async fn issue(&mut self, stored: Option<&StoredCert>) -> Result<StoredCert, AcmeError> {
        match self.issue_with_account(stored).await {
            Err(AcmeError::Acme { source, step }) if order::is_problem(&source, "accountDoesNotExist") => {
                let lost = self.account.get().await?.id().to_string();
                tracing::warn!(hostname = %self.host, directory = %self.store.directory(), account = %lost, %step, error = %source, "the CA no longer knows the stored ACME account (its database was reset or the account deactivated); registering a new one");
                self.account.replace_lost(&lost).await?;
                self.issue_with_account(stored).await
            }
            r => r,
        }
    }

    async fn issue_with_account(&mut self, stored: Option<&StoredCert>) -> Result<StoredCert, AcmeError> {
        let account = self.account.get().await?;
        if let Some(issued) = self.resume_pending(&account).await? {
            let stored = self.store_issued(issued).await;
            if let Err(AcmeError::Certificate(_)) = &stored {
                // Not usable with the recorded key: resuming again would fail the same way.
                self.forget_pending().await;
            }
            return stored;
        }
        let replaces = match stored {
            Some(c) if self.ari.as_ref().is_some_and(|a| a.at.is_some()) => {
                CertificateIdentifier::try_from(&CertificateDer::from(c.leaf_der.clone())).ok().map(|i| i.into_owned())
            }
            _ => None,
        };
        let (store, host, owner) = (self.store.clone(), self.host.clone(), self.owner.clone());
        let record = async move |url: &str, key_pem: &str| {
            let pending =
                PendingOrder { order_url: url.into(), key_pem: key_pem.into(), finalized_at: SystemTime::now() };
            store.save_pending(&host, &pending)?;
            // Another replica resumes the order if this one is cut off after finalizing.
            if !store.share_pending(&host, &owner).await? {
                tracing::warn!(hostname = %host, "the order lock was lost before the pending order reached the shared store");
            }
            Ok(())
        };
        let issued = order::issue(&account, &self.host, &self.settings, &self.challenges, replaces, record).await?;
        self.store_issued(issued).await
    }

    /// The certificate of the order an interrupted attempt left in `pending.json`, when the CA
    /// still has it; `None` when there is none (or it is gone, which is logged and forgotten).
    async fn resume_pending(&self, account: &instant_acme::Account) -> Result<Option<order::Issued>, AcmeError> {
        let pending = match self.store.load_pending(&self.host) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(hostname = %self.host, error = %e, "the record of an interrupted order is unreadable; ordering afresh");
                self.forget_pending().await;
                return Ok(None);
            }
        };
        tracing::info!(hostname = %self.host, order = %pending.order_url, "resuming the order an interrupted attempt finalized");
        match order::resume(account, &self.host, &pending.order_url, &pending.key_pem).await? {
            order::Resumed::Issued(i) => Ok(Some(i)),
            order::Resumed::Gone(why) => {
                tracing::warn!(hostname = %self.host, order = %pending.order_url, %why, "the interrupted order cannot be resumed; ordering afresh");
                self.forget_pending().await;
                Ok(None)
            }
        }
    }

    /// Stores a certificate just issued (or downloaded for a resumed order) and forgets the
    /// pending order.
    async fn store_issued(&mut self, issued: order::Issued) -> Result<StoredCert, AcmeError> {
        let loaded = LoadedCert::from_pem(&self.host, issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())
            .map_err(AcmeError::Certificate)?;
        let (renew_at, basis) =
            renew::renew_at(loaded.not_before, loaded.not_after, self.settings.renew_when_left, renew::random_unit());
        let serial = loaded.serial.clone();
        let meta = CertMeta {
            hostname: self.host.clone(),
            directory: self.store.directory().to_string(),
            chain_file: format!("chain-{serial}.pem"),
            key_file: format!("key-{serial}.pem"),
            serial,
            issuer: loaded.issuer.clone(),
            not_before: loaded.not_before,
            not_after: loaded.not_after,
            issued_at: SystemTime::now(),
            renew_at,
            order_url: Some(issued.order_url.clone()),
        };
        self.replaced = self.store.save_cert(&self.host, &issued.chain_pem, &issued.key_pem, &meta)?;
        self.forget_pending().await;
        tracing::info!(
            hostname = %self.host,
            order = %issued.order_url,
            serial = %meta.serial,
            not_after = %humantime::format_rfc3339_seconds(meta.not_after),
            renew_at = %humantime::format_rfc3339_seconds(renew_at),
            basis = basis_name(basis),
            path = %self.store.host_dir(&self.host).display(),
            "certificate stored"
        );
        let leaf_der = loaded.key.cert.first().map(|c| c.to_vec()).unwrap_or_default();
        Ok(StoredCert { meta, cert: Arc::new(loaded), leaf_der })
    }

    /// Records a failure in `status.json` (shared backoff) and logs it, with the CA's detail
    /// for a `rateLimited` problem.
    async fn record_failure(&self, e: AcmeError) -> (AcmeError, SystemTime) {
        crate::metrics::global().acme_order_failed(&self.host, e.problem());
        let now = SystemTime::now();
        let mut status = self.store.load_status(&self.host);
        status.failures = status.failures.saturating_add(1);
        let delay =
            renew::backoff(status.failures, self.settings.retry_min, self.settings.retry_max, renew::random_unit());
        let mut next = now + delay;
        // A rate limit says when to come back; sooner would only be refused again.
        let ca_wait = e.rate_limited().and_then(|_| self.account.hints().take_retry_after());
        if let Some(at) = ca_wait {
            next = next.max(at.min(now + MAX_RATE_LIMIT_WAIT));
        }
        status.next_attempt = Some(next);
        status.last_error = Some(e.to_string());
        status.last_error_at = Some(now);
        if let Err(se) = self.store.save_status(&self.host, &status) {
            tracing::warn!(hostname = %self.host, error = %se, "cannot record the failure");
        }
        self.share_status().await;
        let next_text = humantime::format_rfc3339_seconds(next);
        match e.rate_limited() {
            Some(p) => tracing::warn!(
                hostname = %self.host,
                detail = p.detail.as_deref().unwrap_or("-"),
                retry_at = %next_text,
                ca_retry_after = ca_wait.map(|t| humantime::format_rfc3339_seconds(t).to_string()).unwrap_or_else(|| "-".into()),
                failures = status.failures,
                "the CA rate-limited this order; keeping the current certificate"
            ),
            None => tracing::warn!(
                hostname = %self.host,
                error = %e,
                retry_at = %next_text,
                failures = status.failures,
                "certificate order failed; keeping the current certificate"
            ),
        }
        (e, next)
    }
}

fn basis_name(b: Basis) -> &'static str {
    b.as_str()
}
