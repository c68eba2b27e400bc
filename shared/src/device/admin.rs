//! Device management on the files: `init`, users and invitations, services, pairing switches,
//! the device name, and `iam explain`.
//!
//! Kind: IO (files only, no network). These work whether or not the device is running: state
//! changes go through [`StateStore::update`](crate::state::StateStore::update) (locked
//! read-modify-write) and `device.toml` edits take `device.lock`; a running device notices the new
//! files within half a second and applies them (a removed user's connections are closed at once).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::config::{
    self, ConfigError, DeviceConfig, HostPort, Limits, NetworkSettings, ServiceConfig,
    TransportSettings,
};
use crate::device::DeviceHome;
use crate::fsutil::{self, LockFile};
use crate::iam::{self, Action, Attrs, Decision, IamConfig, IamError, Value};
use crate::identity::{self, Fingerprint, KeyFileError};
use crate::pairing::{PairingMode, PairingString};
use crate::secret::Secret;
use crate::state::{DeviceState, PairingState, StateError, User};

/// A management command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A configuration file is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state file is missing or invalid, or the change was rejected.
    #[error(transparent)]
    State(#[from] StateError),
    /// `iam.toml` is invalid.
    #[error(transparent)]
    Iam(#[from] IamError),
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
#[derive(Debug, Clone)]
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
    /// Create an invitation for the first user (with the initial role) and switch password
    /// invite pairing on. Its name.
    pub owner_invite: Option<String>,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            device_id: None,
            name: None,
            services: Vec::new(),
            listen: Vec::new(),
            force: false,
            owner_invite: Some("owner".into()),
        }
    }
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
    /// The owner invitation: user name, role, password and token.
    pub invite: Option<(String, String, Secret, Secret)>,
}

