//! The ACME account and the HTTP client it talks through.
//!
//! The client is hyper-util's pooled client over rustls with `TCP_NODELAY` (without it every
//! ACME request waits about 40 ms on Nagle and delayed ACK) and a deadline per request. It
//! trusts the web PKI roots, or only `directory_ca_file` when one is configured (Pebble, a
//! private step-ca).
//!
//! The account is created once per directory and stored; restarts and other replicas reuse
//! it. Creation runs under `account.lock`, so replicas starting together make one account.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{Account, BodyWrapper, BytesResponse, ExternalAccountKey, HttpClient, NewAccount};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::lock;
use super::store::AcmeStore;
use super::{AcmeError, counters};
use crate::config::AcmeSettings;
use crate::egress::Egress;

/// Longest wait for one ACME HTTP request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest connect to the CA (TCP, and through a proxy its `CONNECT` answer as well).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `account.lock` is held at most (creation is one or two requests).
const ACCOUNT_LOCK_TTL: Duration = Duration::from_secs(120);

/// How long ARI answers without `Retry-After` are trusted (RFC 9773 asks for the header; a CA
/// that leaves it out still gets its window used, re-checked this often).
const ARI_DEFAULT_RETRY_AFTER: &str = "21600";

/// What the CA said about timing that instant-acme 0.8 does not pass on: the `Retry-After` of
/// an error answer (a `rateLimited` problem says when to come back).
#[derive(Debug, Default)]
pub struct CaHints {
    retry_after: Mutex<Option<SystemTime>>,
}

impl CaHints {
    /// The `Retry-After` of the latest error answer, once.
    pub fn take_retry_after(&self) -> Option<SystemTime> {
        self.retry_after.lock().ok()?.take()
    }

    fn saw(&self, rsp: &mut BytesResponse, get: bool) {
        let value = rsp.parts.headers.get(http::header::RETRY_AFTER);
        if !rsp.parts.status.is_success() {
            let at = value.and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
            if let (Some(at), Ok(mut slot)) = (at, self.retry_after.lock()) {
                *slot = Some(at);
            }
        } else if get && value.is_none() {
            // Plain GETs are the directory and ARI; instant-acme drops an ARI answer that lacks
            // the header ("missing Retry-After header"), so give it the default.
            rsp.parts
                .headers
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from_static(ARI_DEFAULT_RETRY_AFTER));
        }
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 section 10.2.3).
fn parse_retry_after(v: &str) -> Option<SystemTime> {
    let v = v.trim();
    match v.parse::<u64>() {
        Ok(secs) => SystemTime::now().checked_add(Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(v).ok(),
    }
}

/// The hyper client instant-acme sends through, with a deadline on every request.
struct TimedClient {
    inner: Box<dyn HttpClient>,
    hints: Arc<CaHints>,
}

impl HttpClient for TimedClient {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let get = req.method() == http::Method::GET;
        let fut = self.inner.request(req);
        let hints = self.hints.clone();
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Ok(Ok(mut rsp)) => {
                    hints.saw(&mut rsp, get);
                    Ok(rsp)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(instant_acme::Error::Other(
                    format!("no answer from the ACME server within {REQUEST_TIMEOUT:?}").into(),
                )),
            }
        })
    }
}

/// The HTTP client for one directory, reached as `egress` says (directly or through a proxy).
pub fn http_client(ca_file: Option<&Path>, egress: &Egress) -> Result<Box<dyn HttpClient>, AcmeError> {
    http_client_with(ca_file, egress, Arc::new(CaHints::default()))
}

