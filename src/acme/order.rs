//! One issuance: order, answer the challenge, finalize with a fresh key, download the chain.
//! Every step is logged at info with the hostname and the order URL; keys never are.

use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder, OrderStatus, RetryPolicy,
};

use super::challenge::Challenges;
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
    alpn_hosts: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for t in &self.http_tokens {
            self.challenges.withdraw_http01(t);
        }
        for h in &self.alpn_hosts {
            self.challenges.withdraw_tls_alpn01(h);
        }
    }
}

/// Orders a certificate for `host`. `replaces` names the certificate being renewed when the CA
/// offers ARI.
pub async fn issue(
    account: &Account,
    host: &str,
    settings: &AcmeSettings,
    challenges: &Challenges,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<Issued, AcmeError> {
    let directory = settings.directory.as_str();
    let identifiers = [Identifier::Dns(host.to_string())];
    let mut new = NewOrder::new(&identifiers);
    if let Some(p) = &settings.profile {
        new = new.profile(p);
    }
    if let Some(r) = replaces {
        new = new.replaces(r);
    }
    tracing::info!(hostname = %host, directory, "placing an ACME order");
    let mut order =
        account.new_order(&new).await.map_err(|source| AcmeError::Acme { step: "placing the order", source })?;
    counters::order_placed(directory);
    crate::metrics::global().acme_order_placed(host);
    let url = order.url().to_string();
    tracing::info!(hostname = %host, order = %url, "order placed");

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
            }
            AcmeChallenge::TlsAlpn01 => {
                challenges.publish_tls_alpn01(host, key_auth.digest().as_ref())?;
                published.alpn_hosts.push(host.to_string());
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
        return Err(AcmeError::Rejected { detail: invalid_detail(&mut order).await });
    }
    drop(published);
    tracing::info!(hostname = %host, order = %url, "validated; finalizing");

    let (csr, key_pem) = csr(host, settings.key_type)?;
    order.finalize_csr(&csr).await.map_err(|source| AcmeError::Acme { step: "finalizing", source })?;
    let chain_pem = order
        .poll_certificate(&POLL)
        .await
        .map_err(|source| AcmeError::Acme { step: "downloading the certificate", source })?;
    tracing::info!(hostname = %host, order = %url, "certificate issued");
    Ok(Issued { chain_pem, key_pem, order_url: url })
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

/// A fresh key of the configured type and a CSR for `host` signed by it.
fn csr(host: &str, key_type: AcmeKeyType) -> Result<(Vec<u8>, String), AcmeError> {
    let alg = match key_type {
        AcmeKeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        AcmeKeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
    };
    let key = rcgen::KeyPair::generate_for(alg)?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}

pub fn challenge_name(c: AcmeChallenge) -> &'static str {
    match c {
        AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
        AcmeChallenge::Http01 => "http-01",
    }
}
