//! Human-edited configuration: the device's `device.toml` and the client's `known_devices.toml`,
//! plus the small value types users type on the command line (`HOST:PORT`, `ID=HOST:PORT`).
//!
//! Kind: pure parsing and validation ("parse, don't validate": every value that leaves this module
//! is typed and checked), with `load`/`save` helpers at the edge that read and write files.
//! Unknown fields are errors. A file that fails to parse is an error naming the file, never an
//! empty default.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::fsutil;
use crate::identity::Fingerprint;
use crate::secret::Secret;

/// Default UDP port of a device.
pub const DEFAULT_PORT: u16 = 5592;

/// The default device home: `$XDG_DATA_HOME/tunnel-device`, else `~/.local/share/tunnel-device`.
pub fn default_device_home() -> Option<PathBuf> {
    xdg_dir("XDG_DATA_HOME", ".local/share").map(|d| d.join("tunnel-device"))
}

/// The default client home: `$XDG_CONFIG_HOME/tunnel-client`, else `~/.config/tunnel-client`.
pub fn default_client_home() -> Option<PathBuf> {
    xdg_dir("XDG_CONFIG_HOME", ".config").map(|d| d.join("tunnel-client"))
}

fn xdg_dir(var: &str, fallback: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() && Path::new(&v).is_absolute() => Some(PathBuf::from(v)),
        _ => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(fallback)),
    }
}

/// A configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("'{path}': {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file does not parse; the message carries line and column.
    #[error("'{path}' is not valid: {message}", path = .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        message: String,
    },
    /// The file parses but a value is not acceptable.
    #[error("'{path}': {message}", path = .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A value typed by a user is malformed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ValueError(pub String);

// ---------------------------------------------------------------------------------------------
// Value types
// ---------------------------------------------------------------------------------------------

/// A host: an IP address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A syntactically valid DNS name, resolved when used.
    Dns(String),
}

impl FromStr for Host {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bare = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        if is_dns_name(s) {
            Ok(Self::Dns(s.to_ascii_lowercase()))
        } else {
            Err(ValueError(format!(
                "'{s}' is neither an IP address nor a valid host name"
            )))
        }
    }
}

fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // An all-numeric name is a malformed IPv4 address, not a host name.
        && !s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Dns(name) => f.write_str(name),
        }
    }
}

/// `HOST:PORT` where HOST is an IPv4 address, `[IPv6]` or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// The host.
    pub host: Host,
    /// The port (never 0).
    pub port: u16,
}

impl HostPort {
    /// Resolves to socket addresses (DNS names through the system resolver).
    ///
    /// # Errors
    /// The resolver's error, or "no addresses".
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        match &self.host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, self.port)]),
            Host::Dns(name) => {
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), self.port))
                    .await?
                    .collect();
                if addrs.is_empty() {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("'{name}' has no addresses"),
                    ))
                } else {
                    Ok(addrs)
                }
            }
        }
    }
}

impl FromStr for HostPort {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| ValueError(format!("'{s}' must be HOST:PORT")))?;
        if host.contains(':') && !host.starts_with('[') {
            return Err(ValueError(format!(
                "'{s}': write IPv6 addresses in brackets, e.g. [::1]:{port}"
            )));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| ValueError(format!("'{s}': '{port}' is not a port number")))?;
        if port == 0 {
            return Err(ValueError(format!("'{s}': port 0 is not a valid target")));
        }
        Ok(Self {
            host: host.parse()?,
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            host => write!(f, "{host}:{}", self.port),
        }
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Checks an identifier (service id, device id, user name): 1–64 characters from
/// `[A-Za-z0-9._-]`, starting with a letter or digit.
///
/// # Errors
/// [`ValueError`] naming `what`.
pub fn check_id(what: &str, s: &str) -> Result<(), ValueError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ValueError(format!(
            "{what} '{s}' must be 1-64 characters from A-Z a-z 0-9 . _ - and start with a letter \
             or digit"
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// device.toml
// ---------------------------------------------------------------------------------------------

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
    /// Concurrent client connections; more are refused.
    pub max_connections: u32,
    /// Concurrent tunnelled TCP connections per client connection; more wait for a slot.
    pub max_streams_per_connection: u32,
    /// Concurrent tunnelled TCP connections over all clients; more are reset with "limit reached".
    pub max_streams_total: u32,
    /// Seconds to wait for a service's target to accept a TCP connection.
    pub connect_timeout_secs: u64,
    /// Seconds a new connection has to complete the handshake and send its hello.
    pub handshake_timeout_secs: u64,
    /// Concurrent connections of keys on no user (which can only pair); more are refused.
    pub max_unpaired_connections: u32,
    /// Seconds a connection of a key on no user may stay open without pairing.
    pub unpaired_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_streams_per_connection: 1024,
            max_streams_total: 16384,
            connect_timeout_secs: 5,
            handshake_timeout_secs: 10,
            max_unpaired_connections: 16,
            unpaired_timeout_secs: 120,
        }
    }
}

