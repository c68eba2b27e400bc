//! The client: its home (key and pinned devices), connecting to a device, control requests, and
//! pairing.
//!
//! Kind: IO. The long-running port forwarder is [`open`]; pairing flows are in [`pair`].
//!
//! A connection attempt tries the device's addresses in order. The TLS verifier accepts only the
//! pinned fingerprint; a different key is reported as [`ConnectError::FingerprintMismatch`] with
//! both fingerprints, and is never retried or "accepted". A device that closes the connection
//! with an application code (unknown key, revoked, token rejected…) yields
//! [`ConnectError::Refused`]. Remote connections present the server-connect token stored with the
//! device.

pub mod open;
pub mod pair;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tracing::debug;

use crate::config::{
    ConfigError, HostPort, KnownDevice, KnownDevices, LookupError, TransportSettings,
};
use crate::framed::{self, FrameError};
use crate::fsutil::{self, LockFile};
use crate::identity::{self, Fingerprint, KeyFileError};
use crate::proto::{
    self, CloseCode, ErrorCode, ErrorReply, Hello, PairingInfo, Request, Response, ServiceInfo,
    UserInfo, Welcome,
};
use crate::secret::Secret;
use crate::transport::{self, Identity, TransportError};

/// File layout of a client home directory.
#[derive(Debug, Clone)]
pub struct ClientHome {
    dir: PathBuf,
}

impl ClientHome {
    /// The home at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `client.key`.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// `known_devices.toml`.
    pub fn known_path(&self) -> PathBuf {
        self.dir.join("known_devices.toml")
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("known_devices.lock")
    }

