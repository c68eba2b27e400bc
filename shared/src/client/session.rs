//! A session with a device: one typed method per control request, so callers never build a
//! request or match a response themselves. Reaching the device (paths, handshake) is
//! [`mod@super::dial`].
//!
//! Kind: IO.
//!
//! The TLS verifier accepts only the pinned fingerprint; a different key is reported as
//! [`ConnectError::FingerprintMismatch`] with both fingerprints, and is never retried or
//! "accepted". A device that closes the connection with an application code (unknown key,
//! revoked, token rejected…) yields [`ConnectError::Refused`]. Remote connections present the
//! server-connect token stored with the device.
//!
//! Every string a device sends (its id and name, roles, user and service names, metadata, error
//! texts, close reasons) is escaped here ([`crate::sanitize`]) before a caller sees it, so no
//! output path can print a peer's escape sequence.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::dial::connect;
use super::relayed::{Channel, Dialer};
use super::{ClientError, ClientHome, ConnectError, KnownDevice};
use crate::config::{HostPort, RelayRef, TransportSettings};
use crate::identity::Fingerprint;
use crate::pairing::PairingMode;
use crate::proto::{
    CloseCode, ErrorCode, ErrorReply, Invite, PairingInfo, Request, Response, ServiceInfo,
    Settings, UserInfo, Welcome,
};
use crate::sanitize::{self, Sanitize};
use crate::secret::Secret;
use crate::transport::Identity;
use crate::transport::path::PathState;
use crate::wire::{ControlClient, FrameError};

/// Options shared by everything that connects.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Transport tuning.
    pub transport: TransportSettings,
    /// Bound on the QUIC handshake plus hello/welcome, per address.
    pub timeout: Duration,
    /// Sent in `Hello` for the device's logs.
    pub client_name: Option<String>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            transport: TransportSettings::default(),
            timeout: Duration::from_secs(10),
            client_name: std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        }
    }
}

/// An authenticated connection to a device with its control stream.
#[derive(Debug)]
pub struct Session {
    /// The QUIC connection (cheap to clone).
    pub conn: quinn::Connection,
    /// What the device said about us.
    pub welcome: Welcome,
    /// The address that answered.
    pub addr: std::net::SocketAddr,
    /// The `HOST:PORT` that answered.
    pub host_port: HostPort,
    /// The device key seen in the handshake (the pin, or the key trusted on first use).
    pub device_fingerprint: Fingerprint,
    /// This client's key.
    pub client_fingerprint: Fingerprint,
    /// Direct, or through which relay.
    pub path: SessionPath,
    pub(super) control: Arc<Mutex<ControlClient>>,
    pub(super) device: String,
    /// The relayed channel the connection runs in (kept open while the session lives).
    pub(super) channel: Option<Arc<Channel>>,
}

/// How a session reaches its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionPath {
    /// Straight to one of its addresses.
    Direct,
    /// Through a relay.
    Relayed {
        /// The relay's address.
        relay: String,
    },
}

impl std::fmt::Display for SessionPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Direct => f.write_str("direct"),
            Self::Relayed { relay } => write!(f, "relayed via {relay}"),
        }
    }
}

/// Takes the expected answer out of a response, or turns any other into a protocol error.
macro_rules! expect {
    ($session:expr, $response:expr, $pattern:pat => $value:expr) => {
        match $response {
            $pattern => Ok($value),
            other => Err($session.unexpected(&other)),
        }
    };
}

impl Session {
    /// Sends a control request and waits for its response (an error reply is returned as is).
    ///
    /// # Errors
    /// [`ConnectError::Protocol`] or [`ConnectError::Refused`] when the connection failed.
    pub async fn request(&self, req: &Request) -> Result<Response, ConnectError> {
        let mut control = self.control.lock().await;
        let mut response = control
            .call(req)
            .await
            .map_err(|e| self.frame_error(&e))?
            .ok_or_else(|| ConnectError::Protocol {
                device: self.device.clone(),
                reason: "the device closed the control stream".into(),
            })?;
        // Everything a device says is escaped before anyone prints or stores it.
        response.sanitize();
        Ok(response)
    }

    /// As [`Self::request`], with an error reply turned into [`ConnectError::Device`] (or
    /// [`ConnectError::NotPaired`] for a forbidden request of an unpaired key).
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn call(&self, req: &Request) -> Result<Response, ConnectError> {
        match self.request(req).await? {
            Response::Error(e) => Err(self.device_error(e)),
            r => Ok(r),
        }
    }