/// QUIC transport tuning shared by both ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSettings {
    /// A connection with no packets for this long is dead.
    pub idle_timeout_secs: u64,
    /// Interval of keep-alive packets (keeps NAT bindings open).
    pub keep_alive_secs: u64,
    /// Per-stream receive window in bytes (bounds one stream's in-flight data).
    pub stream_window: u64,
    /// Per-connection receive window in bytes (bounds all streams' in-flight data).
    pub connection_window: u64,
    /// Requested UDP socket buffer size in bytes.
    pub socket_buffer: usize,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            idle_timeout_secs: 15,
            keep_alive_secs: 4,
            stream_window: 8 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            socket_buffer: 4 * 1024 * 1024,
        }
    }
}

impl TransportSettings {
    /// Checks the ranges.
    ///
    /// # Errors
    /// A message naming the bad setting.
    pub fn validate(&self) -> Result<(), ValueError> {
        if !(1..=600).contains(&self.idle_timeout_secs) {
            return Err(ValueError(
                "transport.idle_timeout_secs must be 1-600".into(),
            ));
        }
        if self.keep_alive_secs == 0 || self.keep_alive_secs >= self.idle_timeout_secs {
            return Err(ValueError(
                "transport.keep_alive_secs must be at least 1 and below idle_timeout_secs".into(),
            ));
        }
        if !(64 * 1024..=1 << 30).contains(&self.stream_window) {
            return Err(ValueError(
                "transport.stream_window must be between 64 KiB and 1 GiB".into(),
            ));
        }
        if self.connection_window < self.stream_window || self.connection_window > 1 << 32 {
            return Err(ValueError(
                "transport.connection_window must be at least stream_window and at most 4 GiB"
                    .into(),
            ));
        }
        if !(64 * 1024..=256 * 1024 * 1024).contains(&self.socket_buffer) {
            return Err(ValueError(
                "transport.socket_buffer must be between 64 KiB and 256 MiB".into(),
            ));
        }
        Ok(())
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
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            remote_access: true,
            trust_private_networks: true,
            local_networks: Vec::new(),
            mdns: true,
            advertise: Vec::new(),
        }
    }
}

impl NetworkSettings {
    /// Whether a connection from `ip` is local.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        (self.trust_private_networks && is_private(ip))
            || self.local_networks.iter().any(|n| n.contains(ip))
    }
}

/// Loopback, link-local, RFC 1918 or ULA.
pub fn is_private(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unicast_link_local() || (v6.segments()[0] & 0xfe00) == 0xfc00
        }
    }
}