    /// Loads the client key, creating the home and the key on first use.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn identity(&self) -> Result<Identity, ClientError> {
        self.ensure_dir()?;
        let (key, created) = identity::load_or_create_key(&self.key_path())?;
        if created {
            tracing::info!(
                fingerprint = %key.fingerprint(),
                path = %self.key_path().display(),
                "created a new client key"
            );
        }
        Ok(Identity::new(key)?)
    }

    fn ensure_dir(&self) -> Result<(), ClientError> {
        fsutil::ensure_private_dir(&self.dir).map_err(|source| ClientError::Io {
            path: self.dir.clone(),
            source,
        })
    }

    /// The pinned devices.
    ///
    /// # Errors
    /// [`ClientError::Config`] for a corrupt file.
    pub fn known_devices(&self) -> Result<KnownDevices, ClientError> {
        Ok(KnownDevices::load(&self.known_path())?)
    }

    /// Finds a pinned device by name, id or fingerprint prefix.
    ///
    /// # Errors
    /// [`ClientError::Lookup`] or a file error.
    pub fn find_device(&self, query: &str) -> Result<KnownDevice, ClientError> {
        Ok(self.known_devices()?.find(query)?.clone())
    }

    /// Locked read-modify-write of `known_devices.toml`.
    ///
    /// # Errors
    /// `change`'s error or file errors; the file is unchanged on error.
    pub fn update_known<R>(
        &self,
        change: impl FnOnce(&mut KnownDevices) -> Result<R, ClientError>,
    ) -> Result<R, ClientError> {
        self.ensure_dir()?;
        let _lock = LockFile::acquire(&self.lock_path()).map_err(|source| ClientError::Io {
            path: self.lock_path(),
            source,
        })?;
        let mut known = self.known_devices()?;
        let out = change(&mut known)?;
        known.save(&self.known_path())?;
        Ok(out)
    }

    /// Pins a device by hand (like adding a `known_hosts` line).
    ///
    /// # Errors
    /// [`ClientError::Usage`] when the name is already pinned.
    pub fn add_device(
        &self,
        name: &str,
        addresses: Vec<HostPort>,
        fingerprint: Fingerprint,
        sct: Option<Secret>,
    ) -> Result<KnownDevice, ClientError> {
        crate::config::check_id("device name", name).map_err(|e| ClientError::Usage(e.0))?;
        if addresses.is_empty() {
            return Err(ClientError::Usage(
                "give at least one --addr HOST:PORT".into(),
            ));
        }
        self.update_known(|known| {
            if let Some(d) = known.devices.iter().find(|d| d.name == name) {
                return Err(ClientError::Usage(format!(
                    "a device named '{}' is already known (fingerprint {}); `tunnel-client forget {}` first",
                    d.name, d.fingerprint, d.name
                )));
            }
            let dev = KnownDevice {
                name: name.to_string(),
                fingerprint,
                addresses,
                device_id: None,
                user: None,
                sct,
            };
            known.devices.push(dev.clone());
            Ok(dev)
        })
    }

    /// Saves a device learned by pairing: a new entry, or an update of the entry with the same
    /// name *and* fingerprint. A name pinned to another key is never overwritten.
    ///
    /// # Errors
    /// [`ClientError::Usage`] for a name pinned to another key.
    pub fn save_paired(&self, dev: KnownDevice) -> Result<KnownDevice, ClientError> {
        self.update_known(
            |known| match known.devices.iter_mut().find(|d| d.name == dev.name) {
                Some(d) if d.fingerprint != dev.fingerprint => Err(ClientError::Usage(format!(
                    "'{}' is already pinned to another key ({}); choose another --name or \
                     `tunnel-client forget {}` first",
                    d.name, d.fingerprint, d.name
                ))),
                Some(d) => {
                    *d = dev.clone();
                    Ok(dev)
                }
                None => {
                    known.devices.push(dev.clone());
                    Ok(dev)
                }
            },
        )
    }

    /// Removes a pinned device.
    ///
    /// # Errors
    /// [`ClientError::Lookup`] when nothing matches.
    pub fn forget(&self, query: &str) -> Result<KnownDevice, ClientError> {
        self.update_known(|known| {
            let name = known.find(query)?.name.clone();
            let idx = known
                .devices
                .iter()
                .position(|d| d.name == name)
                .ok_or_else(|| LookupError::NotFound(query.to_string()))?;
            Ok(known.devices.remove(idx))
        })
    }

    /// Records what a device told us about itself on connect (id, user, and the user's token when
    /// known), if anything changed.
    ///
    /// # Errors
    /// File errors.
    pub fn remember(
        &self,
        name: &str,
        welcome: &Welcome,
        sct: Option<&Secret>,
    ) -> Result<(), ClientError> {
        let known = self.known_devices()?;
        let unchanged = known.devices.iter().any(|d| {
            d.name == name
                && d.device_id.as_deref() == Some(welcome.device_id.as_str())
                && d.user == welcome.user
                && sct.is_none_or(|s| d.sct.as_ref() == Some(s))
        });
        if unchanged {
            return Ok(());
        }
        self.update_known(|known| {
            if let Some(d) = known.devices.iter_mut().find(|d| d.name == name) {
                d.device_id = Some(welcome.device_id.clone());
                d.user.clone_from(&welcome.user);
                if let Some(s) = sct {
                    d.sct = Some(s.clone());
                }
            }
            Ok(())
        })
    }
}

/// A client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A file is corrupt or unreadable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The key file is unusable.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The device reference matched nothing or several devices.
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// TLS or socket setup failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Connecting to the device failed, or it refused a request.
    #[error(transparent)]
    Connect(Box<ConnectError>),
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
    /// A local listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// LAN discovery failed.
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
}

impl From<ConnectError> for ClientError {
    fn from(e: ConnectError) -> Self {
        Self::Connect(Box::new(e))
    }
}

impl ClientError {
    /// Exit code: 2 for usage and file problems, 1 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Lookup(_) | Self::Usage(_) => 2,
            Self::Key(KeyFileError::Unprotected { .. } | KeyFileError::Invalid { .. }) => 2,
            _ => 1,
        }
    }
}

