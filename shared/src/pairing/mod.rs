//! Pairing: the four modes ([`PairingMode`]), the pairing string ([`string`]), the
//! password-authenticated key exchange ([`pake`]), the limiter on password attempts
//! ([`limiter`]) and the device's side of a password pairing as a state machine ([`flow`]).
//!
//! Kind: pure. No IO; time is an input (`now`), randomness comes from the OS CSPRNG.
//!
//! # PAKE
//! Password modes use SPAKE2 (the `spake2` crate, Ed25519 group) so the password never crosses
//! the wire. It is bound to this TLS channel twice:
//! - the SPAKE2 identities are the client's and the device's key fingerprints *as each side sees
//!   them in the TLS handshake*, plus the user name;
//! - both sides prove they derived the same key with an HMAC over a TLS exporter value of this
//!   QUIC connection ([`EXPORTER_LABEL`]).
//!
//! A man in the middle who terminates TLS on both sides with its own keys sees different
//! fingerprints and exporters on each side, so the two SPAKE2 keys differ and confirmation fails
//! on both sides, even if it forwards every message faithfully. The device changes nothing before
//! the client's confirmation MAC verifies (constant-time), and the client accepts the device only
//! after the device's MAC verifies.

pub mod flow;
pub mod limiter;
pub mod pake;
pub mod string;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use flow::{Expected, FlowError, PasswordFlow};
pub use limiter::{AttemptLimiter, LimiterConfig, Verdict};
pub use pake::{Channel, ClientConfirm, ClientPake, DevicePake, EXPORTER_LABEL, PakeError};
pub use string::{PairingString, PairingStringError, render_qr};

/// Length of generated pairing passwords and server-connect tokens (57-symbol alphabet: > 70 bits).
pub const SECRET_LEN: usize = 14;

/// A pairing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PairingMode {
    /// A local connection becomes the first user, once.
    LocalInitial,
    /// A local connection becomes a new user with the open-pairing role.
    LocalOpen,
    /// Whoever knows a user's one-time password claims that user.
    PasswordInvite,
    /// Whoever knows the shared open password becomes a new user with the open-pairing role.
    PasswordOpen,
}

impl PairingMode {
    /// All modes.
    pub const ALL: [Self; 4] = [
        Self::LocalInitial,
        Self::LocalOpen,
        Self::PasswordInvite,
        Self::PasswordOpen,
    ];

    /// Command-line name, e.g. `password-invite`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::LocalInitial => "local-initial",
            Self::LocalOpen => "local-open",
            Self::PasswordInvite => "password-invite",
            Self::PasswordOpen => "password-open",
        }
    }

    /// Whether the mode needs a local connection.
    pub const fn local_only(self) -> bool {
        matches!(self, Self::LocalInitial | Self::LocalOpen)
    }

    /// The IAM action that authorizes it.
    pub const fn action(self) -> crate::iam::Action {
        use crate::iam::Action;
        match self {
            Self::LocalInitial => Action::PairingLocalInitial,
            Self::LocalOpen => Action::PairingLocalOpen,
            Self::PasswordInvite => Action::PairingPasswordInvite,
            Self::PasswordOpen => Action::PairingPasswordOpen,
        }
    }
}

impl fmt::Display for PairingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no [`PairingMode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown pairing mode '{0}'; modes are local-initial, local-open, password-invite, \
     password-open"
)]
pub struct UnknownMode(pub String);

impl FromStr for PairingMode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownMode(s.to_string()))
    }
}