/// An IP network, `ADDR/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || {
            ValueError(format!(
                "'{s}' is not a network like 192.168.7.0/24 or fd00::/8"
            ))
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(err());
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
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
        if self.name.trim().is_empty() || self.name.chars().count() > 64 {
            return Err(ValueError("name must be 1-64 characters".into()));
        }
        if self.listen.is_empty() {
            return Err(ValueError("listen must hold at least one address".into()));
        }
        let l = &self.limits;
        if l.max_connections == 0
            || l.max_streams_per_connection == 0
            || l.max_streams_total == 0
            || l.max_unpaired_connections == 0
        {
            return Err(ValueError("limits must be at least 1".into()));
        }
        if !(1..=300).contains(&l.connect_timeout_secs)
            || !(1..=300).contains(&l.handshake_timeout_secs)
        {
            return Err(ValueError("limits.*_timeout_secs must be 1-300".into()));
        }
        if !(10..=86_400).contains(&l.unpaired_timeout_secs) {
            return Err(ValueError(
                "limits.unpaired_timeout_secs must be 10-86400".into(),
            ));
        }
        self.transport.validate()?;
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
             # max_connections = {}             # concurrent clients\n\
             # max_streams_per_connection = {}  # concurrent tunnelled TCP connections per client\n\
             # max_streams_total = {}          # concurrent tunnelled TCP connections in all\n\
             # connect_timeout_secs = {}          # to reach a service's target\n\
             # handshake_timeout_secs = {}       # for a new client to authenticate\n\
             # max_unpaired_connections = {}     # keys on no user (they can only pair)\n\
             # unpaired_timeout_secs = {}       # time such a key has to pair\n",
            l.max_connections,
            l.max_streams_per_connection,
            l.max_streams_total,
            l.connect_timeout_secs,
            l.handshake_timeout_secs,
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

// ---------------------------------------------------------------------------------------------
// known_devices.toml (client)
// ---------------------------------------------------------------------------------------------

/// The client's pinned devices (like `known_hosts`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownDevices {
    /// One entry per device.
    #[serde(default, rename = "device")]
    pub devices: Vec<KnownDevice>,
}

/// One pinned device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownDevice {
    /// Local name chosen by the user.
    pub name: String,
    /// The device's pinned key fingerprint.
    pub fingerprint: Fingerprint,
    /// Where to reach it, tried in order.
    pub addresses: Vec<HostPort>,
    /// The device's own id, learned on first connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The user this client is paired as, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Server-connect token for remote connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sct: Option<Secret>,
}

/// A device reference could not be resolved.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    /// Nothing matched.
    #[error("no known device matches '{0}'; `tunnel-client devices` lists them")]
    NotFound(String),
    /// More than one device matched.
    #[error("'{query}' matches several devices ({names}); use a name or a longer fingerprint")]
    Ambiguous {
        /// What was asked.
        query: String,
        /// The matching names.
        names: String,
    },
}

impl KnownDevices {
    /// Parses and validates the file's text.
    ///
    /// # Errors
    /// [`ValueError`] with line information or naming the bad entry.
    pub fn from_toml(text: &str) -> Result<Self, ValueError> {
        let known: Self = toml::from_str(text).map_err(|e| ValueError(e.to_string()))?;
        let mut names = HashSet::new();
        for d in &known.devices {
            check_id("device name", &d.name)?;
            if !names.insert(d.name.as_str()) {
                return Err(ValueError(format!(
                    "device name '{}' appears twice",
                    d.name
                )));
            }
            if d.addresses.is_empty() {
                return Err(ValueError(format!("device '{}' has no addresses", d.name)));
            }
        }
        Ok(known)
    }