/// Connecting to a device failed, or it answered a request with an error.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The device presented a different key than the pinned one.
    #[error("{0}")]
    FingerprintMismatch(Box<Mismatch>),
    /// The device closed the connection with a reason.
    #[error("{}", refused_message(.device, *.code, .reason, .client))]
    Refused {
        /// The device's local name.
        device: String,
        /// Its close code.
        code: CloseCode,
        /// Its reason text.
        reason: String,
        /// This client's fingerprint.
        client: Fingerprint,
    },
    /// Connected, but this key is on no user of the device.
    #[error(
        "device '{device}' does not know your key {client}; pair with it (`tunnel-client pair \
         PAIRING_STRING`) or ask its owner to add it (`tunnel-device user add NAME --fingerprint {client}`)"
    )]
    NotPaired {
        /// The device's local name.
        device: String,
        /// This client's fingerprint.
        client: Fingerprint,
    },
    /// The device answered a request with an error.
    #[error("{}", device_error_message(.device, *.code, .message))]
    Device {
        /// The device's local name.
        device: String,
        /// The error code.
        code: ErrorCode,
        /// The device's explanation.
        message: String,
    },
    /// No address of the device answered.
    #[error("cannot reach device '{device}': {reason}")]
    Unreachable {
        /// The device's local name.
        device: String,
        /// Per-address failures.
        reason: String,
    },
    /// The device broke the protocol.
    #[error("protocol error with device '{device}': {reason}")]
    Protocol {
        /// The device's local name.
        device: String,
        /// What happened.
        reason: String,
    },
}

/// A device key that differs from the pinned one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The device's local name.
    pub device: String,
    /// The address that answered.
    pub addr: HostPort,
    /// Pinned fingerprint.
    pub expected: Fingerprint,
    /// Presented fingerprint.
    pub actual: Fingerprint,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            device,
            addr,
            expected,
            actual,
        } = self;
        write!(
            f,
            "\n@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
             @    WARNING: DEVICE IDENTIFICATION HAS CHANGED!         @\n\
             @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
             IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n\
             Someone could be intercepting your connection (man-in-the-middle attack),\n\
             or the device at {addr} was re-installed with a new key.\n\
             Device '{device}' is pinned to key\n    {expected}\n\
             but {addr} presented\n    {actual}\n\
             Nothing was sent. If you verified the new key with the device's owner, re-pin it:\n    \
             tunnel-client forget {device} && tunnel-client device add {device} --addr {addr} --fingerprint {actual}"
        )
    }
}

fn refused_message(device: &str, code: CloseCode, reason: &str, client: &Fingerprint) -> String {
    match code {
        CloseCode::UNKNOWN_KEY => format!(
            "device '{device}' does not know your key {client}; pair with it (`tunnel-client \
             pair PAIRING_STRING`) or ask its owner to add it (`tunnel-device user add NAME \
             --fingerprint {client}`)"
        ),
        CloseCode::REVOKED => {
            format!("device '{device}' revoked this client's access (key {client}); ask its owner")
        }
        CloseCode::SCT_REJECTED => format!(
            "device '{device}' refused this remote connection: it needs a valid server-connect \
             token, which pairing stores (re-pair, or ask the owner for the token: \
             `tunnel-client device add ... --sct TOKEN`)"
        ),
        CloseCode::REMOTE_DISABLED => {
            format!("device '{device}' accepts local connections only (remote access is off)")
        }
        CloseCode::VERSION => {
            format!("device '{device}' speaks an incompatible protocol version: {reason}")
        }
        _ => format!("device '{device}' closed the connection: {code}"),
    }
}

fn device_error_message(device: &str, code: ErrorCode, message: &str) -> String {
    match code {
        ErrorCode::FORBIDDEN => {
            format!("device '{device}' refused: {message} (your role does not allow it)")
        }
        _ => format!("device '{device}': {message} ({code})"),
    }
}

impl ConnectError {
    /// Whether retrying cannot help (wrong key, unknown key, revoked, token, version).
    pub fn is_fatal(&self) -> bool {
        match self {
            Self::FingerprintMismatch(_) | Self::NotPaired { .. } => true,
            Self::Refused { code, .. } => matches!(
                *code,
                CloseCode::UNKNOWN_KEY
                    | CloseCode::REVOKED
                    | CloseCode::VERSION
                    | CloseCode::SCT_REJECTED
                    | CloseCode::REMOTE_DISABLED
            ),
            Self::Device { .. } | Self::Unreachable { .. } | Self::Protocol { .. } => false,
        }
    }
}

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
    control: Arc<Mutex<(quinn::SendStream, quinn::RecvStream)>>,
    device: String,
}

