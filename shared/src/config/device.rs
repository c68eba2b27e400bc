//! The device's `device.toml`: id, name, listen addresses, limits, transport tuning, network
//! policy and services, plus the comment-keeping edits `tunnel-device service|device` make.
//!
//! Kind: pure parsing and validation, with [`DeviceConfig::load`] at the edge. Unknown fields are
//! errors. A file that fails to parse is an error naming the file, never an empty default.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{ConfigError, Host, HostPort, IpNet, RelayRef, ValueError, check_id, is_private};
pub use tunnel_core::transport::{Congestion, TransportSettings};

/// Default UDP port of a device.
pub const DEFAULT_PORT: u16 = 5592;

/// The device's `device.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Stable identifier of the device, shown to clients.
    pub device_id: String,
    /// Human-friendly name.
    pub name: String,
    /// UDP addresses to listen on.
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// QUIC transport tuning.
    #[serde(default)]
    pub transport: TransportSettings,
    /// Who counts as local, remote access, discovery.
    #[serde(default)]
    pub network: NetworkSettings,
    /// Tokens from an external identity provider, accepted besides the users' own tokens.
    #[serde(default)]
    pub jwt: Option<crate::jwt::JwtConfig>,
    /// Relays the device attaches to, so clients anywhere reach it (docs/RELAY.md).
    #[serde(default, rename = "relay")]
    pub relays: Vec<RelayRef>,
    /// Prometheus metrics (read at start; off unless `listen` is set).
    #[serde(default)]
    pub metrics: crate::metrics::MetricsConfig,
    /// The services clients may tunnel to.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))]
}

/// Resource limits of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent client connections past `Hello`; more are refused with "busy".
    pub max_connections: u32,
    /// Of `max_connections`, the ones only owners (users with the `Owner` role) may take, so
    /// that other users cannot lock them out (at most half of `max_connections` is held back).
    pub owner_reserved_connections: u32,
    /// Concurrent connections of one user (over all its keys); more are refused with "busy".
    pub max_connections_per_user: u32,
    /// Concurrent tunnelled TCP connections per client connection; more wait for a slot.
    pub max_streams_per_connection: u32,
    /// Concurrent tunnel streams of one user over all its connections (headers not yet read
    /// included); more are reset with "limit reached".
    pub max_streams_per_user: u32,
    /// Concurrent tunnelled TCP connections over all clients; more are reset with "limit reached".
    pub max_streams_total: u32,
    /// Seconds to wait for a service's target to accept a TCP connection.
    pub connect_timeout_secs: u64,
    /// Seconds a new connection has to complete the handshake and send its hello.
    pub handshake_timeout_secs: u64,
    /// Seconds a new tunnel stream has to send its header.
    pub header_timeout_secs: u64,
    /// QUIC handshakes in flight above which sources that have not proven their address get a
    /// Retry first.
    pub retry_threshold: u32,
    /// QUIC handshakes in flight from one source (an IPv4 address or an IPv6 /64).
    pub max_handshakes_per_source: u32,
    /// QUIC handshakes in flight in total.
    pub max_handshakes: u32,
    /// Concurrent connections of keys on no user (which can only pair); more are refused.
    pub max_unpaired_connections: u32,
    /// Seconds a connection of a key on no user may stay open without pairing.
    pub unpaired_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            owner_reserved_connections: 16,
            max_connections_per_user: 32,
            max_streams_per_connection: 1024,
            max_streams_per_user: 2048,
            max_streams_total: 16384,
            connect_timeout_secs: 5,
            handshake_timeout_secs: 10,
            header_timeout_secs: 5,
            retry_threshold: 8,
            max_handshakes_per_source: 8,
            max_handshakes: 64,
            max_unpaired_connections: 16,
            unpaired_timeout_secs: 120,
        }
    }
}

impl Limits {
    /// The connections held back for owners: `owner_reserved_connections`, at most half of
    /// `max_connections`.
    pub fn owner_reserve(&self) -> u32 {
        self.owner_reserved_connections
            .min(self.max_connections / 2)
    }

    /// The handshake gate's limits.
    pub fn handshakes(&self) -> crate::limits::HandshakeLimits {
        let n = |v: u32| usize::try_from(v).unwrap_or(usize::MAX);
        crate::limits::HandshakeLimits {
            retry_threshold: n(self.retry_threshold),
            per_source: n(self.max_handshakes_per_source),
            total: n(self.max_handshakes),
            reserved: 0,
        }
    }
}

