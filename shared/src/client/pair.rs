//! Pairing from the client: with a pairing string (password invite or password open), or by
//! address on the local network (local initial or local open).
//!
//! Kind: IO.
//!
//! With a pairing string the device's key is pinned from the first packet (the string carries the
//! fingerprint), and the password is proven with the channel-bound PAKE: the client sends nothing
//! that could be replayed or that a man in the middle could use, and it accepts the device only
//! after the device proves it knows the password too. Pairing by address trusts the first key it
//! sees (the caller shows it), unless a fingerprint is given.
//!
//! One mode is tried, once: a failure is reported, never retried with a weaker mode.

use tracing::info;

use super::{
    ClientError, ClientHome, ConnectError, ConnectOptions, Dialer, KnownDevice, Session, Target,
    connect_to, dial,
};
use crate::config::HostPort;
use crate::identity::Fingerprint;
use crate::pairing::{Channel, ClientPake, EXPORTER_LABEL, PairingMode, PairingString};
use crate::proto::{ErrorCode, Request, UserInfo};
use crate::transport;

/// What pairing achieved.
#[derive(Debug, Clone)]
pub struct PairOutcome {
    /// The saved device entry.
    pub device: KnownDevice,
    /// The user this key now is.
    pub user: UserInfo,
    /// The mode used (`None` when the key was already paired).
    pub mode: Option<PairingMode>,
    /// Whether the device key was trusted on first use (pairing by address without a pin).
    pub trusted_on_first_use: bool,
}

/// Options of [`pair_local`].
#[derive(Debug, Clone, Default)]
pub struct LocalPairing {
    /// The pinned key, if the user gave one (else trust on first use).
    pub fingerprint: Option<Fingerprint>,
    /// Local name for the device (default: its device id).
    pub name: Option<String>,
    /// User name to create (local open: required; local initial: default `owner`).
    pub username: Option<String>,
    /// Force a mode instead of the best one offered.
    pub mode: Option<PairingMode>,
    /// Label for this key on the device.
    pub key_name: Option<String>,
}