impl Session {
    /// Sends a control request and waits for its response (an error reply is returned as is).
    ///
    /// # Errors
    /// [`ConnectError::Protocol`] or [`ConnectError::Refused`] when the connection failed.
    pub async fn request(&self, req: &Request) -> Result<Response, ConnectError> {
        let mut guard = self.control.lock().await;
        let (send, recv) = &mut *guard;
        let map = |e: FrameError| self.frame_error(&e);
        framed::write_frame(send, req, proto::MAX_FRAME_LEN)
            .await
            .map_err(map)?;
        framed::read_frame::<Response>(recv, proto::MAX_FRAME_LEN)
            .await
            .map_err(map)?
            .ok_or_else(|| ConnectError::Protocol {
                device: self.device.clone(),
                reason: "the device closed the control stream".into(),
            })
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
        match self.call(&Request::ListServices).await? {
            Response::Services(s) => Ok(s),
            r => Err(self.unexpected(&r)),
        }
    }

    /// This key's own user, with its token.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn me(&self) -> Result<Option<UserInfo>, ConnectError> {
        match self.call(&Request::GetMe).await? {
            Response::Me(m) => Ok(m),
            r => Err(self.unexpected(&r)),
        }
    }

    /// Pairing modes usable on this connection.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn pairing_info(&self) -> Result<PairingInfo, ConnectError> {
        match self.call(&Request::PairingGet).await? {
            Response::Pairing(p) => Ok(p),
            r => Err(self.unexpected(&r)),
        }
    }

    /// Closes the connection politely.
    pub fn close(&self) {
        self.conn.close(CloseCode::NORMAL.to_varint(), b"bye");
    }

    fn frame_error(&self, e: &FrameError) -> ConnectError {
        match e.connection_error() {
            Some(c) => connection_error(&self.device, c, Some(self.client_fingerprint)),
            None => ConnectError::Protocol {
                device: self.device.clone(),
                reason: e.to_string(),
            },
        }
    }
}

fn connection_error(
    device: &str,
    e: &quinn::ConnectionError,
    client: Option<Fingerprint>,
) -> ConnectError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => ConnectError::Refused {
            device: device.to_string(),
            code: CloseCode::from_varint(close.error_code),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
            client: client.unwrap_or_else(|| Fingerprint::from_bytes([0; 32])),
        },
        other => ConnectError::Unreachable {
            device: device.to_string(),
            reason: other.to_string(),
        },
    }
}

/// Where and how to reach a device.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// The device's local name (for messages).
    pub name: &'a str,
    /// Addresses, tried in order.
    pub addresses: &'a [HostPort],
    /// The pinned key, or `None` to trust the first key seen (pairing by address).
    pub pin: Option<Fingerprint>,
    /// Token for remote connections.
    pub sct: Option<&'a Secret>,
}

impl<'a> From<&'a KnownDevice> for Target<'a> {
    fn from(d: &'a KnownDevice) -> Self {
        Self {
            name: &d.name,
            addresses: &d.addresses,
            pin: Some(d.fingerprint),
            sct: d.sct.as_ref(),
        }
    }
}

/// Connects to `device`: tries each address in order, authenticates both keys, exchanges
/// `Hello`/`Welcome`.
///
/// # Errors
/// [`ConnectError`]; a fingerprint mismatch or refusal stops at once (no other address is tried).
pub async fn connect(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    device: &KnownDevice,
    opts: &ConnectOptions,
) -> Result<Session, ConnectError> {
    connect_to(endpoint, identity, &Target::from(device), opts).await
}

