//! Stable numeric codes: request errors, connection close codes, stream reset codes.
//!
//! Kind: pure. Peers see only these numbers; the reasons stay in the local log. Never renumber.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Machine-readable reason of an [`ErrorReply`](super::ErrorReply). Unknown values from newer peers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The device could not decode the request (it may be older than the client).
    pub const UNKNOWN_REQUEST: Self = Self(1);
    /// Access control denied the request.
    pub const FORBIDDEN: Self = Self(2);
    /// The named object does not exist.
    pub const NOT_FOUND: Self = Self(3);
    /// The request was malformed.
    pub const BAD_REQUEST: Self = Self(4);
    /// The device failed internally (details are in its log).
    pub const INTERNAL: Self = Self(5);
    /// The pairing mode is switched off (or not usable on this connection).
    pub const PAIRING_DISABLED: Self = Self(6);
    /// This key is already paired, or the first user exists already.
    pub const ALREADY_PAIRED: Self = Self(7);
    /// The password (PAKE) did not verify.
    pub const WRONG_PASSWORD: Self = Self(8);
    /// Too many failed attempts; the message says when to retry.
    pub const TOO_MANY_ATTEMPTS: Self = Self(9);
    /// The name is taken.
    pub const CONFLICT: Self = Self(10);
    /// A password pairing request came before a successful PAKE.
    pub const NOT_AUTHENTICATED: Self = Self(11);
    /// Too many requests of this kind from this connection or address; the message says when to
    /// retry.
    pub const RATE_LIMITED: Self = Self(12);
    /// The invitation whose password was proven was already used to pair a key.
    pub const INVITATION_USED: Self = Self(13);
}

impl ErrorCode {
    /// A short stable name for metrics labels (`other` for unknown codes).
    pub fn label(self) -> &'static str {
        match self {
            Self::UNKNOWN_REQUEST => "unknown_request",
            Self::FORBIDDEN => "forbidden",
            Self::NOT_FOUND => "not_found",
            Self::BAD_REQUEST => "bad_request",
            Self::INTERNAL => "internal",
            Self::PAIRING_DISABLED => "pairing_disabled",
            Self::ALREADY_PAIRED => "already_paired",
            Self::WRONG_PASSWORD => "wrong_password",
            Self::TOO_MANY_ATTEMPTS => "too_many_attempts",
            Self::CONFLICT => "conflict",
            Self::NOT_AUTHENTICATED => "not_authenticated",
            Self::RATE_LIMITED => "rate_limited",
            Self::INVITATION_USED => "invitation_used",
            _ => "other",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match *self {
            Self::UNKNOWN_REQUEST => "unknown request",
            Self::FORBIDDEN => "forbidden",
            Self::NOT_FOUND => "not found",
            Self::BAD_REQUEST => "bad request",
            Self::INTERNAL => "internal error",
            Self::PAIRING_DISABLED => "pairing mode not available",
            Self::ALREADY_PAIRED => "already paired",
            Self::WRONG_PASSWORD => "wrong password",
            Self::TOO_MANY_ATTEMPTS => "too many attempts",
            Self::CONFLICT => "conflict",
            Self::NOT_AUTHENTICATED => "not authenticated",
            Self::RATE_LIMITED => "rate limited",
            Self::INVITATION_USED => "invitation already used",
            Self(n) => return write!(f, "error {n}"),
        };
        f.write_str(s)
    }
}

/// Application close code of a QUIC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u32);

impl CloseCode {
    /// Closed on purpose, nothing wrong (client exit).
    pub const NORMAL: Self = Self(0);
    /// The peer broke the protocol (bad frame, unexpected message, timeout in the handshake).
    pub const PROTOCOL: Self = Self(1);
    /// The device does not know the client's key.
    pub const UNKNOWN_KEY: Self = Self(2);
    /// A remote connection without a valid server-connect token.
    pub const SCT_REJECTED: Self = Self(3);
    /// The user's access was removed or changed while connected.
    pub const REVOKED: Self = Self(4);
    /// The device refuses remote connections.
    pub const REMOTE_DISABLED: Self = Self(5);
    /// The device is shutting down.
    pub const SHUTDOWN: Self = Self(6);
    /// The protocol versions are incompatible.
    pub const VERSION: Self = Self(7);
    /// The device is at its connection limit.
    pub const BUSY: Self = Self(8);

