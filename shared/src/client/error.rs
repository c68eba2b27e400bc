//! What can go wrong on the client, each error saying what failed: [`ClientError`] for commands,
//! [`ConnectError`] for a connection or a device's answer.
//!
//! Kind: pure (types and messages).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::{ConfigError, HostPort, ValueError};
use crate::identity::{Fingerprint, KeyFileError};
use crate::pairing::PairingMode;
use crate::proto::{CloseCode, ErrorCode};
use crate::relay::RelayCode;
use crate::transport::TransportError;

pub use super::known::LookupError;

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
    /// A name or value given is malformed.
    #[error(transparent)]
    Value(#[from] ValueError),
    /// `device add` without an address or a relay.
    #[error("give at least one --addr HOST:PORT (or --relay ADDR with --relay-fingerprint)")]
    NoAddress,
    /// `device add` with a relay but no device id.
    #[error(
        "a relay knows the device by its id: give --device-id ID (tunnel-device init printed it)"
    )]
    NeedsDeviceId,
    /// `device add` with a name that is pinned already.
    #[error(
        "a device named '{name}' is already known (fingerprint {fingerprint}); `tunnel-client \
         forget {name}` first"
    )]
    NameTaken {
        /// The name.
        name: String,
        /// The key it is pinned to.
        fingerprint: Fingerprint,
    },
    /// Pairing would save a name that is pinned to another key.
    #[error(
        "'{name}' is already pinned to another key ({fingerprint}); choose another --name or \
         `tunnel-client forget {name}` first"
    )]
    PinnedToOtherKey {
        /// The name.
        name: String,
        /// The key it is pinned to.
        fingerprint: Fingerprint,
    },
    /// `open` without a forward.
    #[error("nothing to open: give at least one -L [BIND:]PORT:SERVICE")]
    NoForwards,
    /// Local open pairing without a user name.
    #[error("local open pairing creates a new user: give --username NAME")]
    NeedsUsername,
    /// A password mode asked for by address.
    #[error("{0} pairing needs a pairing string: tunnel-client pair PAIRING_STRING")]
    NeedsPairingString(PairingMode),
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
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// LAN discovery failed.
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    /// `up` is running already for this home.
    #[error(
        "`tunnel-client up` is already running for this home (pid {pid}); `tunnel-client reload` \
         makes it re-read forwards.toml"
    )]
    AlreadyUp {
        /// Its pid, as its pid file says.
        pid: String,
    },
    /// A tunnel (`stdio`) was refused by the device or broke off.
    #[error("{}", tunnel_message(.device, .service, .error))]
    Tunnel {
        /// The device's local name.
        device: String,
        /// The service.
        service: String,
        /// What happened.
        error: Box<crate::splice::SpliceError>,
    },
}

fn tunnel_message(device: &str, service: &str, error: &crate::splice::SpliceError) -> String {
    use crate::proto::StreamCode as C;
    match error.peer_code() {
        Some(C::FORBIDDEN) => format!(
            "device '{device}' refused the tunnel to '{service}': forbidden (your role may not \
             use it from here; `tunnel-client services {device}` lists what you may use)"
        ),
        Some(C::NO_SUCH_SERVICE) => format!(
            "device '{device}' has no service '{service}' (`tunnel-client services {device}` lists \
             them)"
        ),
        Some(C::TARGET_UNREACHABLE) => format!(
            "device '{device}' cannot reach the server behind '{service}' (is it running? \
             `tunnel-device run --self-test` on the device checks)"
        ),
        Some(C::LIMIT_REACHED) => {
            format!("device '{device}' refused the tunnel to '{service}': too many tunnels open")
        }
        _ => format!("the tunnel to '{service}' on device '{device}' broke off: {error}"),
    }
}

impl From<ConnectError> for ClientError {
    fn from(e: ConnectError) -> Self {
        Self::Connect(Box::new(e))
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
    /// A relay refused to connect us to the device (nothing was forwarded).
    #[error("{}", relay_refused_message(.device, .relay, *.code))]
    RelayRefused {
        /// The device's local name.
        device: String,
        /// The relay's address.
        relay: String,
        /// Why.
        code: RelayCode,
    },
}

fn relay_refused_message(device: &str, relay: &str, code: RelayCode) -> String {
    let hint = match code {
        RelayCode::TOKEN_REJECTED => {
            " (pairing stores the token; re-pair, or ask the owner for it: `tunnel-client device \
             add ... --sct -`)"
        }
        RelayCode::UNKNOWN_DEVICE => {
            " (the relay's operator adds it with `tunnel-relay device add ID --fingerprint FP`)"
        }
        RelayCode::DEVICE_OFFLINE => " (is tunnel-device running, with this relay in device.toml?)",
        _ => "",
    };
    format!("relay {relay} refused the connection to device '{device}': {code}{hint}")
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

impl ClientError {
    /// Maps an IO error on `path` to [`ClientError::Io`]: `.map_err(ClientError::io(&path))`.
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
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
            Self::RelayRefused { code, .. } => matches!(
                *code,
                RelayCode::TOKEN_REJECTED | RelayCode::UNKNOWN_DEVICE | RelayCode::WRONG_KEY
            ),
            Self::Device { .. } | Self::Unreachable { .. } | Self::Protocol { .. } => false,
        }
    }
}
