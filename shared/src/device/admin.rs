//! Device management on the files: `init`, users and services.
//!
//! Kind: IO (files only, no network). These work whether or not the device is running: state
//! changes go through [`StateStore::update`](crate::state::StateStore::update) (locked read-modify-write) and `device.toml` edits
//! take `device.lock`; a running device notices the new files and applies them (a removed user's
//! connections are closed at once).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::{self, ConfigError, DeviceConfig, Limits, ServiceConfig, TransportSettings};
use crate::device::DeviceHome;
use crate::fsutil::{self, LockFile};
use crate::identity::{self, Fingerprint, KeyFileError};
use crate::state::{DeviceState, StateError, User};

/// Roles a user can have.
pub const ROLES: &[&str] = &["Owner", "Standard", "Guest"];

/// A management command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A configuration file is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state file is missing or invalid, or the change was rejected.
    #[error(transparent)]
    State(#[from] StateError),
    /// The key file is unusable.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// IO on a named file.
    #[error("'{path}': {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl AdminError {
    /// Exit code: 2 for usage and file-content problems, 1 for IO failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Io { .. }
            | Self::State(StateError::Io { .. })
            | Self::Key(KeyFileError::Io { .. }) => 1,
            _ => 2,
        }
    }
}

/// Options of [`init`].
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// Device id (default: `dev-` and the first 8 hex of the fingerprint).
    pub device_id: Option<String>,
    /// Name (default: the host name).
    pub name: Option<String>,
    /// Services (default: `ssh` → `127.0.0.1:22`).
    pub services: Vec<ServiceConfig>,
    /// Listen addresses (default `0.0.0.0:5592`).
    pub listen: Vec<SocketAddr>,
    /// Overwrite an existing `device.toml` and `state.json` (the key is kept).
    pub force: bool,
}

/// What [`init`] did.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The device key's fingerprint.
    pub fingerprint: Fingerprint,
    /// Whether a new key was created.
    pub key_created: bool,
    /// The written configuration.
    pub config: DeviceConfig,
}

/// Creates (or with `force`, recreates) a device home: key, `device.toml`, empty `state.json`.
///
/// # Errors
/// [`AdminError`]; an existing home without `force` is [`AdminError::Usage`].
pub fn init(home: &DeviceHome, opts: InitOptions) -> Result<InitReport, AdminError> {
    fsutil::ensure_private_dir(home.dir()).map_err(|source| AdminError::Io {
        path: home.dir().to_owned(),
        source,
    })?;
    let _lock = lock_config(home)?;
    if !opts.force && (home.config_path().exists() || home.state_path().exists()) {
        return Err(AdminError::Usage(format!(
            "'{}' is already initialised; use --force to overwrite device.toml and state.json \
             (this removes all users; the key is kept)",
            home.dir().display()
        )));
    }
    let (key, key_created) = identity::load_or_create_key(&home.key_path())?;
    let fingerprint = key.fingerprint();
    let device_id = opts
        .device_id
        .unwrap_or_else(|| format!("dev-{}", &fingerprint.to_string()[..8]));
    let name = opts.name.unwrap_or_else(default_name);
    let services = if opts.services.is_empty() {
        vec![
            "ssh=127.0.0.1:22"
                .parse::<config::ServiceSpec>()
                .map(|s| s.0)
                .map_err(|e| AdminError::Usage(e.0))?,
        ]
    } else {
        opts.services
    };
    let cfg = DeviceConfig {
        device_id,
        name,
        listen: if opts.listen.is_empty() {
            vec![SocketAddr::from(([0, 0, 0, 0], config::DEFAULT_PORT))]
        } else {
            opts.listen
        },
        limits: Limits::default(),
        transport: TransportSettings::default(),
        services,
    };
    cfg.validate().map_err(|e| AdminError::Usage(e.0))?;
    let text = cfg.to_commented_toml();
    fsutil::write_atomic(&home.config_path(), text.as_bytes(), 0o600).map_err(|source| {
        AdminError::Io {
            path: home.config_path(),
            source,
        }
    })?;
    home.state_store().replace(&DeviceState::empty())?;
    Ok(InitReport {
        fingerprint,
        key_created,
        config: cfg,
    })
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().count() <= 64)
        .unwrap_or_else(|| "tunnel-device".to_string())
}

fn lock_config(home: &DeviceHome) -> Result<LockFile, AdminError> {
    LockFile::acquire(&home.config_lock_path()).map_err(|source| AdminError::Io {
        path: home.config_lock_path(),
        source,
    })
}

/// The device key's fingerprint.
///
/// # Errors
/// [`AdminError::Key`].
pub fn fingerprint(home: &DeviceHome) -> Result<Fingerprint, AdminError> {
    Ok(identity::load_key(&home.key_path())?.fingerprint())
}

/// Normalizes a role name (case-insensitive) to its canonical spelling.
///
/// # Errors
/// [`AdminError::Usage`] listing the roles.
pub fn parse_role(role: &str) -> Result<&'static str, AdminError> {
    ROLES
        .iter()
        .find(|r| r.eq_ignore_ascii_case(role))
        .copied()
        .ok_or_else(|| {
            AdminError::Usage(format!(
                "unknown role '{role}'; roles are {}",
                ROLES.join(", ")
            ))
        })
}