    async fn call_ok(&self, req: &Request) -> Result<(), ConnectError> {
        expect!(self, self.call(req).await?, Response::Ok => ())
    }

    fn device_error(&self, e: ErrorReply) -> ConnectError {
        if e.code == ErrorCode::FORBIDDEN && self.welcome.user.is_none() {
            return ConnectError::NotPaired {
                device: self.device.clone(),
                client: self.client_fingerprint,
            };
        }
        ConnectError::Device {
            device: self.device.clone(),
            code: e.code,
            message: e.message,
        }
    }

    /// An error for an answer of the wrong kind.
    pub fn unexpected(&self, r: &Response) -> ConnectError {
        ConnectError::Protocol {
            device: self.device.clone(),
            reason: format!("unexpected answer {r:?}"),
        }
    }

    /// The user this key is on, or [`ConnectError::NotPaired`].
    ///
    /// # Errors
    /// [`ConnectError::NotPaired`].
    pub fn require_user(&self) -> Result<&str, ConnectError> {
        self.welcome
            .user
            .as_deref()
            .ok_or_else(|| ConnectError::NotPaired {
                device: self.device.clone(),
                client: self.client_fingerprint,
            })
    }

    /// The services this user may see.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn services(&self) -> Result<Vec<ServiceInfo>, ConnectError> {
        expect!(self, self.call(&Request::ListServices).await?, Response::Services(s) => s)
    }

    /// This key's own user, with its token (`None` when unpaired).
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn me(&self) -> Result<Option<UserInfo>, ConnectError> {
        expect!(self, self.call(&Request::GetMe).await?, Response::Me(m) => m)
    }

    /// The relays the device is attached to.
    ///
    /// # Errors
    /// [`ConnectError`] (an older device answers "unknown request").
    pub async fn relays(&self) -> Result<Vec<RelayRef>, ConnectError> {
        expect!(self, self.call(&Request::GetRelays).await?, Response::Relays(r) => r)
    }

    /// The path the connection takes now: `direct`, `relayed via RELAY` (`… over TCP` when
    /// the leg to the relay rides TCP), or `direct (punched)` once a relayed connection moved
    /// onto a direct path (it falls back to the relay when that path dies).
    pub fn path_now(&self) -> String {
        match self.channel.as_ref() {
            Some(c) if matches!(c.state(), PathState::Direct(_)) => "direct (punched)".to_string(),
            Some(c) if c.over_tcp() => format!("{} over TCP", self.path),
            _ => self.path.to_string(),
        }
    }

    /// Records in the home's `seen.json` that the device was reached now, by this path (a file
    /// error is only logged: the record only informs `tunnel-client devices`).
    pub fn record_seen(&self, home: &ClientHome) {
        if let Err(e) = home.record_seen(&self.device_fingerprint, &self.path_now(), self.addr) {
            tracing::debug!("could not update the last-seen record: {e}");
        }
    }

    /// The round-trip time of the connection now.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Pairing modes usable on this connection.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn pairing_info(&self) -> Result<PairingInfo, ConnectError> {
        expect!(self, self.call(&Request::PairingGet).await?, Response::Pairing(p) => p)
    }

    /// The device's users (tokens only for this key's own user).
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn users(&self) -> Result<Vec<UserInfo>, ConnectError> {
        expect!(self, self.call(&Request::ListUsers).await?, Response::Users(u) => u)
    }

    /// Invites a user: a one-time password (and its token) to hand over in a pairing string.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn invite_user(
        &self,
        username: &str,
        role: Option<&str>,
    ) -> Result<Invite, ConnectError> {
        let req = Request::CreateUser {
            username: username.to_string(),
            role: role.map(str::to_string),
        };
        expect!(self, self.call(&req).await?, Response::Invite(i) => i)
    }

    /// Removes a user; their connections are closed at once.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn remove_user(&self, username: &str) -> Result<(), ConnectError> {
        self.call_ok(&Request::DeleteUser {
            username: username.to_string(),
        })
        .await
    }

    /// Changes a user's role.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn set_role(&self, username: &str, role: &str) -> Result<(), ConnectError> {
        self.call_ok(&Request::SetUserRole {
            username: username.to_string(),
            role: role.to_string(),
        })
        .await
    }

    /// Replaces `username`'s server-connect token and returns the new one.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn rotate_token(&self, username: &str) -> Result<Secret, ConnectError> {
        let req = Request::RotateToken {
            username: username.to_string(),
        };
        expect!(self, self.call(&req).await?, Response::Token(t) => t)
    }

    /// The pairing switches and the open-pairing secrets.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn settings(&self) -> Result<Settings, ConnectError> {
        expect!(self, self.call(&Request::GetSettings).await?, Response::Settings(s) => s)
    }

    /// Switches a pairing mode on or off.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn set_pairing_mode(
        &self,
        mode: PairingMode,
        enabled: bool,
    ) -> Result<(), ConnectError> {
        self.call_ok(&Request::SetPairingMode { mode, enabled })
            .await
    }

    /// Renames the device itself.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn rename_device(&self, name: &str) -> Result<(), ConnectError> {
        self.call_ok(&Request::SetDeviceName {
            name: name.to_string(),
        })
        .await
    }

    /// Sends a pairing request and returns the user this key now is.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub(crate) async fn pair(&self, req: &Request) -> Result<UserInfo, ConnectError> {
        expect!(self, self.call(req).await?, Response::Paired(u) => u)
    }

    /// The first PAKE message; returns the device's.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub(crate) async fn pake_start(
        &self,
        username: &str,
        msg: Vec<u8>,
    ) -> Result<Vec<u8>, ConnectError> {
        let req = Request::PakeStart {
            username: username.to_string(),
            msg,
        };
        expect!(self, self.call(&req).await?, Response::PakeReply { msg } => msg)
    }

    /// The key confirmation; returns the device's.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub(crate) async fn pake_confirm(&self, mac: Vec<u8>) -> Result<Vec<u8>, ConnectError> {
        expect!(self, self.call(&Request::PakeConfirm { mac }).await?, Response::PakeConfirmed { mac } => mac)
    }

    /// Closes the connection politely.
    pub fn close(&self) {
        self.conn.close(CloseCode::NORMAL.to_varint(), b"bye");
    }

    /// The device's local name.
    pub fn device(&self) -> &str {
        &self.device
    }

    fn frame_error(&self, e: &FrameError) -> ConnectError {
        frame_error(&self.device, e, self.client_fingerprint)
    }
}

