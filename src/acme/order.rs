//! One issuance: order, answer the challenge, finalize with a fresh key, download the chain.
//! Every step is logged at info with the hostname and the order URL; keys never are.

use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder, OrderStatus, RetryPolicy,
};

use super::challenge::{Answer, Challenges};
use super::{AcmeError, counters};
use crate::config::{AcmeChallenge, AcmeKeyType, AcmeSettings};

/// Polling of the order: quick first (Pebble and Let's Encrypt usually validate within a
/// second), then slower, for at most two minutes.
const POLL: RetryPolicy =
    RetryPolicy::new().initial_delay(Duration::from_millis(50)).backoff(1.5).timeout(Duration::from_secs(120));

/// A certificate just issued.
pub struct Issued {
    pub chain_pem: String,
    /// The new key in PEM; written to the store, never logged.
    pub key_pem: String,
    pub order_url: String,
}

/// Removes the published answers however the order ends.
struct Published<'a> {
    challenges: &'a Challenges,
    http_tokens: Vec<String>,
    alpn_hosts: Vec<(String, String)>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for t in &self.http_tokens {
            self.challenges.withdraw_http01(t);
        }
        for (host, token) in &self.alpn_hosts {
            self.challenges.withdraw_tls_alpn01(host, token);
        }
    }
}

/// The problem type of a `replaces` the CA will not take: the named certificate was already
/// replaced (an earlier order named it and was finalized, e.g. by an attempt cut before its
/// certificate was stored).
const ALREADY_REPLACED: &str = "urn:ietf:params:acme:error:alreadyReplaced";

/// True when `e` is the CA's problem of type `urn:ietf:params:acme:error:{name}`.
pub fn is_problem(e: &instant_acme::Error, name: &str) -> bool {
    matches!(e, instant_acme::Error::Api(p) if p.r#type.as_deref().and_then(|t| t.strip_prefix(super::ACME_PROBLEM_PREFIX)) == Some(name))
}

/// Orders a certificate for `host`. `replaces` names the certificate being renewed when the CA
/// offers ARI; when the CA says it was already replaced, the order is placed again without it
/// (a renewal must never be blocked by it). `before_finalize` records the order URL and the new
/// key before the CSR is sent, so an interrupted attempt can resume ([`resume`]).
pub async fn issue(
    account: &Account,
    host: &str,
    settings: &AcmeSettings,
    challenges: &Challenges,
    replaces: Option<CertificateIdentifier<'static>>,
    before_finalize: impl AsyncFnOnce(&str, &str) -> Result<(), AcmeError>,
) -> Result<Issued, AcmeError> {
    let directory = settings.directory.as_str();
    let identifiers = [Identifier::Dns(host.to_string())];
    let new_order = |replaces: Option<CertificateIdentifier<'static>>| {
        let mut new = NewOrder::new(&identifiers);
        if let Some(p) = &settings.profile {
            new = new.profile(p);
        }
        if let Some(r) = replaces {
            new = new.replaces(r);
        }
        new
    };
    tracing::info!(hostname = %host, directory, replaces = replaces.is_some(), "placing an ACME order");
    let mut order = match account.new_order(&new_order(replaces.clone())).await {
        Err(e) if replaces.is_some() && is_problem(&e, "alreadyReplaced") => {
            tracing::warn!(hostname = %host, error = %e, problem = ALREADY_REPLACED, "the CA says the current certificate was already replaced; ordering without `replaces`");
            account.new_order(&new_order(None)).await
        }
        r => r,
    }
    .map_err(|source| AcmeError::Acme { step: "placing the order", source })?;
    counters::order_placed(directory);
    crate::metrics::global().acme_order_placed(host);
    let url = order.url().to_string();
    tracing::info!(hostname = %host, order = %url, "order placed");

    if let Err(e) = validate(&mut order, host, settings, challenges, &url).await {
        // Abandoned: its authorizations must not linger valid or pending at the CA.
        deactivate_authorizations(&mut order, host).await;
        return Err(e);
    }
    tracing::info!(hostname = %host, order = %url, "validated; finalizing");

    let (key, key_pem) = new_key(settings.key_type)?;
    before_finalize(&url, &key_pem).await?;
    finalize(&mut order, host, &key).await?;
    let chain_pem = download(&mut order).await?;
    tracing::info!(hostname = %host, order = %url, "certificate issued");
    Ok(Issued { chain_pem, key_pem, order_url: url })
}