/// Adds a user with one key.
///
/// # Errors
/// [`AdminError`]; the state file is unchanged on error.
pub fn user_add(
    home: &DeviceHome,
    username: &str,
    fingerprint: Fingerprint,
    role: &str,
    key_name: Option<String>,
) -> Result<User, AdminError> {
    let role = parse_role(role)?;
    let (state, ()) = home
        .state_store()
        .update(|s| s.add_user(username, role, fingerprint, key_name))?;
    state
        .user(username)
        .cloned()
        .ok_or_else(|| AdminError::Usage(format!("user '{username}' vanished")))
}

/// All users.
///
/// # Errors
/// [`AdminError::State`].
pub fn user_list(home: &DeviceHome) -> Result<Vec<User>, AdminError> {
    Ok(home.state_store().load()?.users)
}

/// Removes a user; a running device closes their connections.
///
/// # Errors
/// [`AdminError`].
pub fn user_remove(home: &DeviceHome, username: &str) -> Result<User, AdminError> {
    Ok(home.state_store().update(|s| s.remove_user(username))?.1)
}

/// Changes a user's role.
///
/// # Errors
/// [`AdminError`].
pub fn user_set_role(home: &DeviceHome, username: &str, role: &str) -> Result<(), AdminError> {
    let role = parse_role(role)?;
    home.state_store().update(|s| s.set_role(username, role))?;
    Ok(())
}

/// The configured services.
///
/// # Errors
/// [`AdminError::Config`].
pub fn service_list(home: &DeviceHome) -> Result<Vec<ServiceConfig>, AdminError> {
    Ok(home.load_config()?.services)
}

/// Adds a service to `device.toml`, keeping its comments.
///
/// # Errors
/// [`AdminError`].
pub fn service_add(home: &DeviceHome, svc: &ServiceConfig) -> Result<(), AdminError> {
    edit_config(home, |text| config::add_service_to_toml(text, svc))
}

/// Removes a service from `device.toml`; a running device resets its live tunnels.
///
/// # Errors
/// [`AdminError`].
pub fn service_remove(home: &DeviceHome, id: &str) -> Result<(), AdminError> {
    edit_config(home, |text| config::remove_service_from_toml(text, id))
}

fn edit_config(
    home: &DeviceHome,
    edit: impl FnOnce(&str) -> Result<String, config::ValueError>,
) -> Result<(), AdminError> {
    let _lock = lock_config(home)?;
    home.load_config()?;
    let path = home.config_path();
    let text = std::fs::read_to_string(&path).map_err(|source| AdminError::Io {
        path: path.clone(),
        source,
    })?;
    let new = edit(&text).map_err(|e| AdminError::Usage(e.0))?;
    fsutil::write_atomic(&path, new.as_bytes(), 0o600)
        .map_err(|source| AdminError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    #[test]
    fn init_then_manage_users_and_services() {
        let dir = tempfile::tempdir().unwrap();
        let home = DeviceHome::new(dir.path().join("home"));
        let report = init(
            &home,
            InitOptions {
                device_id: Some("cam-1".into()),
                name: Some("Cam".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(report.key_created);
        assert_eq!(report.config.services[0].id, "ssh");
        assert_eq!(fingerprint(&home).unwrap(), report.fingerprint);
        assert!(matches!(
            init(&home, InitOptions::default()),
            Err(AdminError::Usage(_))
        ));

        let fp = SecretKey::generate().fingerprint();
        let u = user_add(&home, "alice", fp, "owner", None).unwrap();
        assert_eq!(u.role, "Owner");
        assert!(user_add(&home, "bob", fp, "Guest", None).is_err());
        assert!(matches!(
            user_add(
                &home,
                "bob",
                SecretKey::generate().fingerprint(),
                "Admin",
                None
            ),
            Err(AdminError::Usage(_))
        ));
        user_set_role(&home, "alice", "guest").unwrap();
        assert_eq!(user_list(&home).unwrap()[0].role, "Guest");
        user_remove(&home, "alice").unwrap();
        assert!(user_list(&home).unwrap().is_empty());
        assert!(user_remove(&home, "alice").is_err());

        let web = "web=127.0.0.1:8080,type=http"
            .parse::<config::ServiceSpec>()
            .unwrap()
            .0;
        service_add(&home, &web).unwrap();
        assert_eq!(service_list(&home).unwrap().len(), 2);
        service_remove(&home, "ssh").unwrap();
        assert_eq!(service_list(&home).unwrap(), vec![web]);

        // --force keeps the key.
        let again = init(
            &home,
            InitOptions {
                force: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!again.key_created);
        assert_eq!(again.fingerprint, report.fingerprint);
    }

    #[test]
    fn files_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let home = DeviceHome::new(dir.path().join("home"));
        init(&home, InitOptions::default()).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(home.dir()), 0o700);
        assert_eq!(mode(&home.key_path()), 0o600);
        assert_eq!(mode(&home.state_path()), 0o600);
    }
}
