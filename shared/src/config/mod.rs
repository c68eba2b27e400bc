//! Human-edited configuration: the device's `device.toml` ([`device`]) and the small value types
//! users type on the command line ([`values`]: `HOST:PORT`, networks, identifiers). The client's
//! `known_devices.toml` lives with the client (`client::known`).
//!
//! Kind: pure parsing and validation ("parse, don't validate"), with `load` helpers at the edge.
//! Unknown fields are errors. A file that fails to parse is an error naming the file, never an
//! empty default.

pub mod device;
pub mod values;

use std::path::{Path, PathBuf};

pub use device::{
    Congestion, DEFAULT_PORT, DeviceConfig, Limits, NetworkSettings, RelayAttach, ServiceConfig,
    ServiceSpec, TransportSettings, add_relay_to_toml, add_service_to_toml, remove_relay_from_toml,
    remove_service_from_toml, set_name_in_toml,
};
pub use values::{Host, HostPort, IpNet, RelayRef, check_id, is_private};

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
    /// The file (or the directory it is in) could be changed by another local user, or is a
    /// symbolic link: it is not trusted (OpenSSH's `StrictModes`).
    #[error("'{path}' {reason}", path = .path.display())]
    Untrusted {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        reason: crate::fsutil::Untrusted,
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
