//! JWTs from an external identity provider, as an alternative to a server-connect token, checked
//! by the relay and by the device alike (`[jwt]` in `relay.toml` and `device.toml`).
//!
//! Kind: pure, but for [`JwtVerifier::load`] (reads the JWKS file). Time is an input.
//!
//! A JWT is accepted when it is signed with ES256 (P-256) or RS256 by a key of the configured
//! JWKS, its header names no critical extension (`crit`: this verifier implements none, and RFC
//! 7515 §4.1.11 requires refusing them), its `iss` and `aud` are the configured ones, `exp` is in
//! the future but no more than [`JwtConfig::max_lifetime_secs`] away (nor, with `iat`, that long
//! after it was issued), `nbf` (if any) in the past (with [`JwtConfig::leeway_secs`] of clock
//! skew), and its device claim (a string or a list of strings; [`JwtConfig::devices_claim`])
//! names the device. Like a token, a valid
//! JWT only lets a connection proceed: the client's key still decides its role on the device.
//! Any other algorithm (`none`, HMAC, …) is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// Longest JWT accepted (bytes).
pub const MAX_JWT_LEN: usize = 8 * 1024;

/// `[jwt]`: which identity provider's tokens to accept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The JWKS file with the provider's public keys (relative paths are relative to the
    /// configuration file's directory).
    pub jwks: PathBuf,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of them, when the token lists several).
    pub audience: String,
    /// The claim listing the device ids a token is good for.
    #[serde(default = "default_claim")]
    pub devices_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// The longest a token may be valid for, seconds: one whose `exp` is further away (or, with
    /// `iat`, further from its issue) is refused, since a JWT is a bearer credential until then.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime_secs: u64,
}

fn default_max_lifetime() -> u64 {
    24 * 3600
}

fn default_claim() -> String {
    "tunnel_devices".into()
}

fn default_leeway() -> u64 {
    60
}

/// Why a JWT was refused (for the local log; peers see only "token rejected").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// The JWKS file could not be read or holds no usable key.
    #[error("JWKS '{path}': {reason}")]
    Jwks {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Not a well-formed JWT, or too long.
    #[error("not a well-formed JWT")]
    Malformed,
    /// Signed with an algorithm other than ES256 or RS256.
    #[error("algorithm {0} is not accepted (only ES256 and RS256)")]
    Algorithm(String),
    /// No key of the JWKS verifies it.
    #[error("no key of the JWKS verifies the signature")]
    Signature,
    /// `iss` or `aud` is wrong, or a claim is missing or malformed.
    #[error("claims rejected: {0}")]
    Claims(String),
    /// Expired, or not valid yet.
    #[error("expired or not yet valid")]
    Time,
    /// Valid for longer than `max_lifetime_secs`.
    #[error("valid for longer than max_lifetime_secs allows")]
    Lifetime,
    /// The header names critical extensions (`crit`), which this verifier does not implement.
    #[error("the token requires extensions this verifier does not implement (crit: {0})")]
    Critical(String),
    /// The device claim does not name this device.
    #[error("not valid for device '{0}'")]
    Device(String),
}

/// What a valid JWT says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtClaims {
    /// `sub`, if any.
    pub subject: Option<String>,
    /// `exp` (seconds since the Unix epoch): the token is a credential until then.
    pub expires: u64,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Checks JWTs against one provider's keys.
pub struct JwtVerifier {
    config: JwtConfig,
    keys: Vec<Key>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.config.issuer)
            .field("audience", &self.config.audience)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// Whether `token` has the shape of a JWT (three dot-separated parts), as opposed to a
/// server-connect token (which never contains a dot).
pub fn looks_like_jwt(token: &str) -> bool {
    token.len() <= MAX_JWT_LEN && token.split('.').count() == 3
}

#[derive(Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

