//! The client's `known_devices.toml`: devices pinned by key fingerprint, like ssh's
//! `known_hosts`.
//!
//! Kind: pure parsing and lookup, with [`KnownDevices::load`] / [`KnownDevices::save`] at the
//! edge (mode 0600: the file holds server-connect tokens; a file others can read is refused).

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, HostPort, RelayRef, ValueError, check_id};
use crate::fsutil;
use crate::identity::Fingerprint;
use crate::secret::Secret;

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
    /// Server-connect token for remote connections (or a JWT of the device's identity
    /// provider).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sct: Option<Secret>,
    /// Relays the device is attached to (tried in parallel with the direct addresses).
    #[serde(default, rename = "relay", skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<RelayRef>,
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
            if d.addresses.is_empty() && d.relays.is_empty() {
                return Err(ValueError(format!(
                    "device '{}' has no addresses and no relays",
                    d.name
                )));
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
            Err(fsutil::PrivateReadError::Untrusted(reason)) => {
                return Err(ConfigError::Untrusted {
                    path: path.to_owned(),
                    reason,
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

    /// The sample shipped in `examples/config/` stays valid.
    #[test]
    fn shipped_sample_parses() {
        let known =
            KnownDevices::from_toml(include_str!("../../../examples/config/known_devices.toml"))
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
                    relays: vec![RelayRef {
                        addr: "relay.example.net:5593".parse().unwrap(),
                        fingerprint: fp2,
                    }],
                },
                KnownDevice {
                    name: "nas".into(),
                    fingerprint: fp2,
                    addresses: vec!["nas.lan:5592".parse().unwrap()],
                    device_id: None,
                    user: None,
                    sct: None,
                    relays: Vec::new(),
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