/// Answers the order's challenges and waits until the CA has validated them all.
async fn validate(
    order: &mut instant_acme::Order,
    host: &str,
    settings: &AcmeSettings,
    challenges: &Challenges,
    url: &str,
) -> Result<(), AcmeError> {
    let kind = match settings.challenge {
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        AcmeChallenge::Http01 => ChallengeType::Http01,
    };
    let mut published = Published { challenges, http_tokens: Vec::new(), alpn_hosts: Vec::new() };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(|source| AcmeError::Acme { step: "fetching the authorization", source })?;
        match authz.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => return Err(AcmeError::Rejected { detail: format!("authorization is {other:?}") }),
        }
        let Some(mut challenge) = authz.challenge(kind.clone()) else {
            return Err(AcmeError::ChallengeNotOffered { kind: challenge_name(settings.challenge) });
        };
        let key_auth = challenge.key_authorization();
        match settings.challenge {
            AcmeChallenge::Http01 => {
                challenges.publish_http01(&challenge.token, key_auth.as_str())?;
                published.http_tokens.push(challenge.token.clone());
                challenges.share(Answer::Http01(challenge.token.clone())).await?;
            }
            AcmeChallenge::TlsAlpn01 => {
                challenges.publish_tls_alpn01(host, &challenge.token, key_auth.digest().as_ref())?;
                published.alpn_hosts.push((host.to_string(), challenge.token.clone()));
                challenges.share(Answer::TlsAlpn01(host.to_string())).await?;
            }
        }
        challenge
            .set_ready()
            .await
            .map_err(|source| AcmeError::Acme { step: "marking the challenge ready", source })?;
        tracing::info!(hostname = %host, order = %url, challenge = challenge_name(settings.challenge), "challenge answered; waiting for the CA to validate");
    }

    let status =
        order.poll_ready(&POLL).await.map_err(|source| AcmeError::Acme { step: "waiting for validation", source })?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::Rejected { detail: invalid_detail(order).await });
    }
    drop(published);
    Ok(())
}

/// What became of an order an earlier attempt left pending.
pub enum Resumed {
    /// Its certificate, downloaded now.
    Issued(Issued),
    /// The CA no longer offers its certificate (unknown, invalid, expired, another account's):
    /// order afresh. Says why.
    Gone(String),
}

/// Picks up the order at `url` that an earlier attempt finalized (or was about to) with
/// `key_pem`: finalizes it if the CA still waits for the CSR, then downloads its certificate.
/// A transient failure is an error (the order stays pending for the next attempt).
pub async fn resume(account: &Account, host: &str, url: &str, key_pem: &str) -> Result<Resumed, AcmeError> {
    let mut order = match account.order(url.to_string()).await {
        Ok(o) => o,
        Err(e @ instant_acme::Error::Api(_)) => return Ok(Resumed::Gone(format!("the CA no longer offers it: {e}"))),
        Err(source) => return Err(AcmeError::Acme { step: "resuming the interrupted order", source }),
    };
    match order.state().status {
        OrderStatus::Valid | OrderStatus::Processing => {}
        OrderStatus::Ready => {
            let key = rcgen::KeyPair::from_pem(key_pem)?;
            finalize(&mut order, host, &key).await?;
        }
        other => {
            deactivate_authorizations(&mut order, host).await;
            return Ok(Resumed::Gone(format!("the order is {other:?}")));
        }
    }
    let chain_pem = download(&mut order).await?;
    tracing::info!(hostname = %host, order = %url, "certificate of the interrupted order downloaded");
    Ok(Resumed::Issued(Issued { chain_pem, key_pem: key_pem.to_string(), order_url: url.to_string() }))
}

/// Gives up the authorizations of an order that will not be finalized, so they count for
/// nothing at the CA (and a CA that reuses authorizations hands none of them to a later order).
pub async fn deactivate_authorizations(order: &mut instant_acme::Order, host: &str) {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if matches!(authz.status, AuthorizationStatus::Pending | AuthorizationStatus::Valid) {
            match authz.deactivate().await {
                Ok(_) => {
                    tracing::info!(hostname = %host, authorization = %authz.url(), "authorization of an abandoned order deactivated")
                }
                Err(e) => tracing::debug!(hostname = %host, error = %e, "cannot deactivate an authorization"),
            }
        }
    }
}

async fn finalize(order: &mut instant_acme::Order, host: &str, key: &rcgen::KeyPair) -> Result<(), AcmeError> {
    let csr = csr(host, key)?;
    order.finalize_csr(&csr).await.map_err(|source| AcmeError::Acme { step: "finalizing", source })
}

async fn download(order: &mut instant_acme::Order) -> Result<String, AcmeError> {
    order
        .poll_certificate(&POLL)
        .await
        .map_err(|source| AcmeError::Acme { step: "downloading the certificate", source })
}

/// Why an order went invalid, from its authorizations' challenge errors.
async fn invalid_detail(order: &mut instant_acme::Order) -> String {
    let mut details = Vec::new();
    if let Some(e) = &order.state().error {
        details.push(e.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if let Ok(state) = authz.refresh().await {
            for c in &state.challenges {
                if let Some(e) = &c.error {
                    details.push(e.to_string());
                }
            }
        }
    }
    if details.is_empty() { "the order became invalid".into() } else { details.join("; ") }
}

/// A fresh key of the configured type, and its PEM.
fn new_key(key_type: AcmeKeyType) -> Result<(rcgen::KeyPair, String), AcmeError> {
    let alg = match key_type {
        AcmeKeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        AcmeKeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
    };
    let key = rcgen::KeyPair::generate_for(alg)?;
    let pem = key.serialize_pem();
    Ok((key, pem))
}

/// A CSR for `host` signed by `key`.
fn csr(host: &str, key: &rcgen::KeyPair) -> Result<Vec<u8>, AcmeError> {
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    Ok(params.serialize_request(key)?.der().to_vec())
}

pub fn challenge_name(c: AcmeChallenge) -> &'static str {
    match c {
        AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
        AcmeChallenge::Http01 => "http-01",
    }
}
