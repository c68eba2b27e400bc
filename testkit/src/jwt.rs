//! A test identity provider: an ES256 key, its JWKS file, and tokens with the claims a test
//! chooses (expired, for another audience, signed by another key…).

use std::path::Path;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::DecodePrivateKey;
use tunnel_shared::identity::SecretKey;

/// An identity provider with one signing key.
#[derive(Debug)]
pub struct Issuer {
    key: SecretKey,
    /// `iss` of its tokens.
    pub issuer: String,
    /// `aud` of its tokens.
    pub audience: String,
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Seconds since the Unix epoch now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Issuer {
    /// A fresh key.
    pub fn new() -> Self {
        Self {
            key: SecretKey::generate(),
            issuer: "https://id.test".into(),
            audience: "tunnel".into(),
        }
    }

    /// Writes its JWKS to `path`.
    pub fn write_jwks(&self, path: &Path) {
        let der = self.key.to_pkcs8_der();
        let secret = p256::SecretKey::from_pkcs8_der(&der).expect("key");
        let point = secret.public_key().to_encoded_point(false);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
            "x": b64(point.x().expect("x")), "y": b64(point.y().expect("y")),
        }]});
        std::fs::write(path, jwks.to_string()).expect("jwks");
    }

    /// The `[jwt]` section for `relay.toml` or `device.toml`, with the JWKS at `jwks`.
    pub fn config(&self, jwks: &Path) -> String {
        format!(
            "[jwt]\njwks = \"{}\"\nissuer = \"{}\"\naudience = \"{}\"\n",
            jwks.display(),
            self.issuer,
            self.audience
        )
    }

    /// A token for `devices`, valid for an hour.
    pub fn token(&self, devices: &[&str]) -> String {
        self.token_with(serde_json::json!({
            "iss": self.issuer, "aud": self.audience, "sub": "alice",
            "exp": now() + 3600, "tunnel_devices": devices,
        }))
    }

    /// A token with exactly `claims`, signed by this issuer.
    pub fn token_with(&self, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(
            &h,
            &claims,
            &EncodingKey::from_ec_der(&self.key.to_pkcs8_der()),
        )
        .expect("sign")
    }
}

impl Default for Issuer {
    fn default() -> Self {
        Self::new()
    }
}