impl JwtVerifier {
    /// Reads the JWKS file of `config`; a relative path is taken relative to `base`.
    ///
    /// # Errors
    /// [`JwtError::Jwks`].
    pub fn load(config: &JwtConfig, base: &Path) -> Result<Self, JwtError> {
        let path = if config.jwks.is_absolute() {
            config.jwks.clone()
        } else {
            base.join(&config.jwks)
        };
        let text = std::fs::read_to_string(&path).map_err(|e| JwtError::Jwks {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Self::from_jwks(config, &text).map_err(|reason| JwtError::Jwks { path, reason })
    }

    /// Builds a verifier from JWKS text.
    ///
    /// # Errors
    /// What is wrong with the JWKS (not JSON, no ES256/RS256 key).
    pub fn from_jwks(config: &JwtConfig, jwks: &str) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_str(jwks).map_err(|e| e.to_string())?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let alg = match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
        }
        if keys.is_empty() {
            return Err("holds no P-256 (ES256) or RSA (RS256) key".into());
        }
        Ok(Self {
            config: config.clone(),
            keys,
        })
    }

    /// The issuer whose tokens it accepts.
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// Checks `token` for `device_id` at `now` (seconds since the Unix epoch).
    ///
    /// # Errors
    /// [`JwtError`] saying why it was refused.
    pub fn verify(&self, token: &str, device_id: &str, now: u64) -> Result<JwtClaims, JwtError> {
        if !looks_like_jwt(token) {
            return Err(JwtError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        if let Some(crit) = critical_extensions(token)? {
            return Err(JwtError::Critical(crit));
        }
        if !matches!(header.alg, Algorithm::ES256 | Algorithm::RS256) {
            return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        // Time is checked below against `now` (this module reads no clock).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let candidates = self.keys.iter().filter(|k| {
            k.alg == header.alg && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
        });
        let mut last = JwtError::Signature;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => return self.check(data.claims, device_id, now),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => {
                            JwtError::Signature
                        }
                        K::InvalidIssuer => JwtError::Claims("wrong issuer".into()),
                        K::InvalidAudience => JwtError::Claims("wrong audience".into()),
                        K::MissingRequiredClaim(c) => JwtError::Claims(format!("no {c}")),
                        _ => JwtError::Claims(e.to_string()),
                    };
                    if last != JwtError::Signature {
                        // The signature verified; the claims are what is wrong.
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn check(&self, claims: Claims, device_id: &str, now: u64) -> Result<JwtClaims, JwtError> {
        let leeway = self.config.leeway_secs;
        if claims.exp.saturating_add(leeway) <= now {
            return Err(JwtError::Time);
        }
        let max = self.config.max_lifetime_secs;
        if claims.exp > now.saturating_add(max).saturating_add(leeway)
            || claims
                .iat
                .is_some_and(|iat| claims.exp.saturating_sub(iat) > max)
        {
            return Err(JwtError::Lifetime);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(leeway))
        {
            return Err(JwtError::Time);
        }
        let names = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s == device_id,
            serde_json::Value::Array(a) => a.iter().any(|x| x.as_str() == Some(device_id)),
            _ => false,
        };
        if !claims
            .rest
            .get(&self.config.devices_claim)
            .is_some_and(names)
        {
            return Err(JwtError::Device(device_id.to_string()));
        }
        Ok(JwtClaims {
            subject: claims.sub,
            expires: claims.exp,
        })
    }
}

/// The `crit` header parameter of `token`, if it has one (any value: this verifier implements no
/// extension, so every one is unknown).
fn critical_extensions(token: &str) -> Result<Option<String>, JwtError> {
    use base64::Engine as _;
    let head = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| JwtError::Malformed)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    Ok(header.get("crit").map(|c| {
        let text = c.to_string();
        text.chars().take(64).collect()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use jsonwebtoken::{EncodingKey, Header};
    use p256::elliptic_curve::sec1::ToEncodedPoint;

    const NOW: u64 = 1_800_000_000;

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

    fn config() -> JwtConfig {
        JwtConfig {
            jwks: "jwks.json".into(),
            issuer: "https://id.example".into(),
            audience: "tunnel".into(),
            devices_claim: default_claim(),
            leeway_secs: 60,
            max_lifetime_secs: default_max_lifetime(),
        }
    }

    struct Provider {
        key: SecretKey,
        ec: EncodingKey,
        rsa: EncodingKey,
        jwks: String,
    }

    fn provider() -> Provider {
        let key = SecretKey::generate();
        let der = key.to_pkcs8_der();
        let secret = p256::SecretKey::from_pkcs8_der(&der).unwrap();
        let point = secret.public_key().to_encoded_point(false);
        let rsa_der = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/jwt-rsa-test.pkcs1.der"),
        )
        .unwrap();
        let modulus = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/jwt-rsa-test.modulus.hex"),
        )
        .unwrap();
        let n = hex::decode(modulus.trim()).unwrap();
        let jwks = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "ec1", "alg": "ES256", "use": "sig",
             "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())},
            {"kty": "RSA", "kid": "rsa1", "alg": "RS256", "use": "sig",
             "n": b64(&n), "e": b64(&[1, 0, 1])},
            {"kty": "oct", "kid": "hmac", "k": b64(b"shared secret")}
        ]});
        Provider {
            key,
            ec: EncodingKey::from_ec_der(&der),
            rsa: EncodingKey::from_rsa_der(&rsa_der),
            jwks: jwks.to_string(),
        }
    }

    use p256::pkcs8::DecodePrivateKey;

    fn claims(devices: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "iss": "https://id.example", "aud": "tunnel", "sub": "alice",
            "exp": NOW + 300, "nbf": NOW - 10, "tunnel_devices": devices,
        })
    }

    fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &serde_json::Value) -> String {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, claims, key).unwrap()
    }

    #[test]
    fn es256_and_rs256_tokens_for_the_device_pass() {
        let p = provider();
        let v = JwtVerifier::from_jwks(&config(), &p.jwks).unwrap();
        let c = claims(serde_json::json!(["cam-1", "cam-2"]));
        for token in [
            sign(Algorithm::ES256, "ec1", &p.ec, &c),
            sign(Algorithm::RS256, "rsa1", &p.rsa, &c),
        ] {
            assert!(looks_like_jwt(&token));
            assert_eq!(
                v.verify(&token, "cam-2", NOW),
                Ok(JwtClaims {
                    subject: Some("alice".into()),
                    expires: NOW + 300,
                })
            );
            assert_eq!(
                v.verify(&token, "cam-3", NOW),
                Err(JwtError::Device("cam-3".into()))
            );
        }
        // A single string names one device.
        let t = sign(Algorithm::ES256, "ec1", &p.ec, &claims("cam-9".into()));
        assert!(v.verify(&t, "cam-9", NOW).is_ok());
    }

    #[test]
    fn every_wrong_token_is_refused() {
        let p = provider();
        let v = JwtVerifier::from_jwks(&config(), &p.jwks).unwrap();
        let good = claims(serde_json::json!(["cam"]));
        let with = |k: &str, val: serde_json::Value| {
            let mut c = good.clone();
            c[k] = val;
            sign(Algorithm::ES256, "ec1", &p.ec, &c)
        };
        let other = EncodingKey::from_ec_der(&SecretKey::generate().to_pkcs8_der());
        let hmac = EncodingKey::from_secret(b"shared secret");
        let cases = [
            (with("exp", (NOW - 61).into()), JwtError::Time),
            (with("nbf", (NOW + 61).into()), JwtError::Time),
            (
                with("iss", "https://evil".into()),
                JwtError::Claims("wrong issuer".into()),
            ),
            (
                with("aud", "other".into()),
                JwtError::Claims("wrong audience".into()),
            ),
            (
                sign(Algorithm::ES256, "ec1", &other, &good),
                JwtError::Signature,
            ),
            (
                sign(Algorithm::HS256, "hmac", &hmac, &good),
                JwtError::Algorithm("HS256".into()),
            ),
            ("a.b".into(), JwtError::Malformed),
            ("x.y.z".into(), JwtError::Malformed),
        ];
        for (token, want) in cases {
            assert_eq!(v.verify(&token, "cam", NOW), Err(want), "{token}");
        }
        // Within the leeway, still good.
        assert!(
            v.verify(&with("exp", (NOW - 30).into()), "cam", NOW)
                .is_ok()
        );
        // No exp at all.
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove("exp");
        let t = sign(Algorithm::ES256, "ec1", &p.ec, &c);
        assert!(v.verify(&t, "cam", NOW).is_err());
        // A flipped signature byte.
        let mut t = sign(Algorithm::ES256, "ec1", &p.ec, &good).into_bytes();
        let last = t.len() - 2;
        t[last] = if t[last] == b'A' { b'B' } else { b'A' };
        assert!(
            v.verify(std::str::from_utf8(&t).unwrap(), "cam", NOW)
                .is_err()
        );
    }

    /// Issue 18: a `crit` header naming an unknown extension was accepted (RFC 7515 requires
    /// refusal), and so was a token valid until 2^64 - 1.
    #[test]
    fn critical_extensions_and_endless_tokens_are_refused() {
        let p = provider();
        let v = JwtVerifier::from_jwks(&config(), &p.jwks).unwrap();
        let body = b64(claims(serde_json::json!(["cam"])).to_string().as_bytes());
        let signed = |header: serde_json::Value| {
            let input = format!("{}.{body}", b64(header.to_string().as_bytes()));
            format!("{input}.{}", b64(&p.key.sign(input.as_bytes())))
        };
        let plain = signed(serde_json::json!({"alg": "ES256", "kid": "ec1"}));
        assert!(
            v.verify(&plain, "cam", NOW).is_ok(),
            "the hand-made token is valid"
        );
        let crit = signed(serde_json::json!(
            {"alg": "ES256", "kid": "ec1", "crit": ["urn:x-ext"], "urn:x-ext": true}
        ));
        assert!(matches!(
            v.verify(&crit, "cam", NOW),
            Err(JwtError::Critical(c)) if c.contains("urn:x-ext")
        ));
        let good = claims(serde_json::json!(["cam"]));
        let with = |k: &str, val: serde_json::Value| {
            let mut c = good.clone();
            c[k] = val;
            sign(Algorithm::ES256, "ec1", &p.ec, &c)
        };
        assert_eq!(
            v.verify(&with("exp", u64::MAX.into()), "cam", NOW),
            Err(JwtError::Lifetime)
        );
        assert_eq!(
            v.verify(&with("exp", (NOW + 86_400 + 120).into()), "cam", NOW),
            Err(JwtError::Lifetime)
        );
        let mut old = good.clone();
        old["iat"] = (NOW - 100_000).into();
        assert_eq!(
            v.verify(&sign(Algorithm::ES256, "ec1", &p.ec, &old), "cam", NOW),
            Err(JwtError::Lifetime)
        );
        old["iat"] = (NOW - 100).into();
        assert!(
            v.verify(&sign(Algorithm::ES256, "ec1", &p.ec, &old), "cam", NOW)
                .is_ok()
        );
    }

    #[test]
    fn jwks_without_usable_keys_is_refused() {
        let err = JwtVerifier::from_jwks(&config(), r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#)
            .unwrap_err();
        assert!(err.contains("no P-256"), "{err}");
        assert!(JwtVerifier::from_jwks(&config(), "not json").is_err());
        let e = JwtVerifier::load(&config(), Path::new("/nonexistent")).unwrap_err();
        assert!(matches!(e, JwtError::Jwks { .. }));
        assert!(!looks_like_jwt("abcDEF234"));
    }
}
