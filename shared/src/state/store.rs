//! `state.json` on disk: locked, atomic read-modify-write.
//!
//! Kind: IO.

use std::path::{Path, PathBuf};

use super::{CorruptState, DeviceState, Rejection, StateError};
use crate::fsutil::{self, LockFile};

/// The outcome of [`StateStore::update`].
#[derive(Debug)]
pub struct Updated<R> {
    /// The state now.
    pub state: DeviceState,
    /// What the change returned.
    pub value: R,
    /// Whether anything changed (and so was written).
    pub changed: bool,
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
                    reason: CorruptState::TooOpen(mode),
                });
            }
            Err(fsutil::PrivateReadError::Untrusted(reason)) => {
                return Err(StateError::Untrusted {
                    path: self.path.clone(),
                    reason,
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
            Err(Rejection::Exists(self.path.clone()).into())
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
    /// validated result is written atomically (unless it equals what was there: then nothing is
    /// written) and returned with `change`'s value.
    ///
    /// # Errors
    /// `change`'s error, or load/validation/IO errors; the file is then unchanged.
    pub fn update<R>(
        &self,
        change: impl FnOnce(&mut DeviceState) -> Result<R, StateError>,
    ) -> Result<Updated<R>, StateError> {
        let _lock = self.lock()?;
        let before = self.load()?;
        let mut state = before.clone();
        let value = change(&mut state)?;
        state.validate().map_err(Rejection::Invalid)?;
        let changed = state != before;
        if changed {
            fsutil::write_atomic(&self.path, &state.to_json(), 0o600).map_err(|e| self.io(e))?;
        }
        Ok(Updated {
            state,
            value,
            changed,
        })
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
        let mut s = DeviceState::new_device();
        s.add_user("alice", "Owner", SecretKey::generate().fingerprint(), None)
            .unwrap();
        s
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
        store.create(&DeviceState::new_device()).unwrap();
        let fp = SecretKey::generate().fingerprint();
        store
            .update(|s| s.add_user("alice", "Owner", fp, None).map(|_| ()))
            .unwrap();
        // A failed change leaves the file byte-identical.
        let before = std::fs::read(store.path()).unwrap();
        assert!(
            store
                .update(|s| s.add_user("alice", "Guest", fp, None).map(|_| ()))
                .is_err()
        );
        assert_eq!(std::fs::read(store.path()).unwrap(), before);
        let out = store.update(|s| s.remove_user("alice")).unwrap();
        assert_eq!(out.value.username, "alice");
        assert!(out.state.users.is_empty() && out.changed);
        // A change that changes nothing writes nothing (issue 9: no fsync per no-op request).
        let stamp = fsutil::FileStamp::of(store.path());
        let out = store
            .update(|s| s.set_display_name("nobody", None))
            .map(|_| ());
        assert!(out.is_err());
        let out = store.update(|_| Ok(())).unwrap();
        assert!(!out.changed);
        assert_eq!(fsutil::FileStamp::of(store.path()), stamp);
    }
}