    /// The file as TOML.
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# Devices this client trusts, pinned by key fingerprint (like ssh's known_hosts).\n\
             # Managed by `tunnel-client device add|forget` and `tunnel-client pair`.\n\n",
        );
        // Serializing plain strings, numbers and arrays into TOML cannot fail.
        out.push_str(&toml::to_string(self).unwrap_or_default());
        out
    }

    /// Loads `path`; a missing file is an empty list, a corrupt one an error.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match fsutil::read_private(path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
                path: path.to_owned(),
                message: "not UTF-8 text".into(),
            })?,
            Err(fsutil::PrivateReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(fsutil::PrivateReadError::TooOpen(mode)) => {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    message: format!(
                        "permissions {mode:04o} are too open: it holds server-connect tokens. \
                         Fix it with: chmod 600 '{}'",
                        path.display()
                    ),
                });
            }
            Err(fsutil::PrivateReadError::Io(source)) => {
                return Err(ConfigError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::from_toml(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.0,
        })
    }

    /// Writes `path` atomically, mode 0600 (it holds tokens).
    ///
    /// # Errors
    /// [`ConfigError::Io`].
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        fsutil::write_atomic(path, self.to_toml().as_bytes(), 0o600).map_err(|source| {
            ConfigError::Io {
                path: path.to_owned(),
                source,
            }
        })
    }

    /// Finds a device by exact name, exact device id, or fingerprint prefix (≥ 16 hex).
    ///
    /// # Errors
    /// [`LookupError`].
    pub fn find(&self, query: &str) -> Result<&KnownDevice, LookupError> {
        if let Some(d) = self.devices.iter().find(|d| d.name == query) {
            return Ok(d);
        }
        let matches: Vec<&KnownDevice> = self
            .devices
            .iter()
            .filter(|d| {
                d.device_id.as_deref() == Some(query) || d.fingerprint.matches_prefix(query)
            })
            .collect();
        match matches.as_slice() {
            [] => Err(LookupError::NotFound(query.to_string())),
            [one] => Ok(one),
            many => Err(LookupError::Ambiguous {
                query: query.to_string(),
                names: many
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
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
            ("device_id = \"a\"\nname = \n", "line 2"),
        ];
        for (text, needle) in cases {
            let err = DeviceConfig::from_toml(text).unwrap_err().0;
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn host_port_parsing() {
        let ok = [
            ("127.0.0.1:22", "127.0.0.1:22"),
            ("[::1]:22", "[::1]:22"),
            ("Example.COM:80", "example.com:80"),
            ("cam_1.lan:554", "cam_1.lan:554"),
        ];
        for (input, shown) in ok {
            assert_eq!(input.parse::<HostPort>().unwrap().to_string(), shown);
        }
        for bad in [
            "127.0.0.1",
            "::1:22",
            "host:0",
            "host:99999",
            ":22",
            "a b:1",
            "1.2.3:4",
            "-a:1",
        ] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad}");
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
    fn networks_and_locality() {
        let n: IpNet = "203.0.113.0/24".parse().unwrap();
        assert!(n.contains("203.0.113.77".parse().unwrap()));
        assert!(n.contains("::ffff:203.0.113.1".parse().unwrap()));
        assert!(!n.contains("203.0.114.1".parse().unwrap()));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(
            "0.0.0.0/0"
                .parse::<IpNet>()
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in ["10.0.0.0", "10.0.0.0/33", "::/129", "x/8"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
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

    /// The samples shipped in `examples/config/` stay valid.
    #[test]
    fn shipped_samples_parse() {
        let dev =
            DeviceConfig::from_toml(include_str!("../../examples/config/device.toml")).unwrap();
        assert_eq!(dev.services.len(), 3);
        assert_eq!(dev.listen.len(), 2);
        let known =
            KnownDevices::from_toml(include_str!("../../examples/config/known_devices.toml"))
                .unwrap();
        assert_eq!(known.devices[0].addresses.len(), 2);
    }

    #[test]
    fn known_devices_lookup_and_round_trip() {
        let fp1 = crate::identity::SecretKey::generate().fingerprint();
        let fp2 = crate::identity::SecretKey::generate().fingerprint();
        let known = KnownDevices {
            devices: vec![
                KnownDevice {
                    name: "cam".into(),
                    fingerprint: fp1,
                    addresses: vec!["127.0.0.1:5592".parse().unwrap()],
                    device_id: Some("cam-1".into()),
                    user: None,
                    sct: Some(Secret::new("tok")),
                },
                KnownDevice {
                    name: "nas".into(),
                    fingerprint: fp2,
                    addresses: vec!["nas.lan:5592".parse().unwrap()],
                    device_id: None,
                    user: None,
                    sct: None,
                },
            ],
        };
        let text = known.to_toml();
        assert_eq!(KnownDevices::from_toml(&text).unwrap(), known);
        assert_eq!(known.find("cam").unwrap().name, "cam");
        assert_eq!(known.find("cam-1").unwrap().name, "cam");
        assert_eq!(known.find(&fp2.to_string()[..16]).unwrap().name, "nas");
        assert!(matches!(
            known.find(&fp2.to_string()[..8]),
            Err(LookupError::NotFound(_))
        ));
        assert!(matches!(known.find("tv"), Err(LookupError::NotFound(_))));
    }
}