    /// The code as a QUIC varint.
    pub fn to_varint(self) -> quinn_proto::VarInt {
        quinn_proto::VarInt::from_u32(self.0)
    }

    /// Converts a received code; codes above `u32::MAX` map to [`Self::PROTOCOL`].
    pub fn from_varint(v: quinn_proto::VarInt) -> Self {
        u32::try_from(v.into_inner()).map_or(Self::PROTOCOL, Self)
    }

    /// A sentence for users.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NORMAL => "the connection was closed",
            Self::PROTOCOL => "protocol error",
            Self::UNKNOWN_KEY => "the device does not know this client's key",
            Self::SCT_REJECTED => {
                "the device requires a valid server-connect token for remote connections"
            }
            Self::REVOKED => "access was revoked by the device's owner",
            Self::REMOTE_DISABLED => "the device does not accept remote connections",
            Self::SHUTDOWN => "the device is shutting down",
            Self::VERSION => "incompatible protocol versions",
            Self::BUSY => "the device is at its connection limit",
            _ => "closed with an unknown code",
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.describe(), self.0)
    }
}

/// Reset / stop code of a data stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamCode(pub u32);

impl StreamCode {
    /// Cancelled without a specific reason.
    pub const CANCELLED: Self = Self(0);
    /// Access control denied the tunnel.
    pub const FORBIDDEN: Self = Self(1);
    /// The device has no such service.
    pub const NO_SUCH_SERVICE: Self = Self(2);
    /// The device could not connect to the service's target.
    pub const TARGET_UNREACHABLE: Self = Self(3);
    /// A stream or connection limit was reached.
    pub const LIMIT_REACHED: Self = Self(4);
    /// The TCP connection on the other end failed or was reset.
    pub const PEER_RESET: Self = Self(5);
    /// The far end is shutting down.
    pub const SHUTDOWN: Self = Self(6);
    /// The stream header was malformed or missing.
    pub const BAD_HEADER: Self = Self(7);

    /// The code as a QUIC varint.
    pub fn to_varint(self) -> quinn_proto::VarInt {
        quinn_proto::VarInt::from_u32(self.0)
    }

    /// Converts a received code; codes above `u32::MAX` map to [`Self::CANCELLED`].
    pub fn from_varint(v: quinn_proto::VarInt) -> Self {
        u32::try_from(v.into_inner()).map_or(Self::CANCELLED, Self)
    }

    /// A sentence for users.
    pub fn describe(self) -> &'static str {
        match self {
            Self::CANCELLED => "cancelled",
            Self::FORBIDDEN => "forbidden by the device's access control",
            Self::NO_SUCH_SERVICE => "no such service on the device",
            Self::TARGET_UNREACHABLE => "the device could not reach the service's target",
            Self::LIMIT_REACHED => "a connection or stream limit was reached",
            Self::PEER_RESET => "the connection on the other end was reset",
            Self::SHUTDOWN => "the other end is shutting down",
            Self::BAD_HEADER => "malformed stream header",
            _ => "reset with an unknown code",
        }
    }
}

impl StreamCode {
    /// A short stable name for metrics labels (`other` for unknown codes).
    pub fn label(self) -> &'static str {
        match self {
            Self::CANCELLED => "cancelled",
            Self::FORBIDDEN => "forbidden",
            Self::NO_SUCH_SERVICE => "no_such_service",
            Self::TARGET_UNREACHABLE => "target_unreachable",
            Self::LIMIT_REACHED => "limit_reached",
            Self::PEER_RESET => "peer_reset",
            Self::SHUTDOWN => "shutdown",
            Self::BAD_HEADER => "bad_header",
            _ => "other",
        }
    }
}

impl fmt::Display for StreamCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.describe(), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_describe() {
        for c in [CloseCode::UNKNOWN_KEY, CloseCode::REVOKED, CloseCode(999)] {
            assert_eq!(CloseCode::from_varint(c.to_varint()), c);
        }
        assert!(CloseCode::UNKNOWN_KEY.to_string().contains("does not know"));
        assert_eq!(
            StreamCode::from_varint(StreamCode::TARGET_UNREACHABLE.to_varint()),
            StreamCode::TARGET_UNREACHABLE
        );
        assert_eq!(
            CloseCode::from_varint(quinn_proto::VarInt::from_u64(1 << 40).unwrap()),
            CloseCode::PROTOCOL
        );
    }
}
