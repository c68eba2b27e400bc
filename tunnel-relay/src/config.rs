//! `relay.toml`: where the relay listens, its limits, and the devices it serves (each an id with
//! the fingerprint of the only key that may attach as it).
//!
//! Kind: pure (parsing, validation and comment-keeping edits of the text); the file itself is
//! read and written by [`crate::home`].

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tunnel_core::identity::Fingerprint;
use tunnel_core::jwt::JwtConfig;
use tunnel_core::limits::HandshakeLimits;
use tunnel_core::transport::TransportSettings;

/// The relay's default UDP port.
pub const DEFAULT_PORT: u16 = 5593;

/// `relay.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// UDP addresses to listen on.
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Also listen on TCP at each listen address (same port), for legs from networks that block
    /// UDP (TLS 1.3, the relay's key).
    #[serde(default = "yes")]
    pub tcp: bool,
    /// Resource limits.
    #[serde(default)]
    pub limits: RelayLimits,
    /// QUIC tuning of the legs.
    #[serde(default)]
    pub transport: TransportSettings,
    /// Tokens from an external identity provider, accepted besides the devices' own tokens.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// The devices this relay serves.
    #[serde(default, rename = "device")]
    pub devices: Vec<RelayDevice>,
    /// A fleet of relays sharing a registry in Redis (none: this relay alone, in memory).
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
    /// Prometheus metrics (read at start; off unless `listen` is set).
    #[serde(default)]
    pub metrics: tunnel_core::metrics::MetricsConfig,
}

/// `[fleet]`: relays that share a registry of which relay each device is attached to, so a
/// client that asks one relay for a device attached to another is redirected there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The Redis URL (`redis://[:PASSWORD@]HOST:PORT[/DB]`, or `rediss://` for TLS); secret,
    /// since it may hold a password.
    pub redis: tunnel_core::secret::Secret,
    /// Where clients redirected to this relay reach it (`host:port`, its public address).
    pub advertise: String,
    /// Seconds a registry entry lives unless refreshed (refreshed every third of it).
    #[serde(default = "default_ttl")]
    pub ttl_secs: u64,
    /// Prefix of the registry's keys (several fleets may share one Redis).
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_ttl() -> u64 {
    30
}

fn default_prefix() -> String {
    "tunnel-relay".into()
}

fn yes() -> bool {
    true
}

fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))]
}

/// A device the relay serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayDevice {
    /// Its id (what clients ask for).
    pub id: String,
    /// The only key that may attach as it.
    pub fingerprint: Fingerprint,
}

/// The relay's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayLimits {
    /// Legs (device and client connections) at once; more are refused ("busy").
    pub max_legs: u32,
    /// Client channels to one device at once.
    pub max_channels_per_device: u32,
    /// Of `max_channels_per_device`, the channels only the device's owners' tokens may take (so
    /// other token holders cannot fill the device's channels; at most half is held back).
    pub owner_reserved_channels: u32,
    /// Channels one token (or JWT subject) may hold to a device at once, whatever keys it comes
    /// with (owners' tokens: only the device's cap). Keys are free; tokens are not.
    pub max_channels_per_token: u32,
    /// Channels one client key may hold at once (over all devices).
    pub max_channels_per_client: u32,
    /// Seconds a new leg has to finish its handshake and first frame.
    pub handshake_timeout_secs: u64,
    /// Handshakes in flight above which unproven sources get a QUIC Retry first.
    pub retry_threshold: u32,
    /// Handshakes in flight from one source (an IPv4 address or an IPv6 /64).
    pub max_handshakes_per_source: u32,
    /// Handshakes in flight in total.
    pub max_handshakes: u32,
    /// Failed connects (unknown device, rejected token) one source may make in a burst ...
    pub failed_connects_burst: u32,
    /// ... and then per minute.
    pub failed_connects_per_minute: u32,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_legs: 8192,
            max_channels_per_device: 256,
            owner_reserved_channels: 32,
            max_channels_per_token: 16,
            max_channels_per_client: 64,
            handshake_timeout_secs: 10,
            retry_threshold: 64,
            max_handshakes_per_source: 16,
            max_handshakes: 1024,
            failed_connects_burst: 10,
            failed_connects_per_minute: 12,
        }
    }
}

impl RelayLimits {
    /// The handshake gate's limits.
    pub fn handshakes(&self) -> HandshakeLimits {
        let n = |v: u32| usize::try_from(v).unwrap_or(usize::MAX);
        HandshakeLimits {
            retry_threshold: n(self.retry_threshold),
            per_source: n(self.max_handshakes_per_source),
            total: n(self.max_handshakes),
            reserved: 0,
        }
    }
}

