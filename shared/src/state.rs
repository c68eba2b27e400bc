//! The device's machine-written state (`state.json`): users and their key fingerprints.
//!
//! Kind: pure model and validation ([`DeviceState`]) plus [`StateStore`], which does the file IO.
//!
//! Invariants:
//! - A missing, truncated or corrupt file is an error naming the file. It never becomes an empty
//!   state, because an empty device could be re-paired by anyone.
//! - Every change is a locked read-modify-write: take `state.lock`, re-read the file, apply the
//!   change, validate, write atomically (mode 0600). The running device and `tunnel-device user …`
//!   therefore never overwrite each other's changes; the device notices the new file and reloads.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::check_id;
use crate::fsutil::{self, LockFile};
use crate::identity::Fingerprint;

/// Current `state.json` format version.
pub const STATE_VERSION: u32 = 1;

/// The whole state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    /// Format version; must equal [`STATE_VERSION`].
    pub version: u32,
    /// Paired users.
    pub users: Vec<User>,
}

/// A user on the device's access-control list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Unique name.
    pub username: String,
    /// Role id (e.g. `Owner`, `Guest`).
    pub role: String,
    /// The client keys that act as this user.
    #[serde(default)]
    pub fingerprints: Vec<UserKey>,
}

/// One client key of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserKey {
    /// The key's fingerprint.
    pub fingerprint: Fingerprint,
    /// Optional label, e.g. "alice's laptop".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A state file or change could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state file does not exist.
    #[error(
        "'{path}' does not exist: this device home is not initialised. Run `tunnel-device init` \
         (or pass the right --home)",
        path = .0.display()
    )]
    Missing(PathBuf),
    /// The state file is corrupt.
    #[error(
        "'{path}' is corrupt: {reason}. The device will not start with a damaged access list; \
         restore it from a backup or fix it by hand",
        path = .path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading, writing or locking failed.
    #[error("'{path}': {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A requested change is not valid (e.g. the user exists).
    #[error("{0}")]
    Rejected(String),
}

impl DeviceState {
    /// A state with no users.
    pub fn empty() -> Self {
        Self {
            version: STATE_VERSION,
            users: Vec::new(),
        }
    }

    /// Parses and validates the file content.
    ///
    /// # Errors
    /// A reason string for [`StateError::Corrupt`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let state: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if state.version != STATE_VERSION {
            return Err(format!(
                "version {} is not supported (expected {STATE_VERSION})",
                state.version
            ));
        }
        state.validate()?;
        Ok(state)
    }

    /// The file content (pretty JSON, trailing newline).
    pub fn to_json(&self) -> Vec<u8> {
        // Plain structs of strings serialize infallibly.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Checks uniqueness of user names and fingerprints and the syntax of names.
    ///
    /// # Errors
    /// A message naming the problem.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        let mut fps = std::collections::HashMap::new();
        for u in &self.users {
            check_id("user name", &u.username).map_err(|e| e.0)?;
            check_id("role", &u.role).map_err(|e| e.0)?;
            if !names.insert(u.username.as_str()) {
                return Err(format!("user '{}' appears twice", u.username));
            }
            for k in &u.fingerprints {
                if let Some(other) = fps.insert(k.fingerprint, u.username.as_str()) {
                    return Err(format!(
                        "key {} belongs to both '{other}' and '{}'",
                        k.fingerprint, u.username
                    ));
                }
            }
        }
        Ok(())
    }

    /// The user owning this key.
    pub fn user_by_fingerprint(&self, fp: &Fingerprint) -> Option<&User> {
        self.users
            .iter()
            .find(|u| u.fingerprints.iter().any(|k| k.fingerprint == *fp))
    }

    /// The user with this name.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.username == name)
    }

    /// Adds a user with one key.
    ///
    /// # Errors
    /// [`StateError::Rejected`] when the name or the key is taken.
    pub fn add_user(
        &mut self,
        username: &str,
        role: &str,
        fingerprint: Fingerprint,
        key_name: Option<String>,
    ) -> Result<(), StateError> {
        check_id("user name", username).map_err(|e| StateError::Rejected(e.0))?;
        if self.user(username).is_some() {
            return Err(StateError::Rejected(format!(
                "user '{username}' already exists"
            )));
        }
        if let Some(owner) = self.user_by_fingerprint(&fingerprint) {
            return Err(StateError::Rejected(format!(
                "key {fingerprint} already belongs to user '{}'",
                owner.username
            )));
        }
        self.users.push(User {
            username: username.to_string(),
            role: role.to_string(),
            fingerprints: vec![UserKey {
                fingerprint,
                name: key_name,
            }],
        });
        Ok(())
    }

    /// Removes a user.
    ///
    /// # Errors
    /// [`StateError::Rejected`] when there is no such user.
    pub fn remove_user(&mut self, username: &str) -> Result<User, StateError> {
        let idx = self
            .users
            .iter()
            .position(|u| u.username == username)
            .ok_or_else(|| StateError::Rejected(format!("there is no user '{username}'")))?;
        Ok(self.users.remove(idx))
    }

    /// Changes a user's role.
    ///
    /// # Errors
    /// [`StateError::Rejected`] when there is no such user.
    pub fn set_role(&mut self, username: &str, role: &str) -> Result<(), StateError> {
        let user = self
            .users
            .iter_mut()
            .find(|u| u.username == username)
            .ok_or_else(|| StateError::Rejected(format!("there is no user '{username}'")))?;
        user.role = role.to_string();
        Ok(())
    }
}

/// `state.json` on disk, with its lock file.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
    lock_path: PathBuf,
}

