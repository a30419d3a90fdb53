//! What a private key is (RSA and its size, the elliptic curve, Ed25519 or Ed448), read from
//! its DER structure: when aws-lc-rs cannot sign with a key, rustls only says it failed to
//! parse it, and the operator needs to hear which key was found and which would do.

use rustls::pki_types::PrivateKeyDer;
use x509_parser::der_parser::ber::{BerObject, BerObjectContent};
use x509_parser::der_parser::der::parse_der;

/// The keys the relay can sign with, as the operator is told after a refused one.
pub const USABLE: &str = "ECDSA P-256, P-384 or P-521, Ed25519, or RSA of 2048 to 8192 bits";

/// The kind of `key`, e.g. "RSA-1024", "Ed448", "ECDSA secp256k1"; "a key of an unknown kind"
/// when its structure says nothing known.
pub fn describe(key: &PrivateKeyDer<'_>) -> String {
    let kind = match key {
        PrivateKeyDer::Pkcs1(k) => rsa(k.secret_pkcs1_der()),
        PrivateKeyDer::Sec1(k) => sec1(k.secret_sec1_der()),
        PrivateKeyDer::Pkcs8(k) => pkcs8(k.secret_pkcs8_der()),
        _ => None,
    };
    kind.unwrap_or_else(|| "a key of an unknown kind".into())
}

/// The elements of the DER sequence `der`.
fn sequence(der: &[u8]) -> Option<Vec<BerObject<'_>>> {
    let (_, obj) = parse_der(der).ok()?;
    match obj.content {
        BerObjectContent::Sequence(items) => Some(items),
        _ => None,
    }
}

/// PKCS#1 `RSAPrivateKey`: version, then the modulus, whose length is the key size.
fn rsa(der: &[u8]) -> Option<String> {
    let items = sequence(der)?;
    let BerObjectContent::Integer(modulus) = items.get(1)?.content else { return None };
    let modulus: &[u8] = modulus;
    let start = modulus.iter().position(|b| *b != 0)?;
    let bits = (modulus.len() - start) * 8 - modulus[start].leading_zeros() as usize;
    Some(format!("RSA-{bits}"))
}

/// SEC1 `ECPrivateKey`: version, key, then (tagged \[0\]) the curve.
fn sec1(der: &[u8]) -> Option<String> {
    let items = sequence(der)?;
    let curve_oid = items.iter().skip(2).find_map(|o| match &o.content {
        BerObjectContent::Unknown(any) => parse_der(any.data).ok().and_then(|(_, c)| c.as_oid().ok().cloned()),
        BerObjectContent::Tagged(_, _, inner) => inner.as_oid().ok().cloned(),
        _ => None,
    });
    Some(format!("ECDSA {}", curve(curve_oid.map(|o| o.to_id_string()).as_deref())))
}

/// PKCS#8 `PrivateKeyInfo`: version, algorithm (an OID and its parameters), the key.
fn pkcs8(der: &[u8]) -> Option<String> {
    let items = sequence(der)?;
    let BerObjectContent::Sequence(algorithm) = &items.get(1)?.content else { return None };
    let oid = algorithm.first()?.as_oid().ok()?.to_id_string();
    let kind = match oid.as_str() {
        "1.2.840.113549.1.1.1" => {
            let BerObjectContent::OctetString(inner) = items.get(2)?.content else { return None };
            return rsa(inner);
        }
        "1.2.840.113549.1.1.10" => "RSA-PSS".to_string(),
        "1.2.840.10045.2.1" => {
            let params = algorithm.get(1).and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
            format!("ECDSA {}", curve(params.as_deref()))
        }
        "1.3.101.112" => "Ed25519".into(),
        "1.3.101.113" => "Ed448".into(),
        "1.3.101.110" => "X25519 (a key-agreement key, not a signing key)".into(),
        "1.3.101.111" => "X448 (a key-agreement key, not a signing key)".into(),
        "1.2.840.10040.4.1" => "DSA".into(),
        other => format!("a key of algorithm {other}"),
    };
    Some(kind)
}

/// The name of an elliptic curve by its OID.
fn curve(oid: Option<&str>) -> String {
    match oid {
        Some("1.2.840.10045.3.1.7") => "P-256".into(),
        Some("1.3.132.0.34") => "P-384".into(),
        Some("1.3.132.0.35") => "P-521".into(),
        Some("1.3.132.0.10") => "secp256k1".into(),
        Some("1.2.840.10045.3.1.1") => "P-192".into(),
        Some("1.3.132.0.33") => "P-224".into(),
        Some(other) => format!("on curve {other}"),
        None => "on an unnamed curve".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    fn kind_of(pem: &str) -> String {
        describe(&PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("a PEM key"))
    }

    /// Keys made by OpenSSL that aws-lc-rs refuses (`tests/data/keys`), and one it takes.
    #[test]
    fn keys_are_named_by_algorithm_and_size() {
        let refused = [
            ("rsa-1024.pem", include_str!("../../tests/data/keys/rsa-1024.pem"), "RSA-1024"),
            ("rsa-1024-pkcs8.pem", include_str!("../../tests/data/keys/rsa-1024-pkcs8.pem"), "RSA-1024"),
            ("ed448.pem", include_str!("../../tests/data/keys/ed448.pem"), "Ed448"),
            ("secp256k1.pem", include_str!("../../tests/data/keys/secp256k1.pem"), "ECDSA secp256k1"),
        ];
        for (file, pem, want) in refused {
            assert_eq!(kind_of(pem), want, "{file}");
        }
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384");
        assert_eq!(kind_of(&p384.serialize_pem()), "ECDSA P-384");
    }
}
