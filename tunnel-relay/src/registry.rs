//! The fleet's registry in Redis: which relay each device is attached to, and the hashes of the
//! tokens that may reach it, so a relay can check a client's token and redirect it to the relay
//! that has the device.
//!
//! Kind: IO.
//!
//! One key per device, `{prefix}:device:{id}`, holding JSON `{relay, addr, tokens, expires, key,
//! sig}` (the attached relay's fingerprint and advertised address, the device's token hashes in
//! hex with their owner marks, when the entry stops being valid, and the relay's public key and
//! its signature over all of it) with a TTL of `ttl_secs`. The relay that holds the device
//! writes it at attach, at every token change, and every third of the TTL; it deletes it when
//! the device leaves (if the key still names this relay). A relay that dies stops refreshing,
//! and its entries expire.
//!
//! **Signed.** An entry counts only when it is signed by the key of the relay it names, for
//! this device id, and has not expired: someone who can write to Redis but holds no relay's key
//! cannot point clients at another address or fingerprint, nor change a real relay's entry
//! (issue 18: a rewritten entry sent clients, and their tokens, to an attacker's relay). A
//! client still follows a redirect only to a relay it knows for the device.
//!
//! Redis down: every operation fails within [`OP_TIMEOUT`]; the relay keeps serving the devices
//! attached to it, and a client asking for one attached elsewhere is refused with
//! `REGISTRY_UNAVAILABLE`, which says why.

use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};
use tunnel_core::identity::{Fingerprint, PublicKey, SecretKey};
use tunnel_core::relay::{MAX_TOKENS, TokenEntry, TokenHash};

use crate::config::FleetConfig;

/// How long one registry operation may take (connecting included).
pub(crate) const OP_TIMEOUT: Duration = Duration::from_millis(800);

/// Where a device is, as the registry says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The relay it is attached to.
    pub(crate) relay: Fingerprint,
    /// That relay's advertised address.
    pub(crate) addr: String,
    /// The device's tokens.
    pub(crate) tokens: Vec<TokenEntry>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    relay: String,
    addr: String,
    tokens: Vec<StoredToken>,
    /// Unix seconds after which the entry is void, whatever Redis's TTL says.
    expires: u64,
    /// The relay's public key (DER SPKI, hex): its fingerprint must be `relay`.
    key: String,
    /// Its signature ([`signed_bytes`]), hex.
    sig: String,
}

#[derive(Serialize, Deserialize)]
struct StoredToken {
    hash: String,
    #[serde(default)]
    owner: bool,
}

/// What an entry's signature covers: a label, the device id, the relay, its address, the expiry
/// and every token with its mark.
fn signed_bytes(
    device_id: &str,
    relay: &Fingerprint,
    addr: &str,
    expires: u64,
    tokens: &[TokenEntry],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(128 + tokens.len() * 33);
    m.extend_from_slice(b"tunnel-relay registry entry v1\0");
    for part in [
        device_id.as_bytes(),
        relay.to_string().as_bytes(),
        addr.as_bytes(),
    ] {
        m.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        m.extend_from_slice(part);
    }
    m.extend_from_slice(&expires.to_be_bytes());
    for t in tokens {
        m.extend_from_slice(&t.hash.0);
        m.push(u8::from(t.owner));
    }
    m
}

/// Why the registry could not answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistryError {
    /// Redis answered with an error, or could not be reached.
    #[error("Redis: {0}")]
    Redis(String),
    /// No answer in time.
    #[error("Redis did not answer within {} ms", OP_TIMEOUT.as_millis())]
    Timeout,
}

