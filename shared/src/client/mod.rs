//! The client: its home (key and pinned devices, [`known`]), sessions with a device (connecting,
//! typed control calls), pairing ([`pair`]) and the long-running port forwarder ([`open`]).
//!
//! Kind: IO. The binaries use only this module's typed API; the wire protocol stays in
//! [`crate::wire`] and [`crate::proto`].
//!
//! A connection attempt tries the device's addresses in order. The TLS verifier accepts only the
//! pinned fingerprint; a different key is reported as [`ConnectError::FingerprintMismatch`] with
//! both fingerprints, and is never retried or "accepted". A device that closes the connection
//! with an application code (unknown key, revoked, token rejected…) yields
//! [`ConnectError::Refused`]. Remote connections present the server-connect token stored with the
//! device.

mod dial;
mod error;
pub mod forwarder;
pub mod forwards;
pub mod known;
pub mod open;
pub mod pair;
mod relayed;
mod seen;
mod session;
pub mod stdio;
pub mod up;

use std::path::{Path, PathBuf};

/// What a device tells a client: these travel in the typed answers of [`Session`].
pub use crate::proto::{Invite, PairingInfo, ServiceInfo, Settings, UserInfo, Welcome};
pub use dial::{DIRECT_HEAD_START, Target, connect, connect_to, dial};
pub use error::{ClientError, ConnectError, LookupError, Mismatch};
pub use forwards::ForwardsFile;
pub use known::{KnownDevice, KnownDevices};
pub use relayed::{Channel, Dialer};
pub use seen::{Seen, SeenEntry};
pub use session::{ConnectOptions, Session, SessionPath, connect_paired};

use crate::config::{HostPort, RelayRef};
use crate::fsutil::{self, LockFile};
use crate::identity::{self, Fingerprint};
use crate::secret::Secret;
use crate::transport::Identity;

/// The relays a device named, then those pinned here that it did not name (a relay may have
/// another address from the client's side of the network), at most 8.
fn merge_relays(told: &[RelayRef], pinned: &[RelayRef]) -> Vec<RelayRef> {
    let mut out = told.to_vec();
    for r in pinned {
        if !out.contains(r) {
            out.push(r.clone());
        }
    }
    out.truncate(8);
    out
}

/// File layout of a client home directory.
#[derive(Debug, Clone)]
pub struct ClientHome {
    dir: PathBuf,
}

impl ClientHome {
    /// The home at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `client.key`.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// `known_devices.toml`.
    pub fn known_path(&self) -> PathBuf {
        self.dir.join("known_devices.toml")
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("known_devices.lock")
    }