impl StateStore {
    /// The store for `path` (its lock is `path` with extension `lock`).
    pub fn new(path: PathBuf) -> Self {
        let lock_path = path.with_extension("lock");
        Self { path, lock_path }
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and validates the file.
    ///
    /// # Errors
    /// [`StateError::Missing`], [`StateError::Corrupt`] or [`StateError::Io`].
    pub fn load(&self) -> Result<DeviceState, StateError> {
        let bytes = match fsutil::read_private(&self.path) {
            Ok(b) => b,
            Err(fsutil::PrivateReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::Missing(self.path.clone()));
            }
            Err(fsutil::PrivateReadError::TooOpen(mode)) => {
                return Err(StateError::Corrupt {
                    path: self.path.clone(),
                    reason: format!(
                        "permissions {mode:04o} are too open for a file holding secrets \
                         (chmod 600 it)"
                    ),
                });
            }
            Err(fsutil::PrivateReadError::Io(source)) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        DeviceState::from_json(&bytes).map_err(|reason| StateError::Corrupt {
            path: self.path.clone(),
            reason,
        })
    }

    /// Creates the file with `state` unless it exists.
    ///
    /// # Errors
    /// [`StateError::Rejected`] when a state file already exists, or IO errors.
    pub fn create(&self, state: &DeviceState) -> Result<(), StateError> {
        let _lock = self.lock()?;
        let created = fsutil::create_new_atomic(&self.path, &state.to_json(), 0o600)
            .map_err(|source| self.io(source))?;
        if created {
            Ok(())
        } else {
            Err(StateError::Rejected(format!(
                "'{}' already exists",
                self.path.display()
            )))
        }
    }

    /// Overwrites the file with `state` (used by `init --force`).
    ///
    /// # Errors
    /// IO errors.
    pub fn replace(&self, state: &DeviceState) -> Result<(), StateError> {
        let _lock = self.lock()?;
        fsutil::write_atomic(&self.path, &state.to_json(), 0o600).map_err(|e| self.io(e))
    }

    /// Locked read-modify-write. `change` sees the current file content; when it returns `Ok`, the
    /// validated result is written atomically and returned with `change`'s value.
    ///
    /// # Errors
    /// `change`'s error, or load/validation/IO errors; the file is then unchanged.
    pub fn update<R>(
        &self,
        change: impl FnOnce(&mut DeviceState) -> Result<R, StateError>,
    ) -> Result<(DeviceState, R), StateError> {
        let _lock = self.lock()?;
        let mut state = self.load()?;
        let out = change(&mut state)?;
        state.validate().map_err(StateError::Rejected)?;
        fsutil::write_atomic(&self.path, &state.to_json(), 0o600).map_err(|e| self.io(e))?;
        Ok((state, out))
    }

    fn lock(&self) -> Result<LockFile, StateError> {
        LockFile::acquire(&self.lock_path).map_err(|source| StateError::Io {
            path: self.lock_path.clone(),
            source,
        })
    }

    fn io(&self, source: std::io::Error) -> StateError {
        StateError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    fn sample() -> DeviceState {
        let mut s = DeviceState::empty();
        s.add_user(
            "alice",
            "Owner",
            SecretKey::generate().fingerprint(),
            Some("laptop".into()),
        )
        .unwrap();
        s.add_user("bob", "Guest", SecretKey::generate().fingerprint(), None)
            .unwrap();
        s
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(DeviceState::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn duplicate_names_and_keys_are_rejected() {
        let mut s = sample();
        let fp = s.users[0].fingerprints[0].fingerprint;
        assert!(
            s.add_user("alice", "Guest", SecretKey::generate().fingerprint(), None)
                .is_err()
        );
        assert!(s.add_user("carol", "Guest", fp, None).is_err());
        s.users.push(s.users[0].clone());
        assert!(s.validate().is_err());
    }

    /// Every truncation of a real state file is rejected, and every bit flip is either rejected or
    /// parses into a state with the same users: never into an empty (open-for-pairing) device.
    #[test]
    fn corruption_never_yields_an_empty_device() {
        let s = sample();
        let bytes = s.to_json();
        for cut in 0..bytes.len() - 1 {
            if let Ok(parsed) = DeviceState::from_json(&bytes[..cut]) {
                panic!("truncation at {cut} parsed: {parsed:?}");
            }
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(parsed) = DeviceState::from_json(&b) {
                    assert_eq!(
                        parsed.users.len(),
                        s.users.len(),
                        "flip {i}/{bit} lost a user"
                    );
                    assert!(
                        parsed.users.iter().all(|u| u.fingerprints.len() == 1),
                        "flip {i}/{bit} lost a key"
                    );
                }
            }
        }
    }

    #[test]
    fn store_refuses_missing_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        assert!(matches!(store.load(), Err(StateError::Missing(_))));
        store.create(&sample()).unwrap();
        assert!(store.create(&sample()).is_err());
        let bytes = std::fs::read(store.path()).unwrap();
        fsutil::write_atomic(store.path(), &bytes[..bytes.len() / 2], 0o600).unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("state.json"));
        fsutil::write_atomic(store.path(), b"", 0o600).unwrap();
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
    }

    #[test]
    fn update_is_read_modify_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        store.create(&DeviceState::empty()).unwrap();
        let fp = SecretKey::generate().fingerprint();
        store
            .update(|s| s.add_user("alice", "Owner", fp, None))
            .unwrap();
        // A failed change leaves the file byte-identical.
        let before = std::fs::read(store.path()).unwrap();
        assert!(
            store
                .update(|s| s.add_user("alice", "Guest", fp, None))
                .is_err()
        );
        assert_eq!(std::fs::read(store.path()).unwrap(), before);
        let (state, removed) = store.update(|s| s.remove_user("alice")).unwrap();
        assert_eq!(removed.username, "alice");
        assert!(state.users.is_empty());
    }
}