pub(super) fn frame_error(device: &str, e: &FrameError, client: Fingerprint) -> ConnectError {
    match e.connection_error() {
        Some(c) => connection_error(device, c, Some(client)),
        None => ConnectError::Protocol {
            device: device.to_string(),
            reason: e.to_string(),
        },
    }
}

pub(crate) fn connection_error(
    device: &str,
    e: &quinn::ConnectionError,
    client: Option<Fingerprint>,
) -> ConnectError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => ConnectError::Refused {
            device: device.to_string(),
            code: CloseCode::from_varint(close.error_code),
            reason: sanitize::text(&String::from_utf8_lossy(&close.reason)).into_owned(),
            client: client.unwrap_or_else(|| Fingerprint::from_bytes([0; 32])),
        },
        other => ConnectError::Unreachable {
            device: device.to_string(),
            reason: other.to_string(),
        },
    }
}

/// Connects to a known device, makes sure this key is a user there, and records what was learned
/// (device id, user name, and the user's token if the entry lacked it).
///
/// # Errors
/// [`ConnectError::NotPaired`] for a key on no user, or any connection error.
pub async fn connect_paired(
    home: &ClientHome,
    endpoint: &Dialer,
    identity: &Identity,
    device: &KnownDevice,
    opts: &ConnectOptions,
) -> Result<Session, ClientError> {
    let session = connect(endpoint, identity, device, opts).await?;
    session.require_user()?;
    learn(home, &session, device).await;
    Ok(session)
}

/// Records the device id and user this session revealed, the user's token when the entry lacks
/// it (or belongs to another user), and the device's relays; a file error is only logged.
pub(crate) async fn learn(home: &ClientHome, session: &Session, device: &KnownDevice) {
    // A JWT of the device's identity provider was the user's choice: keep presenting it.
    let jwt = device
        .sct
        .as_ref()
        .is_some_and(|t| crate::jwt::looks_like_jwt(t.expose()));
    let sct = if !jwt && (device.sct.is_none() || device.user != session.welcome.user) {
        session.me().await.ok().flatten().and_then(|m| m.sct)
    } else {
        None
    };
    // An older device does not know the request: keep what we have.
    let relays = session.relays().await.ok();
    if let Err(e) = home.remember(
        &device.name,
        &session.welcome,
        sct.as_ref(),
        relays.as_deref(),
    ) {
        tracing::warn!("could not update known_devices.toml: {e}");
    }
    session.record_seen(home);
}
