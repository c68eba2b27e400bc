//! Identity: P-256 key pairs, their fingerprints, and key files.
//!
//! Kind: pure, except [`load_key`] and [`load_or_create_key`] at the end, which read and write key
//! files through [`crate::fsutil`].
//!
//! Every device and every client has exactly one NIST P-256 key pair. A peer is identified by the
//! [`Fingerprint`] of its public key: the SHA-256 of the DER `SubjectPublicKeyInfo`, written as 64
//! lowercase hex characters (Nabto Edge's format). Names, addresses and certificate fields are never
//! identity.
//!
//! This module never logs or prints secret material: [`SecretKey`]'s `Debug` is redacted and its
//! encodings are returned in [`Zeroizing`] buffers.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use p256::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::fsutil;

/// A P-256 private key. Zeroized on drop; `Debug` prints `SecretKey(..)`.
#[derive(Clone)]
pub struct SecretKey {
    inner: p256::SecretKey,
}

impl SecretKey {
    /// Generates a fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self {
            inner: p256::SecretKey::random(&mut rand::rngs::OsRng),
        }
    }

    /// Parses a PEM PKCS#8 (`-----BEGIN PRIVATE KEY-----`) P-256 key.
    ///
    /// # Errors
    /// [`KeyError::InvalidPrivateKey`] when the text is not a PKCS#8 P-256 key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        p256::SecretKey::from_pkcs8_pem(pem)
            .map(|inner| Self { inner })
            .map_err(|e| KeyError::InvalidPrivateKey(e.to_string()))
    }

    /// The key as PEM PKCS#8 text.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        // Encoding a valid in-memory key cannot fail: the only error source is the DER writer
        // running out of a fixed-size buffer, which the p256 crate sizes for its own keys.
        match self.inner.to_pkcs8_pem(LineEnding::LF) {
            Ok(pem) => pem,
            Err(_) => Zeroizing::new(String::new()),
        }
    }

    /// The key as DER PKCS#8 bytes (for rustls and rcgen).
    pub fn to_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        match self.inner.to_pkcs8_der() {
            Ok(doc) => Zeroizing::new(doc.as_bytes().to_vec()),
            Err(_) => Zeroizing::new(Vec::new()),
        }
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_p256(&self.inner.public_key())
    }

    /// Shorthand for `self.public_key().fingerprint()`.
    pub fn fingerprint(&self) -> Fingerprint {
        self.public_key().fingerprint()
    }

    /// Derives a 32-byte secret bound to this key and `label` (HMAC-SHA256 keyed by the scalar).
    ///
    /// Used for values that must be stable across restarts but never reveal the key, such as the
    /// QUIC stateless-reset key.
    pub fn derive_secret(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        use hmac::{Hmac, Mac};
        let scalar = Zeroizing::new(self.inner.to_bytes());
        let mut out = Zeroizing::new([0u8; 32]);
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
        if let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&scalar[..]) {
            mac.update(label);
            out.copy_from_slice(&mac.finalize().into_bytes());
        }
        out
    }

    /// An ECDSA P-256 / SHA-256 signature of `msg` (64 bytes, `r ‖ s`), as [`PublicKey::verifies`]
    /// checks it. Empty only if the key cannot be used by the crypto provider, which a key of
    /// this type always can.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let rng = ring::rand::SystemRandom::new();
        let der = self.to_pkcs8_der();
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
            .ok()
            .and_then(|kp| kp.sign(&rng, msg).ok())
            .map(|s| s.as_ref().to_vec())
            .unwrap_or_default()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// A validated P-256 public key, kept as its DER `SubjectPublicKeyInfo`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    spki: Vec<u8>,
}

impl PublicKey {
    fn from_p256(key: &p256::PublicKey) -> Self {
        // A point that came from a valid secret key always encodes.
        let spki = key
            .to_public_key_der()
            .map(|d| d.as_bytes().to_vec())
            .unwrap_or_default();
        Self { spki }
    }

    /// Parses and validates a DER `SubjectPublicKeyInfo` holding a P-256 point.
    ///
    /// # Errors
    /// [`KeyError::NotP256`] for any other algorithm, curve or an invalid point.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let key = p256::PublicKey::from_public_key_der(der).map_err(|_| KeyError::NotP256)?;
        Ok(Self::from_p256(&key))
    }

    /// The DER `SubjectPublicKeyInfo`.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// SHA-256 of the DER `SubjectPublicKeyInfo`.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_spki(&self.spki)
    }

    /// Whether `sig` is this key's [`SecretKey::sign`] signature of `msg`. Any malformed input
    /// is simply "no".
    pub fn verifies(&self, msg: &[u8], sig: &[u8]) -> bool {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let Ok(key) = p256::PublicKey::from_public_key_der(&self.spki) else {
            return false;
        };
        let point = key.to_encoded_point(false);
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            point.as_bytes(),
        )
        .verify(msg, sig)
        .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint().fmt_short())
    }
}