/// Network policy of a device: what counts as local (DESIGN §6), remote access, discovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSettings {
    /// Accept remote connections at all (they still need a valid server-connect token).
    pub remote_access: bool,
    /// Count loopback, link-local, RFC 1918 and ULA sources as local. Turn off when a proxy or
    /// port forward on this host carries remote traffic.
    pub trust_private_networks: bool,
    /// More source networks that count as local, e.g. `["203.0.113.0/24"]`.
    pub local_networks: Vec<IpNet>,
    /// Announce the device on the LAN with mDNS (`_tunnel._udp.local`: id, fingerprint, name).
    pub mdns: bool,
    /// Addresses put into pairing strings (default: this host's addresses and the listen port).
    pub advertise: Vec<HostPort>,
    /// Attach to every `[[relay]]` (`all`), or to one at a time in list order, moving to the
    /// next when it is lost (`one`: the relays of a fleet, which redirect clients to it).
    pub relay_attach: RelayAttach,
}

/// How a device uses its relays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayAttach {
    /// Every relay at once: each is an independent way in.
    #[default]
    All,
    /// One at a time (a fleet sharing a registry): the first that works, the next when lost.
    One,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            remote_access: true,
            trust_private_networks: true,
            local_networks: Vec::new(),
            mdns: true,
            advertise: Vec::new(),
            relay_attach: RelayAttach::All,
        }
    }
}

impl NetworkSettings {
    /// Whether a connection from `ip` is local.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        // A relayed connection is remote whatever the networks say (DESIGN §6).
        if crate::transport::path::is_virtual(SocketAddr::new(ip, 0)) {
            return false;
        }
        (self.trust_private_networks && is_private(ip))
            || self.local_networks.iter().any(|n| n.contains(ip))
    }
}

/// One named TCP target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service id clients ask for, e.g. `ssh`.
    pub id: String,
    /// Free-form type, e.g. `ssh`, `rtsp`, `http` (IAM conditions can test it).
    #[serde(rename = "type", default = "default_service_type")]
    pub service_type: String,
    /// Target host: IPv4, IPv6 or DNS name.
    #[serde(deserialize_with = "de_host", serialize_with = "ser_display")]
    pub host: Host,
    /// Target TCP port.
    pub port: u16,
    /// Free-form metadata shown to clients (e.g. an RTSP path).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

fn default_service_type() -> String {
    "tcp".into()
}

fn de_host<'de, D: Deserializer<'de>>(d: D) -> Result<Host, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

fn ser_display<S: Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl ServiceConfig {
    /// The target as `HOST:PORT`.
    pub fn target(&self) -> HostPort {
        HostPort {
            host: self.host.clone(),
            port: self.port,
        }
    }

    fn validate(&self) -> Result<(), ValueError> {
        check_id("service id", &self.id)?;
        if self.port == 0 {
            return Err(ValueError(format!(
                "service '{}': port 0 is not valid",
                self.id
            )));
        }
        if self.service_type.is_empty() || self.service_type.len() > 64 {
            return Err(ValueError(format!(
                "service '{}': type must be 1-64 characters",
                self.id
            )));
        }
        Ok(())
    }
}

/// `ID=HOST:PORT[,type=T]` as typed on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec(pub ServiceConfig);

impl FromStr for ServiceSpec {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || ValueError(format!("'{s}' must look like ID=HOST:PORT[,type=TYPE]"));
        let (id, rest) = s.split_once('=').ok_or_else(usage)?;
        let mut parts = rest.split(',');
        let target: HostPort = parts.next().ok_or_else(usage)?.parse()?;
        let mut service_type = None;
        for opt in parts {
            match opt.split_once('=') {
                Some(("type", t)) if !t.is_empty() => service_type = Some(t.to_string()),
                _ => {
                    return Err(ValueError(format!(
                        "'{s}': unknown option '{opt}' (only type=TYPE is accepted)"
                    )));
                }
            }
        }
        let svc = ServiceConfig {
            id: id.to_string(),
            service_type: service_type.unwrap_or_else(|| id.to_string()),
            host: target.host,
            port: target.port,
            metadata: BTreeMap::new(),
        };
        svc.validate()?;
        Ok(Self(svc))
    }
}

