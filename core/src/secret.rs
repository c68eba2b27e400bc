//! Secrets that travel as text: server-connect tokens and pairing passwords.
//!
//! Kind: pure. A [`Secret`] is zeroized on drop, prints as `Secret(..)` in `Debug` (so it never
//! reaches a log by accident), and compares in constant time. [`Secret::generate`] draws from the
//! OS CSPRNG.

use std::fmt;

use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// Alphabet for generated secrets: no `0/O`, `1/l/I`, so they can be read aloud and typed.
pub const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";

/// A secret string (token or password).
#[derive(Clone, Default)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a string.
    pub fn new(s: impl Into<String>) -> Self {
        Self(Zeroizing::new(s.into()))
    }

    /// `len` characters from [`ALPHABET`] (57 symbols, ≈ 5.83 bits each) from the OS CSPRNG.
    pub fn generate(len: usize) -> Self {
        let mut rng = rand::rngs::OsRng;
        let s: String = (0..len)
            .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
            .collect();
        Self::new(s)
    }

    /// The secret text. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether `presented` equals any of `valid`. Every candidate is compared in constant time and
/// the loop never exits early, so timing reveals neither which token matched nor how much of one.
pub fn matches_any<'a>(presented: &Secret, valid: impl IntoIterator<Item = &'a Secret>) -> bool {
    let mut hit = subtle::Choice::from(0);
    for v in valid {
        hit |= presented.0.as_bytes().ct_eq(v.0.as_bytes());
    }
    hit.into()
}

impl PartialEq for Secret {
    /// Constant-time in the content (the length is not secret).
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut s = String::deserialize(d)?;
        let out = Self::new(s.as_str());
        s.zeroize();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_use_the_alphabet_and_differ() {
        let a = Secret::generate(12);
        let b = Secret::generate(12);
        assert_eq!(a.len(), 12);
        assert!(a.expose().bytes().all(|c| ALPHABET.contains(&c)));
        assert_ne!(a, b);
        // 12 symbols of 57 carry > 66 bits.
        assert!(12.0 * (ALPHABET.len() as f64).log2() > 66.0);
    }

    #[test]
    fn matches_any_finds_only_exact_tokens() {
        let valid = [Secret::new("aaaa"), Secret::new("bbbbbb")];
        assert!(matches_any(&Secret::new("bbbbbb"), &valid));
        assert!(!matches_any(&Secret::new("bbbbb"), &valid));
        assert!(!matches_any(&Secret::new(""), &valid));
        assert!(!matches_any(&Secret::new("aaaa"), &[]));
    }

    #[test]
    fn debug_is_redacted_and_eq_compares_content() {
        let s = Secret::new("hunter2hunter2");
        assert_eq!(format!("{s:?}"), "Secret(..)");
        assert_eq!(s, Secret::new("hunter2hunter2"));
        assert_ne!(s, Secret::new("hunter2hunter3"));
        assert_ne!(s, Secret::new("hunter2"));
    }
}