/// SHA-256 of a DER `SubjectPublicKeyInfo`: the identity of a device or client.
///
/// `Display` and `FromStr` use 64 lowercase hex characters. Equality is constant-time.
#[derive(Clone, Copy)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Length of the hex form.
    pub const HEX_LEN: usize = 64;
    /// Minimum length of a prefix accepted when *searching* a list (never for pinning).
    pub const MIN_PREFIX_LEN: usize = 16;

    /// Hashes a DER `SubjectPublicKeyInfo` (no validation of its content).
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Self(Sha256::digest(spki_der).into())
    }

    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 16 hex characters, for logs.
    pub fn fmt_short(&self) -> String {
        hex::encode(&self.0[..8])
    }

    /// Whether `prefix` (hex, any case) is a prefix of this fingerprint and long enough
    /// ([`Self::MIN_PREFIX_LEN`]) to be used to search a list.
    pub fn matches_prefix(&self, prefix: &str) -> bool {
        prefix.len() >= Self::MIN_PREFIX_LEN
            && prefix.len() <= Self::HEX_LEN
            && self.to_string().starts_with(&prefix.to_ascii_lowercase())
    }
}

impl PartialEq for Fingerprint {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Fingerprint {}

impl std::hash::Hash for Fingerprint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.fmt_short())
    }
}

impl FromStr for Fingerprint {
    type Err = KeyError;

    /// Accepts exactly 64 hex characters (either case); surrounding whitespace is trimmed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != Self::HEX_LEN {
            return Err(KeyError::BadFingerprint(format!(
                "expected {} hex characters, got {}",
                Self::HEX_LEN,
                s.chars().count()
            )));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| KeyError::BadFingerprint("not hexadecimal".into()))?;
        Ok(Self(out))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            let bytes = <Vec<u8>>::deserialize(d)?;
            let arr: [u8; 32] = bytes
                .try_into()
                .map_err(|_| serde::de::Error::custom("fingerprint must be 32 bytes"))?;
            Ok(Self(arr))
        }
    }
}

/// Errors about keys and fingerprints.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not a PKCS#8 P-256 private key.
    #[error("not a PEM PKCS#8 P-256 private key: {0}")]
    InvalidPrivateKey(String),
    /// A public key of another algorithm or curve, or an invalid point.
    #[error("the public key is not a valid NIST P-256 key")]
    NotP256,
    /// A fingerprint that is not 64 hex characters.
    #[error("invalid fingerprint: {0}")]
    BadFingerprint(String),
}

/// Errors loading or creating a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The key file can be read by group or others (OpenSSH's check).
    #[error(
        "UNPROTECTED PRIVATE KEY FILE: permissions {mode:04o} for '{path}' are too open; a private \
         key must not be accessible by others. Fix it with: chmod 600 '{path}'",
        path = .path.display()
    )]
    Unprotected {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file holds something other than a P-256 PKCS#8 key.
    #[error("'{path}': {source}", path = .path.display())]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: KeyError,
    },
    /// Reading or writing failed.
    #[error("'{path}': {source}", path = .path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another user owns the key file.
    #[error("'{path}' {reason}", path = .path.display())]
    Untrusted {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: fsutil::Untrusted,
    },
}

