//! The relay home: `relay.key` (its P-256 key, 0600) and `relay.toml`, in a 0700 directory; the
//! offline commands (`init`, `device add|remove|list`, `fingerprint`).
//!
//! Kind: IO (files). Edits of `relay.toml` are locked (`relay.lock`) and atomic; a running relay
//! reloads the file within a second.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tunnel_core::fsutil::{self, LockFile};
use tunnel_core::identity::{self, Fingerprint, KeyFileError, SecretKey};

use crate::config::{self, ConfigError, RelayConfig, RelayDevice};

/// A relay operation failed. The binary maps each to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// `relay.toml` is missing or invalid.
    #[error("'{path}': {error}", path = .path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        error: ConfigError,
    },
    /// `relay.toml` does not exist: the home was never initialised.
    #[error(
        "'{path}' does not exist: create the relay's home with `tunnel-relay init`",
        path = .0.display()
    )]
    NotInitialised(PathBuf),
    /// `init` found an initialised home.
    #[error(
        "'{path}' is already initialised; use --force to overwrite relay.toml (the key is kept)",
        path = .0.display()
    )]
    AlreadyInitialised(PathBuf),
    /// The key file is missing, unprotected or invalid.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The home or a file in it is not trusted (StrictModes).
    #[error("'{path}' {error}", path = .path.display())]
    Untrusted {
        /// The path.
        path: PathBuf,
        /// Why.
        error: fsutil::Untrusted,
    },
    /// `device remove` of a device the relay does not serve.
    #[error("the relay serves no device '{0}' (see `tunnel-relay device list`)")]
    NoSuchDevice(String),
    /// Other IO on a named file.
    #[error("'{path}': {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The relay's home directory.
#[derive(Debug, Clone)]
pub struct RelayHome {
    dir: PathBuf,
}

impl RelayHome {
    /// The home at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `relay.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("relay.toml")
    }

    /// `relay.key`.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("relay.key")
    }

    /// Held by a running relay.
    pub fn run_lock_path(&self) -> PathBuf {
        self.dir.join("run.lock")
    }

    fn edit_lock_path(&self) -> PathBuf {
        self.dir.join("relay.lock")
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
        move |source| HomeError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// Reads and validates `relay.toml` (refusing a home or file others could change).
    ///
    /// # Errors
    /// [`HomeError`].
    pub fn load_config(&self) -> Result<RelayConfig, HomeError> {
        let path = self.config_path();
        for p in [self.dir.clone(), path.clone()] {
            match fsutil::check_strict(&p) {
                Ok(()) => {}
                Err(fsutil::Untrusted::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(HomeError::NotInitialised(path));
                }
                Err(error) => {
                    return Err(HomeError::Untrusted { path: p, error });
                }
            }
        }
        let text = std::fs::read_to_string(&path).map_err(Self::io(&path))?;
        RelayConfig::from_toml(&text).map_err(|error| HomeError::Config { path, error })
    }

    /// The relay's key.
    ///
    /// # Errors
    /// [`HomeError::Key`].
    pub fn load_key(&self) -> Result<SecretKey, HomeError> {
        Ok(identity::load_key(&self.key_path())?)
    }

    /// Creates the home: a key if there is none, and `relay.toml` listening on `listen`.
    /// Returns the key's fingerprint.
    ///
    /// # Errors
    /// [`HomeError::AlreadyInitialised`] without `force`; IO and key errors.
    pub fn init(&self, listen: &[SocketAddr], force: bool) -> Result<Fingerprint, HomeError> {
        fsutil::ensure_private_dir(&self.dir).map_err(Self::io(&self.dir))?;
        let (key, _) = identity::load_or_create_key(&self.key_path())?;
        let path = self.config_path();
        let listen = if listen.is_empty() {
            vec![SocketAddr::from(([0, 0, 0, 0], config::DEFAULT_PORT))]
        } else {
            listen.to_vec()
        };
        let text = config::template(&listen);
        if force {
            fsutil::write_atomic(&path, text.as_bytes(), 0o600).map_err(Self::io(&path))?;
        } else if !fsutil::create_new_atomic(&path, text.as_bytes(), 0o600)
            .map_err(Self::io(&path))?
        {
            return Err(HomeError::AlreadyInitialised(self.dir.clone()));
        }
        Ok(key.fingerprint())
    }

    fn edit(
        &self,
        f: impl FnOnce(&str) -> Result<Option<String>, ConfigError>,
    ) -> Result<bool, HomeError> {
        let lock = self.edit_lock_path();
        let _lock = LockFile::acquire(&lock).map_err(Self::io(&lock))?;
        self.load_config()?;
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(Self::io(&path))?;
        let Some(new) = f(&text).map_err(|error| HomeError::Config {
            path: path.clone(),
            error,
        })?
        else {
            return Ok(false);
        };
        // Never write a file the relay would refuse.
        RelayConfig::from_toml(&new).map_err(|error| HomeError::Config {
            path: path.clone(),
            error,
        })?;
        fsutil::write_atomic(&path, new.as_bytes(), 0o600).map_err(Self::io(&path))?;
        Ok(true)
    }

    /// Serves device `id`, which attaches with the key `fingerprint` (replacing the fingerprint
    /// when the device is known).
    ///
    /// # Errors
    /// [`HomeError`].
    pub fn add_device(&self, id: &str, fingerprint: &Fingerprint) -> Result<(), HomeError> {
        self.edit(|t| config::add_device_to_toml(t, id, fingerprint).map(Some))?;
        Ok(())
    }

    /// Stops serving device `id` (a running relay closes its connections).
    ///
    /// # Errors
    /// [`HomeError::NoSuchDevice`] and the rest of [`HomeError`].
    pub fn remove_device(&self, id: &str) -> Result<(), HomeError> {
        if self.edit(|t| config::remove_device_from_toml(t, id))? {
            Ok(())
        } else {
            Err(HomeError::NoSuchDevice(id.to_string()))
        }
    }

    /// The devices served.
    ///
    /// # Errors
    /// [`HomeError`].
    pub fn devices(&self) -> Result<Vec<RelayDevice>, HomeError> {
        Ok(self.load_config()?.devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_add_remove_list() {
        let dir = tempfile::tempdir().unwrap();
        let home = RelayHome::new(dir.path().join("relay"));
        assert!(matches!(
            home.load_config(),
            Err(HomeError::NotInitialised(_))
        ));
        let fp = home.init(&[], false).unwrap();
        assert!(matches!(
            home.init(&[], false),
            Err(HomeError::AlreadyInitialised(_))
        ));
        assert_eq!(home.init(&[], true).unwrap(), fp, "the key is kept");
        let dev = Fingerprint::from_bytes([4; 32]);
        home.add_device("cam", &dev).unwrap();
        assert_eq!(
            home.devices().unwrap(),
            vec![RelayDevice {
                id: "cam".into(),
                fingerprint: dev
            }]
        );
        assert!(matches!(
            home.add_device("bad id", &dev),
            Err(HomeError::Config { .. })
        ));
        home.remove_device("cam").unwrap();
        assert!(matches!(
            home.remove_device("cam"),
            Err(HomeError::NoSuchDevice(_))
        ));
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&home.config_path()), 0o600);
        assert_eq!(mode(&home.key_path()), 0o600);
        assert_eq!(mode(home.dir()), 0o700);
        std::fs::set_permissions(home.config_path(), std::fs::Permissions::from_mode(0o666))
            .unwrap();
        assert!(matches!(
            home.load_config(),
            Err(HomeError::Untrusted { .. })
        ));
    }
}