impl DeviceConfig {
    /// Parses and validates `device.toml` text.
    ///
    /// # Errors
    /// [`ValueError`] with line information for syntax errors.
    pub fn from_toml(text: &str) -> Result<Self, ValueError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ValueError(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value.
    ///
    /// # Errors
    /// [`ValueError`] naming the offending value.
    pub fn validate(&self) -> Result<(), ValueError> {
        check_id("device_id", &self.device_id)?;
        if self.name.trim().is_empty()
            || self.name.chars().count() > 64
            || self.name.chars().any(char::is_control)
        {
            return Err(ValueError("name must be 1-64 printable characters".into()));
        }
        if self.listen.is_empty() {
            return Err(ValueError("listen must hold at least one address".into()));
        }
        if self.relays.len() > 8 {
            return Err(ValueError("at most 8 [[relay]] entries".into()));
        }
        for (i, r) in self.relays.iter().enumerate() {
            if self.relays[..i].iter().any(|o| o.addr == r.addr) {
                return Err(ValueError(format!(
                    "relay {} appears twice in device.toml",
                    r.addr
                )));
            }
        }
        let l = &self.limits;
        if l.max_connections == 0
            || l.max_streams_per_connection == 0
            || l.max_streams_per_user == 0
            || l.max_streams_total == 0
            || l.max_unpaired_connections == 0
            || l.max_handshakes == 0
            || l.max_handshakes_per_source == 0
            || l.max_connections_per_user == 0
        {
            return Err(ValueError("limits must be at least 1".into()));
        }

        if !(1..=300).contains(&l.connect_timeout_secs)
            || !(1..=300).contains(&l.handshake_timeout_secs)
            || !(1..=300).contains(&l.header_timeout_secs)
        {
            return Err(ValueError("limits.*_timeout_secs must be 1-300".into()));
        }
        if !(10..=86_400).contains(&l.unpaired_timeout_secs) {
            return Err(ValueError(
                "limits.unpaired_timeout_secs must be 10-86400".into(),
            ));
        }
        self.transport
            .validate()
            .map_err(|e| ValueError(e.to_string()))?;
        let mut seen = HashSet::new();
        for svc in &self.services {
            svc.validate()?;
            if !seen.insert(svc.id.as_str()) {
                return Err(ValueError(format!("service id '{}' appears twice", svc.id)));
            }
        }
        Ok(())
    }

    /// Loads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.0,
        })
    }

    /// The service with this id.
    pub fn service(&self, id: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.id == id)
    }

    /// A commented `device.toml` for `init`.
    pub fn to_commented_toml(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# tunnel-device configuration (see docs/CONFIG.md).\n\
             # Edit freely: a running device reloads [[service]] entries when this file changes.\n\n",
        );
        out.push_str(&format!("device_id = {}\n", toml_str(&self.device_id)));
        out.push_str(&format!("name = {}\n", toml_str(&self.name)));
        let listen: Vec<String> = self
            .listen
            .iter()
            .map(|a| toml_str(&a.to_string()))
            .collect();
        out.push_str(&format!(
            "# UDP addresses the device listens on.\nlisten = [{}]\n",
            listen.join(", ")
        ));
        let l = Limits::default();
        out.push_str(&format!(
            "\n[limits]\n\
             # max_connections = {}             # concurrent clients past hello\n\
             # owner_reserved_connections = {}   # of those, kept for owners\n\
             # max_connections_per_user = {}     # concurrent clients of one user\n\
             # max_streams_per_connection = {}  # concurrent tunnelled TCP connections per client\n\
             # max_streams_per_user = {}        # ... per user, over all its connections\n\
             # max_streams_total = {}          # concurrent tunnelled TCP connections in all\n\
             # connect_timeout_secs = {}          # to reach a service's target\n\
             # handshake_timeout_secs = {}       # for a new client to authenticate\n\
             # header_timeout_secs = {}           # for a new tunnel to name its service\n\
             # retry_threshold = {}               # handshakes in flight before QUIC Retry\n\
             # max_handshakes_per_source = {}     # handshakes in flight per address (IPv6: /64)\n\
             # max_handshakes = {}               # handshakes in flight in all\n\
             # max_unpaired_connections = {}     # keys on no user (they can only pair)\n\
             # unpaired_timeout_secs = {}       # time such a key has to pair\n",
            l.max_connections,
            l.owner_reserved_connections,
            l.max_connections_per_user,
            l.max_streams_per_connection,
            l.max_streams_per_user,
            l.max_streams_total,
            l.connect_timeout_secs,
            l.handshake_timeout_secs,
            l.header_timeout_secs,
            l.retry_threshold,
            l.max_handshakes_per_source,
            l.max_handshakes,
            l.max_unpaired_connections,
            l.unpaired_timeout_secs
        ));
        out.push_str(
            "\n[network]\n\
             # remote_access = true           # accept remote connections (they need a server-connect token)\n\
             # trust_private_networks = true  # loopback, link-local, RFC 1918 and ULA sources are local\n\
             # local_networks = []            # more local networks, e.g. [\"203.0.113.0/24\"]\n\
             # mdns = true                    # announce on the LAN as _tunnel._udp.local\n\
             # advertise = []                 # addresses for pairing strings, e.g. [\"cam.example.net:5592\"]\n",
        );
        out.push_str(
            "\n[metrics]\n\
             # listen = \"127.0.0.1:9464\"      # Prometheus metrics at http://ADDR/metrics (read at start)\n",
        );
        for svc in &self.services {
            out.push('\n');
            out.push_str(&service_toml(svc));
        }
        out
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn service_toml(svc: &ServiceConfig) -> String {
    let mut out = format!(
        "[[service]]\nid = {}\ntype = {}\nhost = {}\nport = {}\n",
        toml_str(&svc.id),
        toml_str(&svc.service_type),
        toml_str(&svc.host.to_string()),
        svc.port
    );
    if !svc.metadata.is_empty() {
        let pairs: Vec<String> = svc
            .metadata
            .iter()
            .map(|(k, v)| format!("{} = {}", toml_str(k), toml_str(v)))
            .collect();
        out.push_str(&format!("metadata = {{ {} }}\n", pairs.join(", ")));
    }
    out
}