/// Creates (or with `force`, recreates) a device home: key, `device.toml`, `state.json` with an
/// owner invitation (password invite on, every other mode off).
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
    let iam = home.load_iam()?;
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
        network: NetworkSettings::default(),
        services,
    };
    cfg.validate().map_err(|e| AdminError::Usage(e.0))?;
    let mut state = DeviceState::new_device();
    let invite = match opts.owner_invite {
        Some(owner) => {
            let role = iam.initial_role;
            let password = state.invite_user(&owner, &role)?;
            let sct = state
                .user(&owner)
                .map(|u| u.sct.clone())
                .unwrap_or_default();
            state.pairing.password_invite = true;
            Some((owner, role, password, sct))
        }
        None => None,
    };
    let text = cfg.to_commented_toml();
    fsutil::write_atomic(&home.config_path(), text.as_bytes(), 0o600).map_err(|source| {
        AdminError::Io {
            path: home.config_path(),
            source,
        }
    })?;
    home.state_store().replace(&state)?;
    Ok(InitReport {
        fingerprint,
        key_created,
        config: cfg,
        invite,
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

fn role(iam: &IamConfig, role: &str) -> Result<String, AdminError> {
    iam.parse_role(role).map_err(AdminError::Usage)
}

/// Adds a user with one key. `role` `None` gives the initial role to the first user with a key
/// and the open-pairing role to later ones.
///
/// # Errors
/// [`AdminError`]; the state file is unchanged on error.
pub fn user_add(
    home: &DeviceHome,
    username: &str,
    fingerprint: Fingerprint,
    role_name: Option<&str>,
    key_name: Option<String>,
) -> Result<User, AdminError> {
    let iam = home.load_iam()?;
    let explicit = role_name.map(|r| role(&iam, r)).transpose()?;
    let (_, user) = home.state_store().update(|s| {
        let r = explicit.unwrap_or_else(|| {
            if s.users.iter().any(|u| !u.fingerprints.is_empty()) {
                iam.open_pairing_role.clone()
            } else {
                iam.initial_role.clone()
            }
        });
        s.add_user(username, &r, fingerprint, key_name).cloned()
    })?;
    Ok(user)
}

/// Invites a user (creating it, or giving an existing user a new one-time password). Returns the
/// user with its new password.
///
/// # Errors
/// [`AdminError`].
pub fn user_invite(
    home: &DeviceHome,
    username: &str,
    role_name: Option<&str>,
) -> Result<(User, Secret), AdminError> {
    let iam = home.load_iam()?;
    let r = role(&iam, role_name.unwrap_or(&iam.open_pairing_role))?;
    let (state, password) = home.state_store().update(|s| match s.user(username) {
        Some(_) => {
            if role_name.is_some() {
                s.set_role(username, &r)?;
            }
            s.reinvite(username)
        }
        None => s.invite_user(username, &r),
    })?;
    let user = state
        .user(username)
        .cloned()
        .ok_or_else(|| AdminError::Usage(format!("user '{username}' vanished")))?;
    Ok((user, password))
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
pub fn user_set_role(
    home: &DeviceHome,
    username: &str,
    role_name: &str,
) -> Result<String, AdminError> {
    let iam = home.load_iam()?;
    let r = role(&iam, role_name)?;
    home.state_store().update(|s| s.set_role(username, &r))?;
    Ok(r)
}

/// The pairing switches.
///
/// # Errors
/// [`AdminError::State`].
pub fn pairing_status(home: &DeviceHome) -> Result<PairingState, AdminError> {
    Ok(home.state_store().load()?.pairing)
}

/// Switches a pairing mode; a running device applies it within half a second.
///
/// # Errors
/// [`AdminError::State`].
pub fn pairing_set(home: &DeviceHome, mode: PairingMode, on: bool) -> Result<(), AdminError> {
    home.state_store().update(|s| {
        s.pairing.set(mode, on);
        if mode == PairingMode::LocalInitial && on {
            // Switching local initial pairing on again makes it usable once more (while no
            // user with the initial role has a key).
            s.pairing.initial_done = false;
        }
        Ok(())
    })?;
    Ok(())
}

/// Addresses for pairing strings: `network.advertise`, else this host's addresses with the listen
/// port.
///
/// # Errors
/// [`AdminError::Usage`] when no usable address can be found.
pub fn advertised_addresses(config: &DeviceConfig) -> Result<Vec<HostPort>, AdminError> {
    if !config.network.advertise.is_empty() {
        return Ok(config.network.advertise.clone());
    }
    let mut out = Vec::new();
    for listen in &config.listen {
        if listen.port() == 0 {
            continue;
        }
        if listen.ip().is_unspecified() {
            let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
                .map(|v| v.into_iter().map(|i| i.ip()).collect())
                .unwrap_or_default();
            ips.retain(|ip| {
                !ip.is_loopback() && !is_link_local(*ip) && (listen.is_ipv6() || ip.is_ipv4())
            });
            ips.sort_by_key(|ip| (ip.is_ipv6(), !config::is_private(*ip)));
            for ip in ips {
                out.push(HostPort {
                    host: config::Host::Ip(ip),
                    port: listen.port(),
                });
            }
        } else {
            out.push(HostPort {
                host: config::Host::Ip(listen.ip()),
                port: listen.port(),
            });
        }
    }
    out.dedup();
    if out.is_empty() {
        return Err(AdminError::Usage(
            "cannot tell which address clients should use: pass --addr HOST:PORT or set \
             network.advertise in device.toml"
                .into(),
        ));
    }
    Ok(out)
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// The pairing string for `username`'s pending invitation, or for open password pairing when
/// `username` is `None`.
///
/// # Errors
/// [`AdminError::Usage`] when there is no pending invitation or no address.
pub fn pairing_string(
    home: &DeviceHome,
    username: Option<&str>,
    addresses: Vec<HostPort>,
) -> Result<PairingString, AdminError> {
    let config = home.load_config()?;
    let state = home.state_store().load()?;
    let addresses = if addresses.is_empty() {
        advertised_addresses(&config)?
    } else {
        addresses
    };
    let fingerprint = fingerprint(home)?;
    let (password, sct) = match username {
        Some(u) => {
            let user = state
                .user(u)
                .ok_or_else(|| AdminError::Usage(format!("there is no user '{u}'")))?;
            let password = user.password.clone().ok_or_else(|| {
                AdminError::Usage(format!(
                    "user '{u}' has no pending invitation; create one with \
                     `tunnel-device user invite {u}`"
                ))
            })?;
            (password, user.sct.clone())
        }
        None => (state.pairing.open_password, state.pairing.open_sct),
    };
    Ok(PairingString {
        device_id: config.device_id,
        fingerprint,
        addresses,
        username: username.map(str::to_string),
        password,
        sct: Some(sct),
    })
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

/// Renames the device in `device.toml`, keeping its comments.
///
/// # Errors
/// [`AdminError`].
pub fn set_device_name(home: &DeviceHome, name: &str) -> Result<(), AdminError> {
    edit_config(home, |text| config::set_name_in_toml(text, name))
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

/// What `iam explain` evaluates.
#[derive(Debug, Clone)]
pub struct ExplainQuery {
    /// The acting user (`None`: an unpaired key).
    pub user: Option<String>,
    /// Evaluate with this role instead of the user's.
    pub role: Option<String>,
    /// The action.
    pub action: Action,
    /// The service of a tunnel action.
    pub service: Option<String>,
    /// The user an IAM action is about.
    pub target_user: Option<String>,
    /// The role an IAM action sets.
    pub target_role: Option<String>,
    /// Evaluate for a remote connection.
    pub remote: bool,
}

/// Evaluates a query against the device's current IAM, state and services.
///
/// # Errors
/// [`AdminError`] for unknown users, roles or services.
pub fn explain(
    home: &DeviceHome,
    q: &ExplainQuery,
) -> Result<(String, Attrs, Decision), AdminError> {
    let iam = home.load_iam()?;
    let state = home.state_store().load()?;
    let config = home.load_config()?;
    let user = match &q.user {
        Some(u) => Some(
            state
                .user(u)
                .ok_or_else(|| AdminError::Usage(format!("there is no user '{u}'")))?,
        ),
        None => None,
    };
    let role_id = match (&q.role, user) {
        (Some(r), _) => role(&iam, r)?,
        (None, Some(u)) => u.role.clone(),
        (None, None) => iam.unpaired_role.clone(),
    };
    let mut attrs = Attrs::new();
    attrs.insert(iam::attr::CONNECTION_IS_LOCAL, Value::Bool(!q.remote));
    if let Some(u) = user {
        attrs.insert(
            iam::attr::CONNECTION_USERNAME,
            Value::Str(u.username.clone()),
        );
        if let Some(k) = u.fingerprints.first() {
            attrs.insert(
                iam::attr::CONNECTION_FINGERPRINT,
                Value::Str(k.fingerprint.to_string()),
            );
        }
    }
    if let Some(s) = &q.service {
        attrs.insert(iam::attr::TUNNEL_SERVICE_ID, Value::Str(s.clone()));
        if let Some(svc) = config.service(s) {
            attrs.insert(
                iam::attr::TUNNEL_SERVICE_TYPE,
                Value::Str(svc.service_type.clone()),
            );
        }
    }
    if let Some(t) = &q.target_user {
        attrs.insert(iam::attr::IAM_USERNAME, Value::Str(t.clone()));
    }
    if let Some(r) = &q.target_role {
        attrs.insert(iam::attr::IAM_ROLE_ID, Value::Str(role(&iam, r)?));
    }
    let decision = iam.decide(&role_id, q.action, &attrs);
    Ok((role_id, attrs, decision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    fn home() -> (tempfile::TempDir, DeviceHome) {
        let dir = tempfile::tempdir().unwrap();
        let home = DeviceHome::new(dir.path().join("home"));
        (dir, home)
    }

    #[test]
    fn init_creates_an_owner_invitation() {
        let (_d, home) = home();
        let report = init(
            &home,
            InitOptions {
                device_id: Some("cam-1".into()),
                name: Some("Cam".into()),
                listen: vec!["127.0.0.1:7000".parse().unwrap()],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(report.key_created);
        let (user, role, password, sct) = report.invite.unwrap();
        assert_eq!((user.as_str(), role.as_str()), ("owner", "Owner"));
        let state = home.state_store().load().unwrap();
        assert!(state.pairing.password_invite);
        for m in [
            PairingMode::LocalInitial,
            PairingMode::LocalOpen,
            PairingMode::PasswordOpen,
        ] {
            assert!(!state.pairing.enabled(m), "{m} should be off");
        }
        let p = pairing_string(&home, Some("owner"), vec![]).unwrap();
        assert_eq!(p.password, password);
        assert_eq!(p.sct, Some(sct));
        assert_eq!(p.fingerprint, report.fingerprint);
        assert_eq!(
            p.addresses,
            vec!["127.0.0.1:7000".parse::<HostPort>().unwrap()]
        );
        assert!(matches!(
            init(&home, InitOptions::default()),
            Err(AdminError::Usage(_))
        ));
    }

    #[test]
    fn users_roles_services() {
        let (_d, home) = home();
        init(
            &home,
            InitOptions {
                owner_invite: None,
                ..Default::default()
            },
        )
        .unwrap();
        let fp = SecretKey::generate().fingerprint();
        let u = user_add(&home, "alice", fp, None, None).unwrap();
        assert_eq!(u.role, "Owner", "the first user with a key is the owner");
        let u = user_add(
            &home,
            "bob",
            SecretKey::generate().fingerprint(),
            None,
            None,
        )
        .unwrap();
        assert_eq!(u.role, "Guest");
        assert!(user_add(&home, "carol", fp, Some("Guest"), None).is_err());
        assert!(matches!(
            user_add(
                &home,
                "carol",
                SecretKey::generate().fingerprint(),
                Some("Admin"),
                None
            ),
            Err(AdminError::Usage(_))
        ));
        assert_eq!(user_set_role(&home, "bob", "standard").unwrap(), "Standard");
        let (inv, pw) = user_invite(&home, "dave", Some("guest")).unwrap();
        assert_eq!(inv.password.as_ref(), Some(&pw));
        let (_, pw2) = user_invite(&home, "dave", None).unwrap();
        assert_ne!(pw, pw2, "a new invitation replaces the password");
        user_remove(&home, "alice").unwrap();
        assert!(user_remove(&home, "alice").is_err());
        pairing_set(&home, PairingMode::LocalOpen, true).unwrap();
        assert!(pairing_status(&home).unwrap().local_open);

        let web = "web=127.0.0.1:8080,type=http"
            .parse::<config::ServiceSpec>()
            .unwrap()
            .0;
        service_add(&home, &web).unwrap();
        assert_eq!(service_list(&home).unwrap().len(), 2);
        service_remove(&home, "ssh").unwrap();
        assert_eq!(service_list(&home).unwrap(), vec![web]);
        set_device_name(&home, "Front door").unwrap();
        assert_eq!(home.load_config().unwrap().name, "Front door");
    }

    #[test]
    fn explain_names_the_deciding_statement() {
        let (_d, home) = home();
        init(&home, InitOptions::default()).unwrap();
        user_add(
            &home,
            "g",
            SecretKey::generate().fingerprint(),
            Some("Guest"),
            None,
        )
        .unwrap();
        let q = ExplainQuery {
            user: Some("g".into()),
            role: None,
            action: Action::TunnelConnect,
            service: Some("ssh".into()),
            target_user: None,
            target_role: None,
            remote: false,
        };
        let (role, _, d) = explain(&home, &q).unwrap();
        assert_eq!(role, "Guest");
        assert!(d.allowed);
        assert_eq!(&*d.by.as_ref().unwrap().0, "TunnelLocalOnly");
        let (_, _, d) = explain(
            &home,
            &ExplainQuery {
                remote: true,
                ..q.clone()
            },
        )
        .unwrap();
        assert!(!d.allowed && d.by.is_none());
        assert!(
            explain(
                &home,
                &ExplainQuery {
                    user: Some("nobody".into()),
                    ..q
                }
            )
            .is_err()
        );
    }

    #[test]
    fn files_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let (_d, home) = home();
        init(&home, InitOptions::default()).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(home.dir()), 0o700);
        assert_eq!(mode(&home.key_path()), 0o600);
        assert_eq!(mode(&home.state_path()), 0o600);
    }
}