/// The registry of one relay of a fleet.
pub(crate) struct Registry {
    client: redis::Client,
    conn: Mutex<Option<redis::aio::ConnectionManager>>,
    prefix: String,
    ttl: u64,
    key: SecretKey,
    me: Fingerprint,
    advertise: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client holds the URL, which may hold a password.
        f.debug_struct("Registry")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry for `fleet`, as the relay whose key is `key` (it signs the entries it
    /// writes). Connects lazily: a Redis that is down at start does not stop the relay.
    ///
    /// # Errors
    /// The URL does not parse.
    pub(crate) fn new(fleet: &FleetConfig, key: &SecretKey) -> Result<Self, String> {
        let client = redis::Client::open(fleet.redis.expose())
            .map_err(|e| format!("fleet.redis is not a usable Redis URL ({:?})", e.kind()))?;
        Ok(Self {
            client,
            conn: Mutex::new(None),
            prefix: fleet.prefix.clone(),
            ttl: fleet.ttl_secs,
            me: key.fingerprint(),
            key: key.clone(),
            advertise: fleet.advertise.clone(),
        })
    }

    /// This relay's key.
    pub(crate) fn me(&self) -> Fingerprint {
        self.me
    }

    /// How often attached devices' entries are refreshed.
    pub(crate) fn refresh_every(&self) -> Duration {
        Duration::from_secs((self.ttl / 3).max(1))
    }

    fn key(&self, device_id: &str) -> String {
        format!("{}:device:{device_id}", self.prefix)
    }

    async fn connection(&self) -> Result<redis::aio::ConnectionManager, RegistryError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(OP_TIMEOUT)
            .set_response_timeout(OP_TIMEOUT)
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            OP_TIMEOUT * 2,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| RegistryError::Timeout)?
        .map_err(|e| RegistryError::Redis(e.to_string()))?;
        info!("connected to the fleet's registry");
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn run<T>(
        &self,
        op: impl AsyncFnOnce(&mut redis::aio::ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, RegistryError> {
        let mut c = self.connection().await?;
        match tokio::time::timeout(OP_TIMEOUT, op(&mut c)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(RegistryError::Redis(e.to_string())),
            Err(_) => Err(RegistryError::Timeout),
        }
    }

    /// Records that `device_id` is attached here, with its tokens (signed, valid for the TTL).
    pub(crate) async fn announce(
        &self,
        device_id: &str,
        tokens: &[TokenEntry],
    ) -> Result<(), RegistryError> {
        let expires = crate::server::unix_now().saturating_add(self.ttl);
        let sig = self.key.sign(&signed_bytes(
            device_id,
            &self.me,
            &self.advertise,
            expires,
            tokens,
        ));
        let value = serde_json::to_string(&Stored {
            relay: self.me.to_string(),
            addr: self.advertise.clone(),
            tokens: tokens
                .iter()
                .map(|t| StoredToken {
                    hash: hex::encode(t.hash.0),
                    owner: t.owner,
                })
                .collect(),
            expires,
            key: hex::encode(self.key.public_key().spki_der()),
            sig: hex::encode(sig),
        })
        .map_err(|e| RegistryError::Redis(e.to_string()))?;
        let key = self.key(device_id);
        let ttl = self.ttl;
        self.run(async move |c| c.set_ex::<_, _, ()>(key, value, ttl).await)
            .await
    }

    /// Removes `device_id`'s entry if it still names this relay.
    pub(crate) async fn withdraw(&self, device_id: &str) -> Result<(), RegistryError> {
        if let Some(e) = self.lookup(device_id).await?
            && e.relay == self.me
        {
            let key = self.key(device_id);
            self.run(async move |c| c.del::<_, ()>(key).await).await?;
        }
        Ok(())
    }

    /// Where `device_id` is attached, if anywhere. An entry that does not parse, is not signed
    /// by the relay it names, or has expired counts as none (and is logged): it never lets a
    /// client through, nor sends one anywhere.
    pub(crate) async fn lookup(&self, device_id: &str) -> Result<Option<Entry>, RegistryError> {
        let key = self.key(device_id);
        let raw: Option<String> = self.run(async move |c| c.get(key).await).await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let parsed = parse_entry(device_id, &raw, crate::server::unix_now());
        if let Err(why) = &parsed {
            warn!(device = %device_id, "the registry's entry for the device is ignored: {why}");
        }
        Ok(parsed.ok())
    }
}

/// An entry as stored, checked: it parses, its key is the relay it names, the signature covers
/// this device id and everything in it, and it is valid at `now`.
fn parse_entry(device_id: &str, raw: &str, now: u64) -> Result<Entry, &'static str> {
    let s: Stored = serde_json::from_str(raw).map_err(|_| "it does not parse")?;
    let relay: Fingerprint = s.relay.parse().map_err(|_| "no relay fingerprint")?;
    let tokens = s
        .tokens
        .iter()
        .take(MAX_TOKENS)
        .map(|t| {
            let mut h = [0u8; 32];
            hex::decode_to_slice(&t.hash, &mut h)
                .ok()
                .map(|()| TokenEntry {
                    hash: TokenHash(h),
                    owner: t.owner,
                })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or("a token hash does not parse")?;
    let spki = hex::decode(&s.key).map_err(|_| "no key")?;
    let key = PublicKey::from_spki_der(&spki).map_err(|_| "no key")?;
    if key.fingerprint() != relay {
        return Err("its key is not the relay it names");
    }
    let sig = hex::decode(&s.sig).map_err(|_| "no signature")?;
    if !key.verifies(
        &signed_bytes(device_id, &relay, &s.addr, s.expires, &tokens),
        &sig,
    ) {
        return Err("the signature does not verify (not written by the relay it names)");
    }
    if s.expires <= now {
        return Err("it has expired");
    }
    Ok(Entry {
        relay,
        addr: s.addr,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &SecretKey, device: &str, addr: &str, expires: u64) -> String {
        let tokens = [TokenEntry {
            hash: TokenHash([5; 32]),
            owner: true,
        }];
        let fp = key.fingerprint();
        let sig = key.sign(&signed_bytes(device, &fp, addr, expires, &tokens));
        serde_json::json!({
            "relay": fp.to_string(), "addr": addr,
            "tokens": [{"hash": hex::encode([5; 32]), "owner": true}],
            "expires": expires, "key": hex::encode(key.public_key().spki_der()),
            "sig": hex::encode(sig),
        })
        .to_string()
    }

    /// Issue 18, defect 7: a rewritten registry entry (the real token hashes, an attacker's
    /// address and fingerprint) made a relay redirect clients to the attacker's relay.
    #[test]
    fn only_entries_signed_by_the_relay_they_name_count() {
        let b = SecretKey::generate();
        let good = entry(&b, "cam", "relay-b:5593", 2000);
        let e = parse_entry("cam", &good, 1000).unwrap();
        assert_eq!(
            (e.relay, e.addr.as_str()),
            (b.fingerprint(), "relay-b:5593")
        );
        assert!(e.tokens[0].owner);
        // Another device's entry, moved under this id.
        assert!(parse_entry("cam2", &good, 1000).is_err());
        // Expired.
        assert!(parse_entry("cam", &good, 2000).is_err());
        // B's entry with the address changed by a Redis writer.
        let moved = good.replace("relay-b:5593", "evil:5593");
        assert!(parse_entry("cam", &moved, 1000).is_err());
        // B's entry with a token changed.
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v["tokens"][0]["owner"] = false.into();
        assert!(parse_entry("cam", &v.to_string(), 1000).is_err());
        // The attacker's own entry naming B's fingerprint, signed with the attacker's key.
        let evil = SecretKey::generate();
        let mut v: serde_json::Value =
            serde_json::from_str(&entry(&evil, "cam", "evil:5593", 2000)).unwrap();
        v["relay"] = b.fingerprint().to_string().into();
        assert!(parse_entry("cam", &v.to_string(), 1000).is_err());
        // Unsigned, the old format.
        let old =
            serde_json::json!({"relay": b.fingerprint().to_string(), "addr": "x:1", "tokens": []});
        assert!(parse_entry("cam", &old.to_string(), 1000).is_err());
        assert!(parse_entry("cam", "garbage", 1000).is_err());
    }
}