/// As [`connect`], for any [`Target`].
///
/// # Errors
/// As [`connect`].
pub async fn connect_to(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    target: &Target<'_>,
    opts: &ConnectOptions,
) -> Result<Session, ConnectError> {
    let mut failures = Vec::new();
    for hp in target.addresses {
        let addrs = match hp.resolve().await {
            Ok(a) => a,
            Err(e) => {
                failures.push(format!("{hp}: {e}"));
                continue;
            }
        };
        for addr in addrs {
            match connect_addr(endpoint, identity, target, hp, addr, opts).await {
                Ok(s) => return Ok(s),
                // A device that answered and refused, or broke the protocol, will not do better
                // at another address.
                Err(
                    e @ (ConnectError::FingerprintMismatch(_)
                    | ConnectError::Refused { .. }
                    | ConnectError::Protocol { .. }),
                ) => {
                    return Err(e);
                }
                Err(e) => {
                    debug!(%addr, "connect failed: {e}");
                    let reason = match e {
                        ConnectError::Unreachable { reason, .. }
                        | ConnectError::Protocol { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    failures.push(format!("{addr}: {reason}"));
                }
            }
        }
    }
    Err(ConnectError::Unreachable {
        device: target.name.to_string(),
        reason: failures.join("; "),
    })
}

async fn connect_addr(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    target: &Target<'_>,
    hp: &HostPort,
    addr: std::net::SocketAddr,
    opts: &ConnectOptions,
) -> Result<Session, ConnectError> {
    let name = target.name;
    let unreachable = |reason: String| ConnectError::Unreachable {
        device: name.to_string(),
        reason,
    };
    let (cfg, observed) = transport::client_config(identity, target.pin, &opts.transport)
        .map_err(|e| unreachable(e.to_string()))?;
    let connecting = endpoint
        .connect_with(cfg, addr, transport::SERVER_NAME)
        .map_err(|e| unreachable(e.to_string()))?;
    let seen = || observed.lock().ok().and_then(|g| *g);
    let mismatch = || {
        let expected = target.pin?;
        seen().filter(|fp| *fp != expected).map(|actual| {
            ConnectError::FingerprintMismatch(Box::new(Mismatch {
                device: name.to_string(),
                addr: hp.clone(),
                expected,
                actual,
            }))
        })
    };
    let me = identity.fingerprint();
    let handshake = async {
        let conn = connecting
            .await
            .map_err(|e| mismatch().unwrap_or_else(|| connection_error(name, &e, Some(me))))?;
        let device_fingerprint = seen()
            .or(target.pin)
            .ok_or_else(|| unreachable("no device key seen".into()))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| connection_error(name, &e, Some(me)))?;
        let hello = Hello {
            version: proto::PROTOCOL_VERSION,
            sct: target.sct.cloned(),
            client_name: opts.client_name.clone(),
        };
        let frame_err = |e: FrameError| match e.connection_error() {
            Some(c) => connection_error(name, c, Some(me)),
            None => ConnectError::Protocol {
                device: name.to_string(),
                reason: e.to_string(),
            },
        };
        framed::write_frame(&mut send, &hello, proto::MAX_FRAME_LEN)
            .await
            .map_err(frame_err)?;
        let welcome = framed::read_frame::<Welcome>(&mut recv, proto::MAX_FRAME_LEN)
            .await
            .map_err(frame_err)?
            .ok_or_else(|| ConnectError::Protocol {
                device: name.to_string(),
                reason: "the device closed the control stream before welcome".into(),
            })?;
        Ok(Session {
            conn,
            welcome,
            addr,
            host_port: hp.clone(),
            device_fingerprint,
            client_fingerprint: me,
            control: Arc::new(Mutex::new((send, recv))),
            device: name.to_string(),
        })
    };
    match tokio::time::timeout(opts.timeout, handshake).await {
        Ok(r) => r,
        Err(_) => Err(mismatch()
            .unwrap_or_else(|| unreachable(format!("no answer within {:?}", opts.timeout)))),
    }
}

/// Connects to a known device, makes sure this key is a user there, and records what was learned
/// (device id, user name, and the user's token if the entry lacked it).
///
/// # Errors
/// [`ConnectError::NotPaired`] for a key on no user, or any connection error.
pub async fn connect_paired(
    home: &ClientHome,
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    device: &KnownDevice,
    opts: &ConnectOptions,
) -> Result<Session, ClientError> {
    let session = connect(endpoint, identity, device, opts).await?;
    session.require_user()?;
    let sct = if device.sct.is_none() || device.user != session.welcome.user {
        session.me().await.ok().flatten().and_then(|m| m.sct)
    } else {
        None
    };
    if let Err(e) = home.remember(&device.name, &session.welcome, sct.as_ref()) {
        tracing::warn!("could not update known_devices.toml: {e}");
    }
    Ok(session)
}
