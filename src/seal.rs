//! Private keys sealed at rest when they leave the host (a shared store such as Redis):
//! AES-256-GCM through aws-lc-rs, the library rustls already uses, so no second crypto stack.
//!
//! A sealed value is text an operator recognises when they look at the store:
//!
//! ```text
//! oauth-relay-sealed:v1:{key id}:{base64(nonce || ciphertext || tag)}
//! ```
//!
//! The key id (the first 8 hex digits of the key's SHA-256) says which key sealed a value, so
//! keys can rotate: the key file holds one base64 key per line, the first seals, all open. The
//! value's name in the store is the AEAD's associated data, so a sealed key copied under another
//! name (another hostname's, say) does not open. A value that does not open is an error that
//! says why, never a reason to make a new key.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::fsutil;

const PREFIX: &str = "oauth-relay-sealed:v1:";

/// Why a key file could not be used or a value not opened. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: readable or writable by every user of the host (mode {mode:o}); \
         `chmod 600` it (in Kubernetes, mount the Secret with defaultMode 0440 and an fsGroup)"
    )]
    Exposed { path: String, mode: u32 },
    #[error("{path}, line {line}: not a key: expected 32 bytes in base64 (make one with `openssl rand -base64 32`)")]
    BadKey { path: String, line: usize },
    #[error("{path}: holds no key (make one with `openssl rand -base64 32`)")]
    Empty { path: String },
    #[error("{name}: sealed with key {id}, which the storage key file does not hold (was a key removed too early?)")]
    UnknownKey { name: String, id: String },
    #[error(
        "{name}: does not open with key {id}: the value was changed, stored under another name, \
         or sealed by a different key with the same id"
    )]
    Tampered { name: String, id: String },
    #[error("{name}: not a sealed value of this format")]
    Garbled { name: String },
    #[error(
        "{name}: stored in clear, but `storage_key_file` is set: every relay sharing the store needs \
         the same key file (`oauth-relay store copy` with the key file set seals a store)"
    )]
    Clear { name: String },
}

/// The keys of a storage key file: the first seals, every one opens.
pub struct Sealer {
    keys: Vec<(String, LessSafeKey)>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Sealer").field("key_ids", &ids).finish()
    }
}

impl Sealer {
    /// Reads a key file: one base64 key of 32 bytes per line, `#` comments and blank lines
    /// skipped. Refused when every user of the host may read or change it.
    pub fn load(path: &Path) -> Result<Sealer, SealError> {
        let shown = || path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| SealError::Read { path: shown(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(SealError::Exposed { path: shown(), mode });
        }
        let text = fsutil::read_regular(path).map_err(|source| SealError::Read { path: shown(), source })?;
        let text = String::from_utf8(text).map_err(|_| SealError::BadKey { path: shown(), line: 1 })?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || SealError::BadKey { path: shown(), line: i + 1 };
            let bytes = STANDARD.decode(line).map_err(|_| bad())?;
            keys.push(Self::key(&bytes).ok_or_else(bad)?);
        }
        if keys.is_empty() {
            return Err(SealError::Empty { path: shown() });
        }
        Ok(Sealer { keys })
    }

    /// A sealer with these raw 32-byte keys (the first seals).
    pub fn from_keys(raw: &[[u8; 32]]) -> Sealer {
        Sealer { keys: raw.iter().filter_map(|k| Self::key(k)).collect() }
    }