/// Adds a service to the `device.toml` text, keeping comments and layout.
///
/// # Errors
/// When the text does not parse, the id exists, or the result is invalid.
pub fn add_service_to_toml(text: &str, svc: &ServiceConfig) -> Result<String, ValueError> {
    let current = DeviceConfig::from_toml(text)?;
    if current.service(&svc.id).is_some() {
        return Err(ValueError(format!(
            "service '{}' already exists; remove it first",
            svc.id
        )));
    }
    let mut out = text.to_string();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&service_toml(svc));
    DeviceConfig::from_toml(&out)?;
    Ok(out)
}

/// Adds a `[[relay]]` to the `device.toml` text (or replaces the fingerprint of the relay at
/// that address), keeping everything else.
///
/// # Errors
/// When the text does not parse or the result is not a valid `device.toml`.
pub fn add_relay_to_toml(text: &str, relay: &RelayRef) -> Result<String, ValueError> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| ValueError(e.to_string()))?;
    let arr = doc
        .entry("relay")
        .or_insert_with(|| toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .ok_or_else(|| ValueError("'relay' in device.toml must be [[relay]] tables".into()))?;
    let addr = relay.addr.to_string();
    if let Some(t) = arr
        .iter_mut()
        .find(|t| t.get("addr").and_then(toml_edit::Item::as_str) == Some(addr.as_str()))
    {
        t["fingerprint"] = toml_edit::value(relay.fingerprint.to_string());
    } else {
        let mut t = toml_edit::Table::new();
        t["addr"] = toml_edit::value(addr);
        t["fingerprint"] = toml_edit::value(relay.fingerprint.to_string());
        arr.push(t);
    }
    let out = doc.to_string();
    DeviceConfig::from_toml(&out)?;
    Ok(out)
}

/// Removes the `[[relay]]` at `addr` from the `device.toml` text.
///
/// # Errors
/// When the text does not parse or there is no such relay.
pub fn remove_relay_from_toml(text: &str, addr: &HostPort) -> Result<String, ValueError> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| ValueError(e.to_string()))?;
    let addr = addr.to_string();
    let missing = || ValueError(format!("there is no relay {addr} in device.toml"));
    let arr = doc
        .get_mut("relay")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or_else(missing)?;
    let before = arr.len();
    arr.retain(|t| t.get("addr").and_then(toml_edit::Item::as_str) != Some(addr.as_str()));
    if arr.len() == before {
        return Err(missing());
    }
    Ok(doc.to_string())
}

