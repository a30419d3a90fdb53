//! The `[site.tls]` keys of `source = "acme"`: directory, contacts, terms, EAB, profile, key
//! type, challenge and renewal settings.

use super::bounds::Wait;
use super::*;

/// `source = "acme"`: the `[site.tls]` keys of automatic certificates.
impl Validator<'_> {
    pub(super) fn acme(&mut self, i: usize, t: &super::raw::RawTls, hostnames: &[String]) -> Option<AcmeSettings> {
        let before = self.problems.len();
        let at = |k: &'static str| vec![Seg::Key("site"), Seg::Index(i), Seg::Key("tls"), Seg::Key(k)];
        for (k, v) in [("cert", &t.cert), ("key", &t.key)] {
            if v.is_some() {
                self.error(&at(k), "only used with source = \"files\"");
            }
        }
        for h in hostnames.iter().filter(|h| h.starts_with("*.")) {
            self.error(
                &[Seg::Key("site"), Seg::Index(i), Seg::Key("hostnames")],
                format!("`{h}`: wildcard names need the DNS-01 challenge, which source = \"acme\" does not offer"),
            );
        }
        let directory = match t.directory.as_deref() {
            None => {
                self.error(&at("directory"), "source = \"acme\" needs `directory` (\"letsencrypt\", \"letsencrypt-staging\" or an https:// directory URL)");
                None
            }
            Some("letsencrypt") => Url::parse(instant_acme::LetsEncrypt::Production.url()).ok(),
            Some("letsencrypt-staging") => Url::parse(instant_acme::LetsEncrypt::Staging.url()).ok(),
            Some(s) => match Url::parse(s) {
                Ok(u) if u.scheme() == "https" && u.host_str().is_some() => Some(u),
                _ => {
                    self.error(
                        &at("directory"),
                        format!("`{s}`: use \"letsencrypt\", \"letsencrypt-staging\" or an https:// directory URL"),
                    );
                    None
                }
            },
        };
        let mut contact = Vec::new();
        for (j, c) in t.contact.iter().enumerate() {
            let email = c.strip_prefix("mailto:").unwrap_or(c);
            let ok = email.split_once('@').is_some_and(|(l, d)| !l.is_empty() && d.contains('.'))
                && !email.contains([' ', ',', '<', '>']);
            if ok {
                contact.push(format!("mailto:{email}"));
            } else {
                let mut k = at("contact");
                k.push(Seg::Index(j));
                self.error(&k, format!("`{c}` is not an email address"));
            }
        }
        if !t.terms_agreed {
            self.error(
                &at("terms_agreed"),
                "source = \"acme\" needs `terms_agreed = true` (read the CA's terms of service first)",
            );
        }
        let eab = match (&t.eab_key_id, &t.eab_hmac_key) {
            (None, None) => None,
            (Some(id), Some(key)) => {
                use base64::Engine;
                let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(key.trim_end_matches('='));
                match decoded {
                    Ok(hmac_key) if !id.is_empty() && !hmac_key.is_empty() => {
                        Some(Eab { key_id: id.clone(), hmac_key })
                    }
                    // Never echo the key itself.
                    _ => {
                        self.error(&at("eab_hmac_key"), "must be the base64url HMAC key the CA gave with `eab_key_id`");
                        None
                    }
                }
            }
            (Some(_), None) => {
                self.error(&at("eab_key_id"), "`eab_key_id` needs `eab_hmac_key` too");
                None
            }
            (None, Some(_)) => {
                self.error(&at("eab_hmac_key"), "`eab_hmac_key` needs `eab_key_id` too");
                None
            }
        };
        let key_type = match t.key_type.as_deref() {
            None | Some("ecdsa-p256") => Some(AcmeKeyType::EcdsaP256),
            Some("ecdsa-p384") => Some(AcmeKeyType::EcdsaP384),
            Some(other) => {
                self.error(&at("key_type"), format!("`{other}`: use \"ecdsa-p256\" (default) or \"ecdsa-p384\""));
                None
            }
        };
        let challenge = match t.challenge.as_deref() {
            None | Some("tls-alpn-01") => Some(AcmeChallenge::TlsAlpn01),
            Some("http-01") => Some(AcmeChallenge::Http01),
            Some(other) => {
                self.error(&at("challenge"), format!("`{other}`: use \"tls-alpn-01\" (default) or \"http-01\""));
                None
            }
        };
        if t.profile.as_deref().is_some_and(str::is_empty) {
            self.error(&at("profile"), "must name a profile the CA offers, or be left out");
        }
        let retry_min = self.wait(&at("retry_min"), t.retry_min, Wait::TIMER);
        if self.wait(&at("retry_max"), t.retry_max, Wait::TIMER) && retry_min && t.retry_max < t.retry_min {
            self.error(&at("retry_max"), "must be at least `retry_min`");
        }
        if let Some(left) = t.renew_when_left.filter(|&left| self.wait(&at("renew_when_left"), left, Wait::RENEW_LEFT))
        {
            self.warn(
                &at("renew_when_left"),
                format!(
                    "renewing once less than {} is left overrides the CA's advice; meant for rehearsals",
                    humantime::format_duration(left)
                ),
            );
        }
        if self.problems.len() != before {
            return None;
        }
        Some(AcmeSettings {
            directory: directory?,
            contact,
            eab,
            profile: t.profile.clone(),
            key_type: key_type?,
            directory_ca_file: t.directory_ca_file.as_ref().map(PathBuf::from),
            challenge: challenge?,
            renew_when_left: t.renew_when_left,
            poll_interval: t.reload_interval,
            retry_min: t.retry_min,
            retry_max: t.retry_max,
            egress: crate::egress::Egress::direct(),
        })
    }

    /// ACME keys under a site whose source is not `acme` are mistakes, not silent no-ops.
    pub(super) fn no_acme_keys(&mut self, i: usize, t: &super::raw::RawTls) {
        let set = [
            ("directory", t.directory.is_some()),
            ("contact", !t.contact.is_empty()),
            ("terms_agreed", t.terms_agreed),
            ("eab_key_id", t.eab_key_id.is_some()),
            ("eab_hmac_key", t.eab_hmac_key.is_some()),
            ("profile", t.profile.is_some()),
            ("key_type", t.key_type.is_some()),
            ("directory_ca_file", t.directory_ca_file.is_some()),
            ("challenge", t.challenge.is_some()),
            ("renew_when_left", t.renew_when_left.is_some()),
        ];
        for (k, is_set) in set {
            if is_set {
                self.error(
                    &[Seg::Key("site"), Seg::Index(i), Seg::Key("tls"), Seg::Key(k)],
                    "only used with source = \"acme\"",
                );
            }
        }
    }
}
