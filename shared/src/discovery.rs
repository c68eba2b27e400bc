//! LAN discovery with mDNS: the device announces `_tunnel._udp.local.`; clients browse for it.
//!
//! Kind: IO (the `mdns-sd` crate runs its own thread).
//!
//! The TXT record holds only public facts: `id` (device id), `fp` (key fingerprint) and `name`.
//! Nothing learned from mDNS is trusted: a client that pairs with a discovered device still pins
//! the key it sees in the TLS handshake (trust on first use, shown to the user), and never picks a
//! security mode from TXT data.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::identity::Fingerprint;

/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_tunnel._udp.local.";

/// mDNS failed.
#[derive(Debug, thiserror::Error)]
#[error("mDNS: {0}")]
pub struct DiscoveryError(String);

fn err(e: impl std::fmt::Display) -> DiscoveryError {
    DiscoveryError(e.to_string())
}

/// A running announcement; withdrawn when dropped.
pub struct Announcer {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Announcer({})", self.fullname)
    }
}

impl Announcer {
    /// Announces a device on every multicast-capable interface.
    ///
    /// # Errors
    /// [`DiscoveryError`] when the mDNS daemon cannot start.
    pub fn start(
        device_id: &str,
        name: &str,
        fingerprint: &Fingerprint,
        port: u16,
    ) -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new().map_err(err)?;
        let host = format!("{}.local.", device_id.replace('.', "-"));
        let fp = fingerprint.to_string();
        let props = [("id", device_id), ("fp", fp.as_str()), ("name", name)];
        let info = ServiceInfo::new(SERVICE_TYPE, device_id, &host, (), port, &props[..])
            .map_err(err)?
            .enable_addr_auto();
        let fullname = info.get_fullname().to_string();
        daemon.register(info).map_err(err)?;
        Ok(Self { daemon, fullname })
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

/// A device seen on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its device id (from TXT; unverified).
    pub device_id: String,
    /// Its name (from TXT; unverified).
    pub name: String,
    /// The fingerprint it claims (from TXT; compare it with the one seen when connecting).
    pub fingerprint: Option<Fingerprint>,
    /// Its addresses and port.
    pub addresses: Vec<SocketAddr>,
}

/// Listens for `timeout` and returns every device that answered, sorted by id.
///
/// Blocking: call it from a blocking thread.
///
/// # Errors
/// [`DiscoveryError`] when the mDNS daemon cannot start.
pub fn browse(timeout: Duration) -> Result<Vec<Found>, DiscoveryError> {
    let daemon = ServiceDaemon::new().map_err(err)?;
    let rx = daemon.browse(SERVICE_TYPE).map_err(err)?;
    let deadline = Instant::now() + timeout;
    let mut found: Vec<Found> = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(event) = rx.recv_timeout(left) else {
            break;
        };
        if let ServiceEvent::ServiceResolved(info) = event {
            // IPv6 link-local addresses need a scope to be dialled: leave them out.
            let mut addresses: Vec<SocketAddr> = info
                .get_addresses()
                .iter()
                .map(|ip| SocketAddr::new(ip.to_ip_addr(), info.get_port()))
                .filter(
                    |a| !matches!(a.ip(), std::net::IpAddr::V6(v6) if v6.is_unicast_link_local()),
                )
                .collect();
            addresses.sort();
            let device_id = info
                .get_property_val_str("id")
                .unwrap_or_default()
                .to_string();
            if device_id.is_empty() {
                continue;
            }
            let entry = Found {
                name: info
                    .get_property_val_str("name")
                    .unwrap_or_default()
                    .to_string(),
                fingerprint: info.get_property_val_str("fp").and_then(|f| f.parse().ok()),
                addresses,
                device_id,
            };
            match found.iter_mut().find(|f| f.device_id == entry.device_id) {
                Some(f) => *f = entry,
                None => found.push(entry),
            }
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    let _ = daemon.shutdown();
    found.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    Ok(found)
}
