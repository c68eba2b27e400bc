//! The fleet's registry in Redis: which relay each device is attached to, and the hashes of the
//! tokens that may reach it, so a relay can check a client's token and redirect it to the relay
//! that has the device.
//!
//! Kind: IO.
//!
//! One key per device, `{prefix}:device:{id}`, holding JSON `{relay, addr, tokens}` (the
//! attached relay's fingerprint and advertised address, the device's token hashes in hex) with
//! a TTL of `ttl_secs`. The relay that holds the device writes it at attach, at every token
//! change, and every third of the TTL; it deletes it when the device leaves (if the key still
//! names this relay). A relay that dies stops refreshing, and its entries expire.
//!
//! Redis down: every operation fails within [`OP_TIMEOUT`]; the relay keeps serving the devices
//! attached to it, and a client asking for one attached elsewhere is refused with
//! `REGISTRY_UNAVAILABLE`, which says why.

use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};
use tunnel_core::identity::Fingerprint;
use tunnel_core::relay::{MAX_TOKENS, TokenHash};

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
    /// The device's token hashes.
    pub(crate) tokens: Vec<TokenHash>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    relay: String,
    addr: String,
    tokens: Vec<String>,
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
    /// A registry for `fleet`, as relay `me`. Connects lazily: a Redis that is down at start
    /// does not stop the relay.
    ///
    /// # Errors
    /// The URL does not parse.
    pub(crate) fn new(fleet: &FleetConfig, me: Fingerprint) -> Result<Self, String> {
        let client = redis::Client::open(fleet.redis.expose())
            .map_err(|e| format!("fleet.redis is not a usable Redis URL ({:?})", e.kind()))?;
        Ok(Self {
            client,
            conn: Mutex::new(None),
            prefix: fleet.prefix.clone(),
            ttl: fleet.ttl_secs,
            me,
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

    /// Records that `device_id` is attached here, with its token hashes.
    pub(crate) async fn announce(
        &self,
        device_id: &str,
        tokens: &[TokenHash],
    ) -> Result<(), RegistryError> {
        let value = serde_json::to_string(&Stored {
            relay: self.me.to_string(),
            addr: self.advertise.clone(),
            tokens: tokens.iter().map(|t| hex::encode(t.0)).collect(),
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

    /// Where `device_id` is attached, if anywhere. An entry that does not parse counts as
    /// none (and is logged): it never lets a client through.
    pub(crate) async fn lookup(&self, device_id: &str) -> Result<Option<Entry>, RegistryError> {
        let key = self.key(device_id);
        let raw: Option<String> = self.run(async move |c| c.get(key).await).await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let parsed = serde_json::from_str::<Stored>(&raw).ok().and_then(|s| {
            let tokens = s
                .tokens
                .iter()
                .take(MAX_TOKENS)
                .map(|t| {
                    let mut h = [0u8; 32];
                    hex::decode_to_slice(t, &mut h).ok().map(|()| TokenHash(h))
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Entry {
                relay: s.relay.parse().ok()?,
                addr: s.addr,
                tokens,
            })
        });
        if parsed.is_none() {
            warn!(device = %device_id, "the registry's entry for the device does not parse; ignored");
        }
        Ok(parsed)
    }
}
