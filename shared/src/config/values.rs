//! Small values users type or files hold: `HOST:PORT`, hosts, IP networks, identifiers.
//!
//! Kind: pure ("parse, don't validate": every value that leaves this module is typed and checked),
//! except [`HostPort::resolve`], which asks the system resolver.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ValueError;

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

/// A relay: where it listens and the fingerprint of its key (pinned like a device's).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayRef {
    /// Its UDP address.
    pub addr: HostPort,
    /// Its key.
    pub fingerprint: crate::identity::Fingerprint,
}

impl fmt::Display for RelayRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.addr, self.fingerprint.fmt_short())
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
        // An IPv4-mapped network (`::ffff:10.0.0.0/104`) is the IPv4 network it maps: sources
        // are compared in their canonical form, so it would never match as written.
        if let IpAddr::V6(v6) = addr
            && prefix >= 96
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            return Ok(Self {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            });
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn networks() {
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
        // Issue 9: IPv4-mapped networks are stored as the IPv4 network they map, so they match.
        let mapped: IpNet = "::ffff:10.9.0.0/112".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.9.0.0/16");
        assert!(mapped.contains("10.9.3.4".parse().unwrap()));
        assert!(mapped.contains("::ffff:10.9.3.4".parse().unwrap()));
        assert!(!mapped.contains("10.10.0.1".parse().unwrap()));
    }
}