/// `relay.toml` is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Checks a device id: 1-64 characters from `A-Z a-z 0-9 . _ -`, starting with a letter or digit
/// (the same rule as the device's own `device_id`).
///
/// # Errors
/// [`ConfigError`] saying what is wrong.
pub fn check_device_id(id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "device id '{id}' must be 1-64 characters from A-Z a-z 0-9 . _ - and start with a \
             letter or digit"
        )))
    }
}

impl RelayConfig {
    /// Parses and validates `relay.toml`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the line or the setting.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let c: Self = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError("listen needs at least one address".into()));
        }
        self.transport
            .validate()
            .map_err(|e| ConfigError(e.to_string()))?;
        let l = &self.limits;
        if [
            l.max_legs,
            l.max_channels_per_device,
            l.max_channels_per_token,
            l.max_channels_per_client,
            l.max_handshakes,
            l.max_handshakes_per_source,
            l.failed_connects_burst,
            l.failed_connects_per_minute,
        ]
        .contains(&0)
        {
            return Err(ConfigError(
                "every count in [limits] must be at least 1".into(),
            ));
        }
        if !(1..=300).contains(&l.handshake_timeout_secs) {
            return Err(ConfigError(
                "limits.handshake_timeout_secs must be 1-300".into(),
            ));
        }
        if let Some(f) = &self.fleet {
            if !(6..=3600).contains(&f.ttl_secs) {
                return Err(ConfigError("fleet.ttl_secs must be 6-3600".into()));
            }
            if f.advertise
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(ConfigError(
                    "fleet.advertise must be HOST:PORT, the address clients reach this relay at"
                        .into(),
                ));
            }
            if !(f.redis.expose().starts_with("redis://")
                || f.redis.expose().starts_with("rediss://"))
            {
                return Err(ConfigError(
                    "fleet.redis must be a redis:// or rediss:// URL".into(),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.devices {
            check_device_id(&d.id)?;
            if !seen.insert(d.id.as_str()) {
                return Err(ConfigError(format!(
                    "device '{}' appears twice in relay.toml",
                    d.id
                )));
            }
        }
        Ok(())
    }

    /// The device with `id`.
    pub fn device(&self, id: &str) -> Option<&RelayDevice> {
        self.devices.iter().find(|d| d.id == id)
    }
}

/// A new `relay.toml` with the defaults written out as comments.
pub fn template(listen: &[SocketAddr]) -> String {
    let listen: Vec<String> = listen.iter().map(|a| format!("\"{a}\"")).collect();
    let l = RelayLimits::default();
    format!(
        "# tunnel-relay configuration. Devices are added with `tunnel-relay device add ID \
         --fingerprint FP`.\n\
         listen = [{}]\n\
         # tcp = true                         # also TCP (TLS) on the same ports, for UDP-blocked networks\n\
         \n\
         [limits]\n\
         # max_legs = {}                    # device and client connections at once\n\
         # max_channels_per_device = {}      # clients of one device at once\n\
         # owner_reserved_channels = {}       # of those, kept for the device's owners\n\
         # max_channels_per_token = {}        # channels of one token (one user) at once\n\
         # max_channels_per_client = {}       # channels of one client key at once\n\
         # handshake_timeout_secs = {}\n\
         # retry_threshold = {}               # handshakes in flight before QUIC Retry\n\
         # max_handshakes_per_source = {}\n\
         # max_handshakes = {}\n\
         # failed_connects_burst = {}         # then failed_connects_per_minute = {}\n\
         \n\
         # [metrics]\n\
         # listen = \"127.0.0.1:9464\"          # Prometheus metrics at http://ADDR/metrics (read at start)\n\
         \n\
         # [fleet]                            # several relays sharing a registry (docs/RELAY.md)\n\
         # redis = \"redis://127.0.0.1:6379/\"\n\
         # advertise = \"relay-1.example.net:5593\" # where clients redirected here reach this relay\n\
         # ttl_secs = 30\n\
         \n\
         # [jwt]                              # accept JWTs of an identity provider besides tokens\n\
         # jwks = \"jwks.json\"                 # relative to this file\n\
         # issuer = \"https://id.example.com\"\n\
         # audience = \"tunnel\"\n\
         # devices_claim = \"tunnel_devices\"   # the claim listing the device ids a JWT is good for\n\
         # max_lifetime_secs = 86400          # refuse JWTs valid for longer\n",
        listen.join(", "),
        l.max_legs,
        l.max_channels_per_device,
        l.owner_reserved_channels,
        l.max_channels_per_token,
        l.max_channels_per_client,
        l.handshake_timeout_secs,
        l.retry_threshold,
        l.max_handshakes_per_source,
        l.max_handshakes,
        l.failed_connects_burst,
        l.failed_connects_per_minute,
    )
}

/// `text` with device `id` added (or its fingerprint replaced), comments kept.
///
/// # Errors
/// [`ConfigError`] when the text is not valid TOML or the id is invalid.
pub fn add_device_to_toml(text: &str, id: &str, fp: &Fingerprint) -> Result<String, ConfigError> {
    check_device_id(id)?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| ConfigError(e.to_string()))?;
    let arr = doc
        .entry("device")
        .or_insert_with(|| toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .ok_or_else(|| ConfigError("'device' in relay.toml must be [[device]] tables".into()))?;
    if let Some(t) = arr
        .iter_mut()
        .find(|t| t.get("id").and_then(toml_edit::Item::as_str) == Some(id))
    {
        t["fingerprint"] = toml_edit::value(fp.to_string());
    } else {
        let mut t = toml_edit::Table::new();
        t["id"] = toml_edit::value(id);
        t["fingerprint"] = toml_edit::value(fp.to_string());
        arr.push(t);
    }
    Ok(doc.to_string())
}

/// `text` without device `id`; `None` when it was not there.
///
/// # Errors
/// [`ConfigError`] when the text is not valid TOML.
pub fn remove_device_from_toml(text: &str, id: &str) -> Result<Option<String>, ConfigError> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| ConfigError(e.to_string()))?;
    let Some(arr) = doc
        .get_mut("device")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
    else {
        return Ok(None);
    };
    let before = arr.len();
    arr.retain(|t| t.get("id").and_then(toml_edit::Item::as_str) != Some(id));
    if arr.len() == before {
        return Ok(None);
    }
    Ok(Some(doc.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint::from_bytes([b; 32])
    }

    #[test]
    fn template_parses_with_defaults_and_edits_keep_comments() {
        let t = template(&default_listen());
        let c = RelayConfig::from_toml(&t).unwrap();
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.limits, RelayLimits::default());
        assert!(c.devices.is_empty());
        let t = add_device_to_toml(&t, "cam-1", &fp(1)).unwrap();
        let t = add_device_to_toml(&t, "cam-2", &fp(2)).unwrap();
        let t = add_device_to_toml(&t, "cam-1", &fp(3)).unwrap();
        assert!(t.contains("# max_legs"), "comments kept:\n{t}");
        let c = RelayConfig::from_toml(&t).unwrap();
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.device("cam-1").unwrap().fingerprint, fp(3));
        let t = remove_device_from_toml(&t, "cam-1").unwrap().unwrap();
        assert!(remove_device_from_toml(&t, "cam-1").unwrap().is_none());
        let c = RelayConfig::from_toml(&t).unwrap();
        assert_eq!(c.devices.len(), 1);
        assert!(c.device("cam-1").is_none());
    }

    #[test]
    fn a_fleet_parses_and_its_url_stays_out_of_debug() {
        let c = RelayConfig::from_toml(
            "[fleet]\nredis = \"redis://:hunter2@10.0.0.5:6379/\"\nadvertise = \"r1.example.net:5593\"\n",
        )
        .unwrap();
        let f = c.fleet.as_ref().unwrap();
        assert_eq!((f.ttl_secs, f.prefix.as_str()), (30, "tunnel-relay"));
        assert!(c.tcp, "TCP is on by default");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn invalid_files_say_why() {
        let f = fp(9).to_string();
        let cases = [
            ("listen = []\n", "at least one"),
            ("bogus = 1\n", "unknown field"),
            (
                "[fleet]\nredis = \"redis://h:6379/\"\nadvertise = \"h\"\n",
                "fleet.advertise must be HOST:PORT",
            ),
            (
                "[fleet]\nredis = \"http://h/\"\nadvertise = \"h:1\"\n",
                "redis:// or rediss://",
            ),
            (
                "[fleet]\nredis = \"redis://h/\"\nadvertise = \"h:1\"\nttl_secs = 1\n",
                "ttl_secs must be 6-3600",
            ),
            (
                &format!("[[device]]\nid = \"a b\"\nfingerprint = \"{f}\"\n") as &str,
                "must be 1-64",
            ),
            (
                &format!(
                    "[[device]]\nid = \"a\"\nfingerprint = \"{f}\"\n[[device]]\nid = \"a\"\n\
                     fingerprint = \"{f}\"\n"
                ),
                "appears twice",
            ),
            (
                "[[device]]\nid = \"a\"\nfingerprint = \"xyz\"\n",
                "fingerprint",
            ),
            ("[limits]\nmax_legs = 0\n", "at least 1"),
            ("[transport]\nkeep_alive_secs = 0\n", "keep_alive"),
        ];
        for (text, needle) in cases {
            let err = RelayConfig::from_toml(text).unwrap_err().0;
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        assert!(add_device_to_toml("", "bad id", &fp(1)).is_err());
    }
}