    fn key(bytes: &[u8]) -> Option<(String, LessSafeKey)> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).ok()?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
        let id = crate::crypto::hex(&digest.as_ref()[..4]);
        Some((id, LessSafeKey::new(unbound)))
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `plain`, to be stored under `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> String {
        let (id, key) = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).expect("the system's random number generator");
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(name.as_bytes()), &mut sealed)
            .expect("AES-GCM seals any length the store holds");
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&sealed);
        format!("{PREFIX}{id}:{}", STANDARD.encode(raw))
    }

    /// Opens a value stored under `name`, sealed by any of the keys.
    pub fn open(&self, name: &str, stored: &[u8]) -> Result<Vec<u8>, SealError> {
        let garbled = || SealError::Garbled { name: name.to_string() };
        let text = std::str::from_utf8(stored).map_err(|_| garbled())?;
        let rest = text.trim_end().strip_prefix(PREFIX).ok_or_else(garbled)?;
        let (id, data) = rest.split_once(':').ok_or_else(garbled)?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .ok_or_else(|| SealError::UnknownKey { name: name.to_string(), id: id.to_string() })?;
        let raw = STANDARD.decode(data).map_err(|_| garbled())?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(garbled());
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| garbled())?;
        let mut buf = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| SealError::Tampered { name: name.to_string(), id: id.to_string() })?;
        Ok(plain.to_vec())
    }

    /// Whether a stored value is sealed (by this format, whatever the key).
    pub fn is_sealed(stored: &[u8]) -> bool {
        stored.starts_with(PREFIX.as_bytes())
    }
}

/// How a store treats private keys: sealed with a key file, or in clear (a folder on the
/// relay's own host, or a shared store the operator chose not to seal).
#[derive(Debug, Default)]
pub enum Protection {
    #[default]
    Clear,
    Sealed(Sealer),
}

impl Protection {
    /// What to store for the private key `plain` under `name`.
    pub fn protect(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        match self {
            Protection::Clear => plain.to_vec(),
            Protection::Sealed(s) => s.seal(name, plain).into_bytes(),
        }
    }

    /// The private key stored under `name`. With a key file, a value in clear is refused: it
    /// was written by a relay without the key file, or planted.
    pub fn reveal(&self, name: &str, stored: &[u8]) -> Result<Vec<u8>, SealError> {
        match self {
            Protection::Sealed(s) if Sealer::is_sealed(stored) => s.open(name, stored),
            Protection::Sealed(_) => Err(SealError::Clear { name: name.to_string() }),
            Protection::Clear if Sealer::is_sealed(stored) => {
                Err(SealError::UnknownKey { name: name.to_string(), id: key_id(stored).unwrap_or("?").to_string() })
            }
            Protection::Clear => Ok(stored.to_vec()),
        }
    }
}

/// The key id a sealed value names.
fn key_id(stored: &[u8]) -> Option<&str> {
    std::str::from_utf8(stored).ok()?.strip_prefix(PREFIX)?.split(':').next()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const NAME: &str = "acme/example/auth.example.com/key-01.pem";
    const PEM: &[u8] = b"-----BEGIN PRIVATE KEY-----\nMIG...\n-----END PRIVATE KEY-----\n";

    fn key_file(lines: &str, mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storage.key");
        std::fs::write(&path, lines).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    #[test]
    fn a_sealed_key_opens_under_its_name_only_and_hides_its_bytes() {
        let sealer = Sealer::from_keys(&[[7; 32]]);
        let stored = sealer.seal(NAME, PEM);
        assert!(stored.starts_with(&format!("oauth-relay-sealed:v1:{}:", sealer.current_id())), "{stored}");
        assert!(!stored.contains("PRIVATE KEY"));
        assert_ne!(stored, sealer.seal(NAME, PEM), "a fresh nonce each time");
        assert_eq!(sealer.open(NAME, stored.as_bytes()).unwrap(), PEM);
        let moved = sealer.open("acme/example/other.example.com/key-01.pem", stored.as_bytes()).unwrap_err();
        assert!(matches!(moved, SealError::Tampered { .. }), "{moved}");
        let mut flipped = stored.clone().into_bytes();
        let last = flipped.len() - 3;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert!(matches!(sealer.open(NAME, &flipped), Err(SealError::Tampered { .. })));
    }

    #[test]
    fn keys_rotate_the_first_seals_and_every_one_opens() {
        let old = Sealer::from_keys(&[[1; 32]]);
        let stored = old.seal(NAME, PEM);
        let rotated = Sealer::from_keys(&[[2; 32], [1; 32]]);
        assert_eq!(rotated.open(NAME, stored.as_bytes()).unwrap(), PEM);
        assert_ne!(rotated.current_id(), old.current_id());
        let fresh = rotated.seal(NAME, PEM);
        let e = old.open(NAME, fresh.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{NAME}: sealed with key {}, which the storage key file does not hold (was a key removed too early?)",
                rotated.current_id()
            )
        );
    }

    #[test]
    fn a_key_file_is_base64_lines_and_private() {
        let k1 = STANDARD.encode([3u8; 32]);
        let k2 = STANDARD.encode([4u8; 32]);
        let (_d, path) = key_file(&format!("# current\n{k1}\n\n# previous\n{k2}\n"), 0o600);
        let sealer = Sealer::load(&path).unwrap();
        assert_eq!(sealer.current_id(), Sealer::from_keys(&[[3; 32]]).current_id());
        assert!(format!("{sealer:?}").starts_with("Sealer { key_ids: ["), "no key bytes in Debug");

        let (_d, path) = key_file(&format!("{k1}\n"), 0o644);
        let e = Sealer::load(&path).unwrap_err().to_string();
        assert!(e.ends_with("readable or writable by every user of the host (mode 644); `chmod 600` it (in Kubernetes, mount the Secret with defaultMode 0440 and an fsGroup)"), "{e}");

        let (_d, path) = key_file("# a\nc2hvcnQ=\n", 0o400);
        let e = Sealer::load(&path).unwrap_err().to_string();
        assert!(
            e.ends_with(", line 2: not a key: expected 32 bytes in base64 (make one with `openssl rand -base64 32`)"),
            "{e}"
        );
        let (_d, path) = key_file("# only a comment\n", 0o400);
        assert!(matches!(Sealer::load(&path), Err(SealError::Empty { .. })));
    }

    #[test]
    fn with_a_key_file_a_key_in_clear_is_refused_and_without_one_a_sealed_key_is() {
        let sealed = Protection::Sealed(Sealer::from_keys(&[[5; 32]]));
        let stored = sealed.protect(NAME, PEM);
        assert_eq!(sealed.reveal(NAME, &stored).unwrap(), PEM);
        assert!(matches!(sealed.reveal(NAME, PEM), Err(SealError::Clear { .. })));
        let clear = Protection::Clear;
        assert_eq!(clear.protect(NAME, PEM), PEM);
        assert!(matches!(clear.reveal(NAME, &stored), Err(SealError::UnknownKey { .. })));
        assert_eq!(clear.reveal(NAME, PEM).unwrap(), PEM);
    }
}