    /// Loads the client key, creating the home and the key on first use.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn identity(&self) -> Result<Identity, ClientError> {
        self.ensure_dir()?;
        let (key, created) = identity::load_or_create_key(&self.key_path())?;
        if created {
            tracing::info!(
                fingerprint = %key.fingerprint(),
                path = %self.key_path().display(),
                "created a new client key"
            );
        }
        Ok(Identity::new(key)?)
    }

    /// Creates the home (0700) if it is missing.
    pub(crate) fn ensure_dir(&self) -> Result<(), ClientError> {
        fsutil::ensure_private_dir(&self.dir).map_err(ClientError::io(&self.dir))
    }

    /// The pinned devices.
    ///
    /// # Errors
    /// [`ClientError::Config`] for a corrupt file.
    pub fn known_devices(&self) -> Result<KnownDevices, ClientError> {
        Ok(KnownDevices::load(&self.known_path())?)
    }

    /// Finds a pinned device by name, id or fingerprint prefix.
    ///
    /// # Errors
    /// [`ClientError::Lookup`] or a file error.
    pub fn find_device(&self, query: &str) -> Result<KnownDevice, ClientError> {
        Ok(self.known_devices()?.find(query)?.clone())
    }

    /// Locked read-modify-write of `known_devices.toml`.
    ///
    /// # Errors
    /// `change`'s error or file errors; the file is unchanged on error.
    pub fn update_known<R>(
        &self,
        change: impl FnOnce(&mut KnownDevices) -> Result<R, ClientError>,
    ) -> Result<R, ClientError> {
        self.ensure_dir()?;
        let lock_path = self.lock_path();
        let _lock = LockFile::acquire(&lock_path).map_err(ClientError::io(&lock_path))?;
        let mut known = self.known_devices()?;
        let out = change(&mut known)?;
        known.save(&self.known_path())?;
        Ok(out)
    }

    /// Pins a device by hand (like adding a `known_hosts` line): its direct addresses and/or
    /// relays (a relay knows the device by its id, so relays need `device_id`).
    ///
    /// # Errors
    /// [`ClientError::NameTaken`] when the name is already pinned, [`ClientError::NoAddress`]
    /// with neither an address nor a relay, [`ClientError::NeedsDeviceId`] for relays without
    /// the id.
    pub fn add_device(
        &self,
        name: &str,
        addresses: Vec<HostPort>,
        fingerprint: Fingerprint,
        sct: Option<Secret>,
        relays: Vec<RelayRef>,
        device_id: Option<String>,
    ) -> Result<KnownDevice, ClientError> {
        crate::config::check_id("device name", name)?;
        if addresses.is_empty() && relays.is_empty() {
            return Err(ClientError::NoAddress);
        }
        if !relays.is_empty() && device_id.is_none() {
            return Err(ClientError::NeedsDeviceId);
        }
        if let Some(id) = &device_id {
            crate::config::check_id("device id", id)?;
        }
        self.update_known(|known| {
            if let Some(d) = known.devices.iter().find(|d| d.name == name) {
                return Err(ClientError::NameTaken {
                    name: d.name.clone(),
                    fingerprint: d.fingerprint,
                });
            }
            let dev = KnownDevice {
                name: name.to_string(),
                fingerprint,
                addresses,
                device_id,
                user: None,
                sct,
                relays,
            };
            known.devices.push(dev.clone());
            Ok(dev)
        })
    }

    /// Saves a device learned by pairing: a new entry, or an update of the entry with the same
    /// name *and* fingerprint. A name pinned to another key is never overwritten.
    ///
    /// # Errors
    /// [`ClientError::PinnedToOtherKey`] for a name pinned to another key.
    pub fn save_paired(&self, dev: KnownDevice) -> Result<KnownDevice, ClientError> {
        self.update_known(
            |known| match known.devices.iter_mut().find(|d| d.name == dev.name) {
                Some(d) if d.fingerprint != dev.fingerprint => Err(ClientError::PinnedToOtherKey {
                    name: d.name.clone(),
                    fingerprint: d.fingerprint,
                }),
                Some(d) => {
                    *d = dev.clone();
                    Ok(dev)
                }
                None => {
                    known.devices.push(dev.clone());
                    Ok(dev)
                }
            },
        )
    }

    /// Removes a pinned device.
    ///
    /// # Errors
    /// [`ClientError::Lookup`] when nothing matches.
    pub fn forget(&self, query: &str) -> Result<KnownDevice, ClientError> {
        self.update_known(|known| {
            let name = known.find(query)?.name.clone();
            let idx = known
                .devices
                .iter()
                .position(|d| d.name == name)
                .ok_or_else(|| LookupError::NotFound(query.to_string()))?;
            Ok(known.devices.remove(idx))
        })
    }

    /// Records what a device told us about itself on connect (id, user, the user's token when
    /// known, its relays when it said), if anything changed.
    ///
    /// # Errors
    /// File errors.
    pub fn remember(
        &self,
        name: &str,
        welcome: &Welcome,
        sct: Option<&Secret>,
        relays: Option<&[RelayRef]>,
    ) -> Result<(), ClientError> {
        let known = self.known_devices()?;
        let unchanged = known.devices.iter().any(|d| {
            d.name == name
                && d.device_id.as_deref() == Some(welcome.device_id.as_str())
                && d.user == welcome.user
                && sct.is_none_or(|s| d.sct.as_ref() == Some(s))
                && relays.is_none_or(|r| d.relays == merge_relays(r, &d.relays))
        });
        if unchanged {
            return Ok(());
        }
        self.update_known(|known| {
            if let Some(d) = known.devices.iter_mut().find(|d| d.name == name) {
                d.device_id = Some(welcome.device_id.clone());
                d.user.clone_from(&welcome.user);
                if let Some(s) = sct {
                    d.sct = Some(s.clone());
                }
                if let Some(r) = relays {
                    d.relays = merge_relays(r, &d.relays);
                }
            }
            Ok(())
        })
    }
}
