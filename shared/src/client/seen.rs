//! `seen.json` in the client home: when and by which path each device was last reached, for
//! `tunnel-client devices`.
//!
//! Kind: pure model, with [`Seen::load`] / [`ClientHome::record_seen`] at the file edge. The file
//! is a cache written by the client (atomically, 0600, under a lock): it decides nothing, so a
//! corrupt one is replaced rather than stopping the program. Entries are keyed by the device's
//! key fingerprint (a renamed device keeps its record; a forgotten and re-paired one starts over).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{ClientError, ClientHome};
use crate::fsutil::{self, LockFile};
use crate::identity::Fingerprint;

/// The longest path text kept (paths are short: `relayed via HOST:PORT over TCP`).
const MAX_PATH_LEN: usize = 200;

/// One device's last successful connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenEntry {
    /// `direct`, `relayed via RELAY`, `direct (punched)`, …
    pub path: String,
    /// The address that answered (a virtual one when relayed).
    pub addr: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

impl SeenEntry {
    /// `direct, 3 min ago` style text for a table, relative to `now`.
    pub fn describe(&self, now: SystemTime) -> String {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        format!("{}, {}", self.path, ago(now.saturating_sub(self.at)))
    }
}

/// A duration in the past, in its largest whole unit.
fn ago(secs: u64) -> String {
    match secs {
        0..60 => "just now".to_string(),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// Every device's last connection, by fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Fingerprint (64 hex) → entry.
    pub devices: BTreeMap<String, SeenEntry>,
}

impl Seen {
    /// The entry of the device with key `fp`.
    pub fn get(&self, fp: &Fingerprint) -> Option<&SeenEntry> {
        self.devices.get(&fp.to_string())
    }

    /// Loads `path`: missing or unreadable as JSON is empty (with a warning for the latter).
    pub fn load(path: &Path) -> Self {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "ignoring a corrupt last-seen file: {e}");
                Self::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot read the last-seen file: {e}");
                Self::default()
            }
        }
    }
}

impl ClientHome {
    /// `seen.json`.
    pub fn seen_path(&self) -> std::path::PathBuf {
        self.dir().join("seen.json")
    }

    /// When and how each device was last reached.
    pub fn seen(&self) -> Seen {
        Seen::load(&self.seen_path())
    }

    /// Records that the device with key `fp` was reached now by `path` at `addr`.
    ///
    /// # Errors
    /// File errors (the caller usually logs them: this file only informs `devices`).
    pub fn record_seen(
        &self,
        fp: &Fingerprint,
        path: &str,
        addr: SocketAddr,
    ) -> Result<(), ClientError> {
        let lock_path = self.dir().join("seen.lock");
        let _lock = LockFile::acquire(&lock_path).map_err(ClientError::io(&lock_path))?;
        let file = self.seen_path();
        let mut seen = Seen::load(&file);
        let mut path = path.to_string();
        if path.len() > MAX_PATH_LEN {
            let mut cut = MAX_PATH_LEN;
            while !path.is_char_boundary(cut) {
                cut -= 1;
            }
            path.truncate(cut);
        }
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        seen.devices.insert(
            fp.to_string(),
            SeenEntry {
                path,
                addr: addr.to_string(),
                at,
            },
        );
        let json = serde_json::to_vec_pretty(&seen).map_err(|e| ClientError::Io {
            path: file.clone(),
            source: std::io::Error::other(e),
        })?;
        fsutil::write_atomic(&file, &json, 0o600).map_err(ClientError::io(&file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_corrupt_files_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let home = ClientHome::new(dir.path().join("c"));
        home.identity().unwrap();
        let fp = crate::identity::SecretKey::generate().fingerprint();
        assert!(home.seen().get(&fp).is_none());
        home.record_seen(&fp, "direct", "127.0.0.1:5592".parse().unwrap())
            .unwrap();
        let e = home.seen().get(&fp).cloned().unwrap();
        assert_eq!(
            (e.path.as_str(), e.addr.as_str()),
            ("direct", "127.0.0.1:5592")
        );
        assert!(
            e.describe(SystemTime::now())
                .starts_with("direct, just now")
        );
        std::fs::write(home.seen_path(), b"{not json").unwrap();
        assert_eq!(home.seen(), Seen::default());
        let long = "x".repeat(500);
        home.record_seen(&fp, &long, "127.0.0.1:1".parse().unwrap())
            .unwrap();
        assert_eq!(home.seen().get(&fp).unwrap().path.len(), MAX_PATH_LEN);
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(ago(5), "just now");
        assert_eq!(ago(150), "2 min ago");
        assert_eq!(ago(7300), "2 h ago");
        assert_eq!(ago(3 * 86_400), "3 days ago");
    }
}