/// Loads the key at `path`, refusing a file readable by group or others or a symlink.
///
/// # Errors
/// [`KeyFileError`] naming the file.
pub fn load_key(path: &Path) -> Result<SecretKey, KeyFileError> {
    let pem = fsutil::read_private(path).map_err(|e| match e {
        fsutil::PrivateReadError::TooOpen(mode) => KeyFileError::Unprotected {
            path: path.to_owned(),
            mode,
        },
        fsutil::PrivateReadError::Untrusted(reason) => KeyFileError::Untrusted {
            path: path.to_owned(),
            reason,
        },
        fsutil::PrivateReadError::Io(source) => KeyFileError::Io {
            path: path.to_owned(),
            source,
        },
    })?;
    let text = std::str::from_utf8(&pem).map_err(|_| KeyFileError::Invalid {
        path: path.to_owned(),
        source: KeyError::InvalidPrivateKey("not UTF-8 text".into()),
    })?;
    SecretKey::from_pkcs8_pem(text).map_err(|source| KeyFileError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// Loads the key at `path`, or creates it (mode 0600) if there is none. Returns the key and
/// whether it was created. Two processes racing to create it end up with the same key.
///
/// # Errors
/// [`KeyFileError`] naming the file.
pub fn load_or_create_key(path: &Path) -> Result<(SecretKey, bool), KeyFileError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => return load_key(path).map(|k| (k, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(KeyFileError::Io {
                path: path.to_owned(),
                source,
            });
        }
    }
    let key = SecretKey::generate();
    let pem = key.to_pkcs8_pem();
    let created = fsutil::create_new_atomic(path, pem.as_bytes(), 0o600).map_err(|source| {
        KeyFileError::Io {
            path: path.to_owned(),
            source,
        }
    })?;
    if created {
        Ok((key, true))
    } else {
        // Somebody else created it between our check and our link: use theirs.
        load_key(path).map(|k| (k, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_under_their_key_and_message() {
        let key = SecretKey::generate();
        let sig = key.sign(b"entry");
        assert_eq!(sig.len(), 64);
        assert!(key.public_key().verifies(b"entry", &sig));
        assert!(!key.public_key().verifies(b"entrY", &sig));
        assert!(!SecretKey::generate().public_key().verifies(b"entry", &sig));
        let mut bad = sig.clone();
        bad[10] ^= 1;
        assert!(!key.public_key().verifies(b"entry", &bad));
        assert!(!key.public_key().verifies(b"entry", &sig[..63]));
        assert!(!key.public_key().verifies(b"entry", &[]));
    }

    #[test]
    fn fingerprint_is_sha256_of_spki_in_lower_hex() {
        let key = SecretKey::generate();
        let pk = key.public_key();
        let fp = pk.fingerprint();
        let expected = hex::encode(Sha256::digest(pk.spki_der()));
        assert_eq!(fp.to_string(), expected);
        assert_eq!(fp.to_string().len(), 64);
        assert!(
            fp.to_string()
                .chars()
                .all(|c| matches!(c, '0'..='9' | 'a'..='f'))
        );
        assert_eq!(fp.fmt_short(), expected[..16]);
        // P-256 SPKI DER is always 91 bytes.
        assert_eq!(pk.spki_der().len(), 91);
    }

    #[test]
    fn pem_round_trip_keeps_identity() {
        let key = SecretKey::generate();
        let pem = key.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let back = SecretKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.fingerprint(), key.fingerprint());
    }

    #[test]
    fn debug_is_redacted() {
        let key = SecretKey::generate();
        assert_eq!(format!("{key:?}"), "SecretKey(..)");
    }

    #[test]
    fn fingerprint_parsing() {
        let fp = SecretKey::generate().fingerprint();
        let s = fp.to_string();
        assert_eq!(s.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(s.to_uppercase().parse::<Fingerprint>().unwrap(), fp);
        assert!(s[..63].parse::<Fingerprint>().is_err());
        assert!(format!("{s}0").parse::<Fingerprint>().is_err());
        assert!(format!("{}g", &s[..63]).parse::<Fingerprint>().is_err());
        assert!("".parse::<Fingerprint>().is_err());
        assert!(fp.matches_prefix(&s[..16]));
        assert!(!fp.matches_prefix(&s[..15]));
        assert!(fp.matches_prefix(&s.to_uppercase()[..20]));
    }

    #[test]
    fn derived_secrets_are_stable_and_label_bound() {
        let key = SecretKey::generate();
        let other = SecretKey::generate();
        assert_eq!(*key.derive_secret(b"a"), *key.derive_secret(b"a"));
        assert_ne!(*key.derive_secret(b"a"), *key.derive_secret(b"b"));
        assert_ne!(*key.derive_secret(b"a"), *other.derive_secret(b"a"));
    }

    #[test]
    fn rejects_non_p256_spki() {
        assert_eq!(PublicKey::from_spki_der(b"garbage"), Err(KeyError::NotP256));
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&ed)),
            Err(KeyError::NotP256)
        );
    }

    #[test]
    fn key_file_created_0600_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let (k1, created) = load_or_create_key(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created) = load_or_create_key(&path).unwrap();
        assert!(!created);
        assert_eq!(k1.fingerprint(), k2.fingerprint());
    }

    #[test]
    fn refuses_group_readable_key_and_symlinks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        load_or_create_key(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_key(&path).unwrap_err();
        assert!(
            matches!(err, KeyFileError::Unprotected { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("UNPROTECTED PRIVATE KEY FILE"));
        assert!(err.to_string().contains("chmod 600"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(load_key(&link), Err(KeyFileError::Io { .. })));
    }

    #[test]
    fn garbage_key_file_is_a_clear_error() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        std::fs::write(&path, "not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_key(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Invalid { .. }));
        assert!(err.to_string().contains("k.key"));
    }
}
