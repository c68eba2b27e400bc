//! The device home: where each file lives, how each is loaded, and the locked edit of
//! `device.toml` that both the running device and the offline commands use.
//!
//! Kind: IO (files).

use std::path::{Path, PathBuf};

use super::DeviceError;
use crate::config::{ConfigError, DeviceConfig, ValueError};
use crate::fsutil::{self, LockFile};
use crate::iam::{self, IamConfig, IamError, RoleError};
use crate::state::{DeviceState, StateStore};

/// File layout of a device home directory.
#[derive(Debug, Clone)]
pub struct DeviceHome {
    dir: PathBuf,
}

impl DeviceHome {
    /// The home at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `device.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("device.toml")
    }

    /// `state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// `iam.toml` (optional).
    pub fn iam_path(&self) -> PathBuf {
        self.dir.join("iam.toml")
    }

    /// `device.key`.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("device.key")
    }

    /// Held by a running device.
    pub fn run_lock_path(&self) -> PathBuf {
        self.dir.join("run.lock")
    }

    /// Serializes edits of `device.toml`.
    pub fn config_lock_path(&self) -> PathBuf {
        self.dir.join("device.lock")
    }

    /// The state store.
    pub fn state_store(&self) -> StateStore {
        StateStore::new(self.state_path())
    }

    /// Loads `device.toml`, with a hint when the home is not initialised.
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn load_config(&self) -> Result<DeviceConfig, ConfigError> {
        let path = self.config_path();
        if !path.exists() {
            return Err(ConfigError::Invalid {
                path,
                message: "does not exist: this device home is not initialised. Run \
                          `tunnel-device init` (or pass the right --home)"
                    .into(),
            });
        }
        self.trusted(self.dir())?;
        self.trusted(&path)?;
        DeviceConfig::load(&path)
    }

    /// Refuses a home or file another local user could change (OpenSSH's `StrictModes`): a
    /// group- or world-writable `iam.toml` would let anyone on the machine grant themselves
    /// access.
    fn trusted(&self, path: &Path) -> Result<(), ConfigError> {
        fsutil::check_strict(path).map_err(|reason| ConfigError::Untrusted {
            path: path.to_owned(),
            reason,
        })
    }

    /// Loads `iam.toml`, or the built-in IAM when there is none.
    ///
    /// # Errors
    /// [`IamError`] naming the line, or a file or home another user could change.
    pub fn load_iam(&self) -> Result<IamConfig, IamError> {
        let path = self.iam_path();
        for p in [self.dir(), path.as_path()] {
            match self.trusted(p) {
                Err(ConfigError::Untrusted {
                    reason: fsutil::Untrusted::Io(e),
                    ..
                }) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(IamError {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    });
                }
                Ok(()) => {}
            }
        }
        IamConfig::load(&path)
    }

    /// Loads the state and IAM and checks that every user's role exists.
    ///
    /// # Errors
    /// [`DeviceError`] naming the file and the user.
    pub fn load_checked(&self) -> Result<(DeviceState, IamConfig), DeviceError> {
        self.trusted(self.dir())?;
        let state = self.state_store().load()?;
        let iam = self.load_iam()?;
        check_user_roles(&iam, &state)?;
        Ok((state, iam))
    }

    /// Takes `device.lock` (other editors wait).
    ///
    /// # Errors
    /// [`DeviceError::Io`].
    pub fn lock_config(&self) -> Result<LockFile, DeviceError> {
        LockFile::acquire(&self.config_lock_path()).map_err(|source| DeviceError::Io {
            path: self.config_lock_path(),
            source,
        })
    }

    /// Edits `device.toml` under its lock, keeping comments: `edit` gets the current text and
    /// returns the new one (which it has validated); the file is replaced atomically. A running
    /// device notices the change and reloads what it can.
    ///
    /// # Errors
    /// [`DeviceError`]; the file is unchanged on error.
    pub fn edit_config(
        &self,
        edit: impl FnOnce(&str) -> Result<String, ValueError>,
    ) -> Result<(), DeviceError> {
        let _lock = self.lock_config()?;
        self.load_config()?;
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(|source| DeviceError::Io {
            path: path.clone(),
            source,
        })?;
        let new = edit(&text)?;
        fsutil::write_atomic(&path, new.as_bytes(), 0o600)
            .map_err(|source| DeviceError::Io { path, source })
    }
}

/// Checks that every user of `state` has a role `iam` defines.
///
/// # Errors
/// [`RoleError`] naming the first user that does not.
pub fn check_user_roles(iam: &IamConfig, state: &DeviceState) -> Result<(), RoleError> {
    iam::check_roles(
        iam,
        state
            .users
            .iter()
            .map(|u| (u.username.as_str(), u.role.as_str())),
    )
}