/// Removes a service from the `device.toml` text, keeping everything else.
///
/// # Errors
/// When the text does not parse or there is no such service.
pub fn remove_service_from_toml(text: &str, id: &str) -> Result<String, ValueError> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| ValueError(e.to_string()))?;
    let services = doc
        .get_mut("service")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or_else(|| ValueError(format!("there is no service '{id}'")))?;
    let before = services.len();
    services.retain(|t| t.get("id").and_then(toml_edit::Item::as_str) != Some(id));
    if services.len() == before {
        return Err(ValueError(format!("there is no service '{id}'")));
    }
    if services.is_empty() {
        doc.remove("service");
    }
    let out = doc.to_string();
    DeviceConfig::from_toml(&out)?;
    Ok(out)
}

/// Sets the device `name` in the `device.toml` text, keeping everything else.
///
/// # Errors
/// When the text does not parse or the name is not 1-64 printable characters.
pub fn set_name_in_toml(text: &str, name: &str) -> Result<String, ValueError> {
    if name.trim().is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(ValueError(
            "a device name is 1-64 printable characters".into(),
        ));
    }
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| ValueError(e.to_string()))?;
    doc["name"] = toml_edit::value(name);
    let out = doc.to_string();
    DeviceConfig::from_toml(&out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
device_id = "cam-1"
name = "Front door"
listen = ["0.0.0.0:5592", "[::]:5592"]

[limits]
max_connections = 10

[[service]]
id = "ssh"
type = "ssh"
host = "127.0.0.1"
port = 22

[[service]]
id = "rtsp"
type = "rtsp"
host = "camera.local"
port = 8554
metadata = { path = "/video" }

[[service]]
id = "v6"
host = "::1"
port = 80
"#;

    #[test]
    fn parses_sample() {
        let cfg = DeviceConfig::from_toml(SAMPLE).unwrap();
        assert_eq!(cfg.listen.len(), 2);
        assert_eq!(cfg.limits.max_connections, 10);
        assert_eq!(cfg.limits.max_streams_per_connection, 1024);
        assert_eq!(cfg.services.len(), 3);
        assert_eq!(cfg.services[1].host, Host::Dns("camera.local".into()));
        assert_eq!(cfg.services[1].metadata["path"], "/video");
        assert_eq!(cfg.services[2].service_type, "tcp");
        assert_eq!(cfg.services[2].target().to_string(), "[::1]:80");
    }

    #[test]
    fn config_errors_are_specific() {
        let cases: &[(&str, &str)] = &[
            (
                "device_id = \"a\"\nname = \"b\"\nbogus = 1\n",
                "unknown field",
            ),
            ("device_id = \"a\"\n", "missing field"),
            (
                "device_id = \"bad id\"\nname = \"b\"\n",
                "device_id 'bad id'",
            ),
            (
                "device_id = \"a\"\nname = \"b\"\n[[service]]\nid = \"x\"\nhost = \"1.2.3.4\"\nport = 0\n",
                "port 0",
            ),
            (
                "device_id = \"a\"\nname = \"b\"\n[[service]]\nid = \"x\"\nhost = \"not a host!\"\nport = 1\n",
                "neither an IP address",
            ),
            (
                "device_id = \"a\"\nname = \"b\"\n[[service]]\nid = \"x\"\nhost = \"h\"\nport = 1\n[[service]]\nid = \"x\"\nhost = \"h\"\nport = 2\n",
                "appears twice",
            ),
            (
                "device_id = \"a\"\nname = \"b\"\nlisten = []\n",
                "at least one",
            ),
            (
                "device_id = \"a\"\nname = \"b\"\n[transport]\nkeep_alive_secs = 30\n",
                "keep_alive",
            ),
            (
                "device_id = \"a\"\nname = \"b\"\n[limits]\nmax_connections = 0\n",
                "at least 1",
            ),
            (
                "device_id = \"a\"\nname = \"b\"\n[transport]\ncongestion = \"vegas\"\n",
                "unknown variant",
            ),
            ("device_id = \"a\"\nname = \n", "line 2"),
        ];
        for (text, needle) in cases {
            let err = DeviceConfig::from_toml(text).unwrap_err().0;
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn congestion_controller_is_bbr_unless_chosen() {
        use crate::config::Congestion;
        let base = "device_id = \"a\"\nname = \"b\"\n";
        let d = DeviceConfig::from_toml(base).unwrap();
        assert_eq!(d.transport.congestion, Congestion::Bbr);
        for (name, want) in [
            ("cubic", Congestion::Cubic),
            ("newreno", Congestion::NewReno),
            ("bbr", Congestion::Bbr),
        ] {
            let text = format!("{base}[transport]\ncongestion = \"{name}\"\n");
            assert_eq!(
                DeviceConfig::from_toml(&text).unwrap().transport.congestion,
                want
            );
        }
    }

    #[test]
    fn service_spec_parsing() {
        let s: ServiceSpec = "ssh=127.0.0.1:22".parse().unwrap();
        assert_eq!(s.0.id, "ssh");
        assert_eq!(s.0.service_type, "ssh");
        let s: ServiceSpec = "cam=[::1]:8554,type=rtsp".parse().unwrap();
        assert_eq!(s.0.service_type, "rtsp");
        assert_eq!(s.0.host, Host::Ip("::1".parse().unwrap()));
        for bad in ["ssh", "ssh=host", "=h:1", "s s=h:1", "ssh=h:1,color=red"] {
            assert!(bad.parse::<ServiceSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn commented_template_round_trips() {
        let cfg = DeviceConfig::from_toml(SAMPLE).unwrap();
        let text = cfg.to_commented_toml();
        let back = DeviceConfig::from_toml(&text).unwrap();
        assert_eq!(back.services, cfg.services);
        assert_eq!(back.listen, cfg.listen);
    }

    #[test]
    fn add_and_remove_service_keep_comments() {
        let text = "# my comment\n".to_string() + SAMPLE;
        let new = ServiceSpec::from_str("web=127.0.0.1:8080,type=http")
            .unwrap()
            .0;
        let added = add_service_to_toml(&text, &new).unwrap();
        assert!(added.contains("# my comment"));
        assert_eq!(DeviceConfig::from_toml(&added).unwrap().services.len(), 4);
        assert!(add_service_to_toml(&added, &new).is_err());
        let removed = remove_service_from_toml(&added, "ssh").unwrap();
        assert!(removed.contains("# my comment"));
        let cfg = DeviceConfig::from_toml(&removed).unwrap();
        assert!(cfg.service("ssh").is_none());
        assert!(cfg.service("web").is_some());
        assert!(remove_service_from_toml(&removed, "ssh").is_err());
    }

    #[test]
    fn locality() {
        let mut net = NetworkSettings::default();
        assert!(net.is_local("127.0.0.1".parse().unwrap()));
        assert!(net.is_local("fd00::1".parse().unwrap()));
        assert!(!net.is_local("198.51.100.2".parse().unwrap()));
        net.local_networks.push("198.51.100.0/24".parse().unwrap());
        assert!(net.is_local("198.51.100.2".parse().unwrap()));
        net.trust_private_networks = false;
        assert!(!net.is_local("127.0.0.1".parse().unwrap()));
        assert!(net.is_local("198.51.100.2".parse().unwrap()));
        let cfg = DeviceConfig::from_toml(
            "device_id = \"a\"\nname = \"b\"\n[network]\nlocal_networks = [\"10.9.0.0/16\"]\nremote_access = false\n",
        )
        .unwrap();
        assert!(!cfg.network.remote_access);
        assert!(
            DeviceConfig::from_toml(
                "device_id = \"a\"\nname = \"b\"\n[network]\nlocal_networks = [\"10.9.0.0\"]\n"
            )
            .is_err()
        );
    }

    /// The sample shipped in `examples/config/` stays valid.
    #[test]
    fn shipped_sample_parses() {
        let dev =
            DeviceConfig::from_toml(include_str!("../../../examples/config/device.toml")).unwrap();
        assert_eq!(dev.services.len(), 3);
        assert_eq!(dev.listen.len(), 2);
    }
}