fn not_offered(session: &Session, mode: PairingMode, offered: &[PairingMode]) -> ConnectError {
    let list = if offered.is_empty() {
        "none".to_string()
    } else {
        offered
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    ConnectError::Device {
        device: session.welcome.device_id.clone(),
        code: ErrorCode::PAIRING_DISABLED,
        message: format!(
            "{mode} pairing is not available on this connection (switched off, not local, or \
             already used); modes available now: {list}"
        ),
    }
}

async fn already_paired(
    home: &ClientHome,
    session: &Session,
    mut dev: KnownDevice,
) -> Result<PairOutcome, ClientError> {
    let me = session.me().await?.ok_or_else(|| ConnectError::Protocol {
        device: session.device().to_string(),
        reason: "the device welcomed this key as a user but has no user for it".into(),
    })?;
    dev.user = Some(me.username.clone());
    dev.sct.clone_from(&me.sct);
    dev.device_id = Some(session.welcome.device_id.clone());
    let device = home.save_paired(dev)?;
    Ok(PairOutcome {
        device,
        user: me,
        mode: None,
        trusted_on_first_use: false,
    })
}

/// Sends the pairing `request` of `mode` and, once the device answers `Paired`, saves `dev` with
/// the new user and its token (the pairing string's open token when the device sent none).
async fn request_pairing(
    home: &ClientHome,
    session: &Session,
    request: &Request,
    dev: KnownDevice,
    mode: PairingMode,
    trusted_on_first_use: bool,
) -> Result<PairOutcome, ClientError> {
    let user = session.pair(request).await?;
    let device = home.save_paired(KnownDevice {
        user: Some(user.username.clone()),
        sct: user.sct.clone().or_else(|| dev.sct.clone()),
        ..dev
    })?;
    Ok(PairOutcome {
        device,
        user,
        mode: Some(mode),
        trusted_on_first_use,
    })
}

/// Pairs using a pairing string printed by `tunnel-device init` / `user invite` / `pairing string`.
/// `username` names the new user of password open pairing (default `user-` and 8 hex of this key;
/// an invitation already names its user).
///
/// # Errors
/// [`ClientError`]; a wrong password, a switched-off mode or an intercepted connection leave the
/// device unchanged.
pub async fn pair_with_string(
    home: &ClientHome,
    ps: &PairingString,
    name: Option<&str>,
    username: Option<String>,
    key_name: Option<String>,
    opts: &ConnectOptions,
) -> Result<PairOutcome, ClientError> {
    let name = name.unwrap_or(&ps.device_id).to_string();
    crate::config::check_id("device name", &name)?;
    let identity = home.identity()?;
    let dialer = Dialer::new(&opts.transport)?;
    // Direct, or through the string's relays: the PAKE is bound to the end-to-end TLS session,
    // so a relay cannot take part in it.
    let target = Target {
        name: &name,
        addresses: &ps.addresses,
        pin: Some(ps.fingerprint),
        sct: ps.sct.as_ref(),
        relays: &ps.relays,
        device_id: Some(&ps.device_id),
    };
    let session = dial(&dialer, &identity, &target, opts).await?;
    let dev = KnownDevice {
        name: name.clone(),
        fingerprint: ps.fingerprint,
        addresses: ps.addresses.clone(),
        device_id: Some(session.welcome.device_id.clone()),
        user: None,
        sct: ps.sct.clone(),
        relays: ps.relays.clone(),
    };
    let result = if session.welcome.user.is_some() {
        already_paired(home, &session, dev).await
    } else {
        let mode = if ps.username.is_some() {
            PairingMode::PasswordInvite
        } else {
            PairingMode::PasswordOpen
        };
        let info = session.pairing_info().await?;
        if !info.modes.contains(&mode) {
            return Err(not_offered(&session, mode, &info.modes).into());
        }
        let pake_user = ps.username.clone().unwrap_or_default();
        prove_password(&session, &ps.password, &pake_user).await?;
        let request = match mode {
            PairingMode::PasswordInvite => Request::PairPasswordInvite { key_name },
            _ => Request::PairPasswordOpen {
                username: username.unwrap_or_else(|| open_username(&identity.fingerprint())),
                key_name,
            },
        };
        request_pairing(home, &session, &request, dev, mode, false).await
    };
    session.close();
    drop(session);
    dialer.close().await;
    result
}

/// The user name a password-open pairing creates: `user-` and 8 hex of this key.
fn open_username(fp: &Fingerprint) -> String {
    format!("user-{}", &fp.to_string()[..8])
}

/// Proves `password` on this session with the channel-bound PAKE, as `username` ("" for the open
/// pairing password), and verifies that the device knows it too.
///
/// # Errors
/// [`ConnectError::Device`] with [`ErrorCode::WRONG_PASSWORD`] or
/// [`ErrorCode::TOO_MANY_ATTEMPTS`] from the device, or [`ConnectError::Protocol`] when the
/// device's confirmation does not verify (an intercepted connection).
pub async fn prove_password(
    session: &Session,
    password: &crate::secret::Secret,
    username: &str,
) -> Result<(), ConnectError> {
    let mut exporter = [0u8; 32];
    session
        .conn
        .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .map_err(|_| ConnectError::Protocol {
            device: session.welcome.device_id.clone(),
            reason: "cannot derive the channel binding".into(),
        })?;
    let ch = Channel {
        client: &session.client_fingerprint,
        device: &session.device_fingerprint,
        exporter: &exporter,
    };
    let (pake, msg) = ClientPake::start(password, username, ch);
    let reply = session.pake_start(username, msg).await?;
    let protocol = |reason: &str| ConnectError::Protocol {
        device: session.welcome.device_id.clone(),
        reason: reason.to_string(),
    };
    let (confirm, mac) = pake
        .finish(&reply)
        .map_err(|_| protocol("malformed key-exchange reply"))?;
    let device_mac = session.pake_confirm(mac.to_vec()).await?;
    confirm.verify(&device_mac).map_err(|_| {
        protocol(
            "the device could not prove that it knows the password: the connection may be \
             intercepted. Nothing was paired",
        )
    })
}

/// Pairs with a device on the local network by address: local initial (the first user) or local
/// open, whichever the device offers (or `opts.mode`).
///
/// # Errors
/// [`ClientError`].
pub async fn pair_local(
    home: &ClientHome,
    addresses: Vec<HostPort>,
    opts: LocalPairing,
    connect: &ConnectOptions,
) -> Result<PairOutcome, ClientError> {
    let identity = home.identity()?;
    let endpoint = transport::client_endpoint(&connect.transport)?;
    let label = opts.name.clone().unwrap_or_else(|| "device".to_string());
    let target = Target {
        name: &label,
        addresses: &addresses,
        pin: opts.fingerprint,
        sct: None,
        relays: &[],
        device_id: None,
    };
    let session = connect_to(&endpoint, &identity, &target, connect).await?;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| session.welcome.device_id.clone());
    crate::config::check_id("device name", &name)?;
    let dev = KnownDevice {
        name,
        fingerprint: session.device_fingerprint,
        addresses: vec![session.host_port.clone()],
        device_id: Some(session.welcome.device_id.clone()),
        user: None,
        sct: None,
        relays: Vec::new(),
    };
    let tofu = opts.fingerprint.is_none();
    if tofu {
        info!(
            fingerprint = %session.device_fingerprint,
            "trusting the device key seen on first use: compare it with `tunnel-device fingerprint`"
        );
    }
    let result = if session.welcome.user.is_some() {
        already_paired(home, &session, dev).await.map(|mut o| {
            o.trusted_on_first_use = tofu;
            o
        })
    } else {
        let info = session.pairing_info().await?;
        let mode = match opts.mode {
            Some(m) => m,
            None => [PairingMode::LocalInitial, PairingMode::LocalOpen]
                .into_iter()
                .find(|m| info.modes.contains(m))
                .ok_or_else(|| {
                    let offered: Vec<&str> = info.modes.iter().map(|m| m.as_str()).collect();
                    ClientError::from(ConnectError::Device {
                        device: session.welcome.device_id.clone(),
                        code: ErrorCode::PAIRING_DISABLED,
                        message: format!(
                            "no local pairing mode (local-initial, local-open) is available on this \
                             connection; the device offers: {}. For password pairing use the \
                             pairing string: tunnel-client pair PAIRING_STRING",
                            if offered.is_empty() { "none".to_string() } else { offered.join(", ") }
                        ),
                    })
                })?,
        };
        if !info.modes.contains(&mode) {
            return Err(not_offered(&session, mode, &info.modes).into());
        }
        let request = match mode {
            PairingMode::LocalInitial => Request::PairLocalInitial {
                username: opts.username.clone(),
                key_name: opts.key_name.clone(),
            },
            PairingMode::LocalOpen => Request::PairLocalOpen {
                username: opts.username.clone().ok_or(ClientError::NeedsUsername)?,
                key_name: opts.key_name.clone(),
            },
            other => return Err(ClientError::NeedsPairingString(other)),
        };
        // `dev` holds no token here, so the device's is the one saved.
        request_pairing(home, &session, &request, dev, mode, tofu).await
    };
    session.close();
    endpoint.wait_idle().await;
    result
}
