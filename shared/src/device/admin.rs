//! Device management on the files: `init`, users and invitations, services, pairing switches,
//! the device name, and `iam explain`.
//!
//! Kind: IO (files only, no network). These work whether or not the device is running: state
//! changes go through [`StateStore::update`](crate::state::StateStore::update) (locked
//! read-modify-write) and `device.toml` edits take `device.lock`; a running device notices the new
//! files within half a second and applies them (a removed user's connections are closed at once).

use std::net::{IpAddr, SocketAddr};

use crate::config::{
    self, DeviceConfig, HostPort, Limits, NetworkSettings, ServiceConfig, TransportSettings,
};
use crate::device::{DeviceError, DeviceHome};
use crate::fsutil;
use crate::iam::{self, Action, Attrs, Decision, IamConfig, Value};
use crate::identity::{self, Fingerprint};
use crate::pairing::{PairingMode, PairingString};
use crate::secret::Secret;
use crate::state::{DeviceState, PairingState, Rejection, User};

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
/// [`DeviceError`]; an existing home without `force` is [`DeviceError::AlreadyInitialised`].
pub fn init(home: &DeviceHome, opts: InitOptions) -> Result<InitReport, DeviceError> {
    fsutil::ensure_private_dir(home.dir()).map_err(|source| DeviceError::Io {
        path: home.dir().to_owned(),
        source,
    })?;
    let _lock = home.lock_config()?;
    if !opts.force && (home.config_path().exists() || home.state_path().exists()) {
        return Err(DeviceError::AlreadyInitialised(home.dir().to_owned()));
    }
    let iam = home.load_iam()?;
    let (key, key_created) = identity::load_or_create_key(&home.key_path())?;
    let fingerprint = key.fingerprint();
    let device_id = opts
        .device_id
        .unwrap_or_else(|| format!("dev-{}", &fingerprint.to_string()[..8]));
    let name = opts.name.unwrap_or_else(default_name);
    let services = if opts.services.is_empty() {
        vec!["ssh=127.0.0.1:22".parse::<config::ServiceSpec>()?.0]
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
        jwt: None,
        relays: Vec::new(),
        metrics: crate::metrics::MetricsConfig::default(),
        services,
    };
    cfg.validate()?;
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
        DeviceError::Io {
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

/// The device key's fingerprint.
///
/// # Errors
/// [`DeviceError::Key`].
pub fn fingerprint(home: &DeviceHome) -> Result<Fingerprint, DeviceError> {
    Ok(identity::load_key(&home.key_path())?.fingerprint())
}

fn role(iam: &IamConfig, role: &str) -> Result<String, DeviceError> {
    Ok(iam.parse_role(role)?)
}

/// Adds a user with one key. `role` `None` gives the initial role to the first user with a key
/// and the open-pairing role to later ones.
///
/// # Errors
/// [`DeviceError`]; the state file is unchanged on error.
pub fn user_add(
    home: &DeviceHome,
    username: &str,
    fingerprint: Fingerprint,
    role_name: Option<&str>,
    key_name: Option<String>,
) -> Result<User, DeviceError> {
    let iam = home.load_iam()?;
    let explicit = role_name.map(|r| role(&iam, r)).transpose()?;
    let updated = home.state_store().update(|s| {
        let r = explicit.unwrap_or_else(|| {
            if s.users.iter().any(|u| !u.fingerprints.is_empty()) {
                iam.open_pairing_role.clone()
            } else {
                iam.initial_role.clone()
            }
        });
        s.add_user(username, &r, fingerprint, key_name).cloned()
    })?;
    Ok(updated.value)
}

/// Invites a user (creating it, or giving an existing user a new one-time password). Returns the
/// user with its new password.
///
/// # Errors
/// [`DeviceError`].
pub fn user_invite(
    home: &DeviceHome,
    username: &str,
    role_name: Option<&str>,
) -> Result<(User, Secret), DeviceError> {
    let iam = home.load_iam()?;
    let r = role(&iam, role_name.unwrap_or(&iam.open_pairing_role))?;
    let updated = home.state_store().update(|s| match s.user(username) {
        Some(_) => {
            if role_name.is_some() {
                s.set_role(username, &r)?;
            }
            s.reinvite(username)
        }
        None => s.invite_user(username, &r),
    })?;
    let user = updated
        .state
        .user(username)
        .cloned()
        .ok_or_else(|| Rejection::NoSuchUser(username.to_string()))
        .map_err(crate::state::StateError::from)?;
    Ok((user, updated.value))
}

/// All users.
///
/// # Errors
/// [`DeviceError::State`].
pub fn user_list(home: &DeviceHome) -> Result<Vec<User>, DeviceError> {
    Ok(home.state_store().load()?.users)
}

/// Removes a user; a running device closes their connections.
///
/// # Errors
/// [`DeviceError`].
pub fn user_remove(home: &DeviceHome, username: &str) -> Result<User, DeviceError> {
    Ok(home
        .state_store()
        .update(|s| s.remove_user(username))?
        .value)
}

/// Replaces a user's server-connect token (the old one stops working at once: a running device
/// closes the user's remote connections that hold it). Returns the new token.
///
/// # Errors
/// [`DeviceError`].
pub fn user_rotate_token(home: &DeviceHome, username: &str) -> Result<Secret, DeviceError> {
    Ok(home.state_store().update(|s| s.rotate_sct(username))?.value)
}

/// Changes a user's role.
///
/// # Errors
/// [`DeviceError`].
pub fn user_set_role(
    home: &DeviceHome,
    username: &str,
    role_name: &str,
) -> Result<String, DeviceError> {
    let iam = home.load_iam()?;
    let r = role(&iam, role_name)?;
    home.state_store().update(|s| s.set_role(username, &r))?;
    Ok(r)
}

/// The pairing switches.
///
/// # Errors
/// [`DeviceError::State`].
pub fn pairing_status(home: &DeviceHome) -> Result<PairingState, DeviceError> {
    Ok(home.state_store().load()?.pairing)
}

/// Switches a pairing mode; a running device applies it within half a second.
///
/// # Errors
/// [`DeviceError::State`].
pub fn pairing_set(home: &DeviceHome, mode: PairingMode, on: bool) -> Result<(), DeviceError> {
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
/// [`DeviceError::NoAddress`] when no usable address can be found.
pub fn advertised_addresses(config: &DeviceConfig) -> Result<Vec<HostPort>, DeviceError> {
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
        return Err(DeviceError::NoAddress);
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
/// [`DeviceError::NoInvitation`] or [`DeviceError::NoAddress`].
pub fn pairing_string(
    home: &DeviceHome,
    username: Option<&str>,
    addresses: Vec<HostPort>,
) -> Result<PairingString, DeviceError> {
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
                .ok_or_else(|| crate::state::StateError::from(Rejection::NoSuchUser(u.into())))?;
            let password = user
                .password
                .clone()
                .ok_or_else(|| DeviceError::NoInvitation(u.to_string()))?;
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
        relays: config.relays,
    })
}

/// The configured services.
///
/// # Errors
/// [`DeviceError::Config`].
pub fn service_list(home: &DeviceHome) -> Result<Vec<ServiceConfig>, DeviceError> {
    Ok(home.load_config()?.services)
}

/// Adds a service to `device.toml`, keeping its comments.
///
/// # Errors
/// [`DeviceError`].
pub fn service_add(home: &DeviceHome, svc: &ServiceConfig) -> Result<(), DeviceError> {
    home.edit_config(|text| config::add_service_to_toml(text, svc))
}

/// Removes a service from `device.toml`; a running device resets its live tunnels.
///
/// # Errors
/// [`DeviceError`].
pub fn service_remove(home: &DeviceHome, id: &str) -> Result<(), DeviceError> {
    home.edit_config(|text| config::remove_service_from_toml(text, id))
}

/// Attaches the device to a relay (`[[relay]]` in `device.toml`); a running device connects to
/// it within a second.
///
/// # Errors
/// [`DeviceError`].
pub fn relay_add(home: &DeviceHome, relay: &config::RelayRef) -> Result<(), DeviceError> {
    home.edit_config(|text| config::add_relay_to_toml(text, relay))
}

/// Detaches the device from the relay at `addr`.
///
/// # Errors
/// [`DeviceError`].
pub fn relay_remove(home: &DeviceHome, addr: &HostPort) -> Result<(), DeviceError> {
    home.edit_config(|text| config::remove_relay_from_toml(text, addr))
}

/// The device id of `device.toml`.
///
/// # Errors
/// [`DeviceError::Config`].
pub fn device_id(home: &DeviceHome) -> Result<String, DeviceError> {
    Ok(home.load_config()?.device_id)
}

/// The relays of `device.toml`.
///
/// # Errors
/// [`DeviceError::Config`].
pub fn relay_list(home: &DeviceHome) -> Result<Vec<config::RelayRef>, DeviceError> {
    Ok(home.load_config()?.relays)
}

/// Renames the device in `device.toml`, keeping its comments.
///
/// # Errors
/// [`DeviceError`].
pub fn set_device_name(home: &DeviceHome, name: &str) -> Result<(), DeviceError> {
    home.edit_config(|text| config::set_name_in_toml(text, name))
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
/// [`DeviceError`] for unknown users, roles or services.
pub fn explain(
    home: &DeviceHome,
    q: &ExplainQuery,
) -> Result<(String, Attrs, Decision), DeviceError> {
    let iam = home.load_iam()?;
    let state = home.state_store().load()?;
    let config = home.load_config()?;
    let user = match &q.user {
        Some(u) => Some(
            state
                .user(u)
                .ok_or_else(|| crate::state::StateError::from(Rejection::NoSuchUser(u.clone())))?,
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
            Err(DeviceError::AlreadyInitialised(_))
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
            Err(DeviceError::UnknownRole(_))
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