/// [`http_client`] that reports what the CA says about timing to `hints`.
fn http_client_with(
    ca_file: Option<&Path>,
    egress: &Egress,
    hints: Arc<CaHints>,
) -> Result<Box<dyn HttpClient>, AcmeError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let ca_err = |detail: String| AcmeError::CaFile { path: path.display().to_string(), detail };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_err(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_err(e.to_string()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ca_err("no usable PEM certificate".into()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let tls = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| AcmeError::CaFile { path: "(client)".into(), detail: e.to_string() })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(egress.connector(http, CONNECT_TIMEOUT));
    let client: Client<_, BodyWrapper<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    Ok(Box::new(TimedClient { inner: Box::new(client), hints }))
}

/// The account of one directory, loaded or created on first use and then kept; shared by the
/// hostnames of every site using that directory.
pub struct AccountCell {
    settings: Arc<AcmeSettings>,
    store: Arc<AcmeStore>,
    owner: String,
    account: tokio::sync::Mutex<Option<Account>>,
    hints: Arc<CaHints>,
}

impl AccountCell {
    pub fn new(settings: Arc<AcmeSettings>, store: Arc<AcmeStore>, owner: String) -> AccountCell {
        AccountCell { settings, store, owner, account: tokio::sync::Mutex::new(None), hints: Arc::default() }
    }

    /// What the CA said about timing in its latest answers.
    pub fn hints(&self) -> &CaHints {
        &self.hints
    }

    /// Forgets the loaded account, so the next use reads it (and the CA's directory, with the
    /// features it offers now, such as ARI) again.
    pub async fn reload(&self) {
        *self.account.lock().await = None;
    }

    /// The account, from memory, from the store, or newly created (under `account.lock`).
    pub async fn get(&self) -> Result<Account, AcmeError> {
        let mut cell = self.account.lock().await;
        if let Some(a) = cell.as_ref() {
            return Ok(a.clone());
        }
        let account = self.load_or_create(None).await?;
        *cell = Some(account.clone());
        Ok(account)
    }

    /// The account if it is already loaded (no network).
    pub async fn loaded(&self) -> Option<Account> {
        self.account.lock().await.clone()
    }

    /// Replaces the account `lost`, which the CA answered `accountDoesNotExist` for: with the
    /// stored one when another replica already registered anew, else with a new registration
    /// (stored over the old `account.json`, logged and counted).
    pub async fn replace_lost(&self, lost: &str) -> Result<Account, AcmeError> {
        let mut cell = self.account.lock().await;
        if let Some(a) = cell.as_ref().filter(|a| a.id() != lost) {
            return Ok(a.clone());
        }
        *cell = None;
        let account = self.load_or_create(Some(lost)).await?;
        *cell = Some(account.clone());
        Ok(account)
    }

    /// The stored account, unless it is `lost`; else a new one.
    async fn load_or_create(&self, lost: Option<&str>) -> Result<Account, AcmeError> {
        let dir = self.store.directory().to_string();
        if let Some(account) = self.load_stored(lost).await? {
            tracing::info!(directory = %dir, account = %account.id(), "ACME account loaded from the store");
            return Ok(account);
        }
        let locks = self.store.locks();
        let guard =
            lock::acquire(&locks, AcmeStore::ACCOUNT_LOCK, &self.owner, "create the ACME account", ACCOUNT_LOCK_TTL)
                .await
                .map_err(|source| AcmeError::Io {
                    path: self.store.account_lock_path().display().to_string(),
                    source,
                })?;
        let guard = match guard {
            Ok(g) => g,
            Err((owner, _)) => return Err(AcmeError::Busy { owner, what: "creating the ACME account" }),
        };
        let created = self.create_locked(lost).await;
        guard.release().await;
        created
    }

    /// Account creation, under `account.lock`.
    async fn create_locked(&self, lost: Option<&str>) -> Result<Account, AcmeError> {
        let dir = self.store.directory().to_string();
        // Another replica may have finished just before we took the lock.
        if let Some(account) = self.load_stored(lost).await? {
            return Ok(account);
        }
        tracing::info!(directory = %dir, "creating an ACME account");
        let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
        let eab = self.settings.eab.as_ref().map(|e| ExternalAccountKey::new(e.key_id.clone(), &e.hmac_key));
        let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
        let (account, creds) = self
            .builder()?
            .create(&new, dir.clone(), eab.as_ref())
            .await
            .map_err(|source| AcmeError::Acme { step: "creating the account", source })?;
        counters::account_created(&dir);
        if lost.is_some() {
            crate::metrics::global().acme_account_reregistered();
        }
        self.store.save_account(&creds)?;
        if !self.store.share_account(&self.owner).await? {
            tracing::warn!(directory = %dir, "the account lock was lost before the new account reached the shared store");
        }
        tracing::info!(directory = %dir, account = %account.id(), path = %self.store.account_path().display(), "ACME account created and stored");
        Ok(account)
    }
}

impl AccountCell {
    async fn load_stored(&self, lost: Option<&str>) -> Result<Option<Account>, AcmeError> {
        // Another replica may have registered it (or registered anew).
        self.store.sync_account().await?;
        let Some(creds) = self.store.load_account()? else { return Ok(None) };
        let account = self
            .builder()?
            .from_credentials(creds)
            .await
            .map_err(|source| AcmeError::Acme { step: "loading the stored account", source })?;
        Ok((Some(account.id()) != lost).then_some(account))
    }
}

impl AccountCell {
    fn builder(&self) -> Result<instant_acme::AccountBuilder, AcmeError> {
        let s = &self.settings;
        let http = http_client_with(s.directory_ca_file.as_deref(), &s.egress, self.hints.clone())?;
        Ok(Account::builder_with_http(http))
    }
}
