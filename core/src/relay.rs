//! The relay leg protocol (ALPN `tunnel-relay/1`): what devices, clients and `tunnel-relay` say to
//! each other, and the tag on every relayed datagram.
//!
//! Kind: pure.
//!
//! A *leg* is a QUIC connection from a device or a client to a relay, both ends authenticated by
//! pinned keys as everywhere else. Its first bidirectional stream is the control stream, frames
//! in the project's codec ([`crate::codec`]):
//!
//! - a device sends [`LegHello::Attach`] (its id and the SHA-256 hashes of the tokens that may
//!   reach it), the relay answers [`RelayEvent::Attached`] or [`RelayEvent::Refused`]; later the
//!   device sends [`DeviceUpdate::Tokens`] whenever its tokens change, and the relay tells it
//!   [`RelayEvent::ChannelClosed`] when a client's leg ends;
//! - a client sends [`LegHello::Connect`] (the device id, a channel id of its choosing, its token
//!   or JWT), the relay answers [`RelayEvent::Connected`] or [`RelayEvent::Refused`] with a stable
//!   [`RelayCode`]. Nothing is forwarded before the answer.
//!
//! After that, the client ⇄ device QUIC connection (the same pinned-key TLS as direct) travels
//! in QUIC DATAGRAM frames of the two legs: each datagram is [`TAG_LEN`] bytes of channel id
//! (big endian) and one inner QUIC packet. The relay moves them opaquely; it never holds an inner
//! key.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// ALPN of relay legs.
pub const ALPN: &[u8] = b"tunnel-relay/1";

/// Version of the leg protocol (2: candidates for hole punching).
pub const PROTOCOL_VERSION: u16 = 2;

/// Candidate addresses one end may announce.
pub const MAX_CANDIDATES: usize = 8;

/// Largest control frame (a device's token hashes: 32 bytes per user).
pub const MAX_FRAME: usize = 512 * 1024;

/// Token hashes one device may upload.
pub const MAX_TOKENS: usize = 8192;

/// Bytes of channel id in front of every relayed datagram.
pub const TAG_LEN: usize = 8;

/// Smallest datagram a leg must carry: a QUIC packet of the inner connection (≥ 1200 bytes) and
/// its tag. A leg whose path cannot carry it is useless, and says so.
pub const MIN_LEG_DATAGRAM: usize = 1200 + TAG_LEN;

/// The channel id of a path probe: a datagram with this tag is sent back by the relay to the leg
/// it came from, so a leg can prove that its path carries [`MIN_LEG_DATAGRAM`]-byte datagrams.
/// No client may use it as a channel.
pub const PROBE_CHANNEL: u64 = u64::MAX;

/// The tag of `channel`.
pub fn tag(channel: u64) -> [u8; TAG_LEN] {
    channel.to_be_bytes()
}

/// Splits a relayed datagram into its channel and the inner packet; `None` when it is too short
/// to hold a tag.
pub fn split_tag(datagram: &[u8]) -> Option<(u64, &[u8])> {
    let (tag, rest) = datagram.split_first_chunk::<TAG_LEN>()?;
    Some((u64::from_be_bytes(*tag), rest))
}

/// SHA-256 of a token: what a device uploads and a relay keeps instead of the token itself, so a
/// compromised relay leaks no token.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenHash(pub [u8; 32]);

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", hex::encode(&self.0[..4]))
    }
}

impl TokenHash {
    /// The hash of `token`.
    pub fn of(token: &Secret) -> Self {
        Self(Sha256::digest(token.expose().as_bytes()).into())
    }

    /// Whether it is one of `set`: every entry is compared in constant time, with no early exit.
    pub fn is_in<'a>(&self, set: impl IntoIterator<Item = &'a Self>) -> bool {
        let mut hit = subtle::Choice::from(0);
        for h in set {
            hit |= self.0.ct_eq(&h.0);
        }
        hit.into()
    }
}

/// The first frame on a leg's control stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LegHello {
    /// A device attaches.
    Attach {
        /// [`PROTOCOL_VERSION`].
        version: u16,
        /// The device id the relay knows it by (with its key's fingerprint).
        device_id: String,
        /// Hashes of every token that may reach the device.
        tokens: Vec<TokenHash>,
        /// Where clients may try to reach the device directly (hole punching): the reflexive
        /// address of its main socket and its local address; at most [`MAX_CANDIDATES`].
        candidates: Vec<SocketAddr>,
    },
    /// A client asks for a channel to a device.
    Connect {
        /// [`PROTOCOL_VERSION`].
        version: u16,
        /// The device.
        device_id: String,
        /// The channel id the client chose (random; kept across leg reconnects so the inner
        /// connection keeps its address).
        channel: u64,
        /// The client's server-connect token, or a JWT from the device's identity provider.
        token: Option<Secret>,
        /// Where the device may try to reach the client directly; at most [`MAX_CANDIDATES`].
        candidates: Vec<SocketAddr>,
    },
}

/// Later frames from a device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DeviceUpdate {
    /// The device's tokens changed: the whole new set.
    Tokens(Vec<TokenHash>),
    /// The device's candidate addresses changed (its reflexive address moved): the new set,
    /// given to clients that connect from now on.
    Candidates(Vec<SocketAddr>),
}

/// Frames from the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayEvent {
    /// The device is attached; `observed` is its address as the relay sees it.
    Attached {
        /// Reflexive address of the leg.
        observed: SocketAddr,
    },
    /// The client's channel is open; datagrams flow from now on.
    Connected {
        /// Reflexive address of the leg.
        observed: SocketAddr,
        /// The device's candidate addresses (for hole punching).
        peer: Vec<SocketAddr>,
    },
    /// To a device: a client opened a channel; `peer` are its candidate addresses.
    ChannelOpened {
        /// The channel.
        channel: u64,
        /// The client's candidates (for hole punching).
        peer: Vec<SocketAddr>,
    },
    /// Refused; the leg is closed after this.
    Refused {
        /// Why.
        code: RelayCode,
    },
    /// To a device: a client's channel ended (its leg closed).
    ChannelClosed {
        /// The channel.
        channel: u64,
    },
    /// To a client: the device is attached to another relay of the fleet; connect there (with
    /// the same channel and token). The leg is closed after this. The client trusts the
    /// fingerprint because the relay that sent it is pinned.
    Redirect {
        /// Where the other relay listens (`host:port`).
        addr: String,
        /// Its key.
        fingerprint: crate::identity::Fingerprint,
    },
}

/// Redirects a client follows for one channel at most (a loop between relays ends there).
pub const MAX_REDIRECTS: usize = 2;

/// Why a relay refused a leg: stable numbers, also used as QUIC close codes of legs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelayCode(pub u32);

impl RelayCode {
    /// Normal end.
    pub const NORMAL: Self = Self(0);
    /// The relay serves no device with that id.
    pub const UNKNOWN_DEVICE: Self = Self(1);
    /// The device is not attached now.
    pub const DEVICE_OFFLINE: Self = Self(2);
    /// The token (or JWT) is not one the device accepts.
    pub const TOKEN_REJECTED: Self = Self(3);
    /// Too many failed attempts from this source; retry later.
    pub const RATE_LIMITED: Self = Self(4);
    /// A device id presented with a key that is not the one the relay has for it.
    pub const WRONG_KEY: Self = Self(5);
    /// A cap was reached (channels per device or per client, legs in all).
    pub const BUSY: Self = Self(6);
    /// The channel id is in use on that device; pick another.
    pub const CHANNEL_IN_USE: Self = Self(7);
    /// A malformed or unexpected frame, or another protocol version.
    pub const PROTOCOL: Self = Self(8);
    /// The relay is shutting down.
    pub const SHUTDOWN: Self = Self(9);
    /// Another leg attached the same device (the newest wins).
    pub const REPLACED: Self = Self(10);
    /// The device is not attached here and the fleet's registry cannot be reached to find it.
    pub const REGISTRY_UNAVAILABLE: Self = Self(11);

    /// What it means, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NORMAL => "closed",
            Self::UNKNOWN_DEVICE => "the relay serves no device with that id",
            Self::DEVICE_OFFLINE => "the device is not attached to the relay now",
            Self::TOKEN_REJECTED => "the relay refused the token (not one the device accepts)",
            Self::RATE_LIMITED => "too many failed attempts from this address; retry later",
            Self::WRONG_KEY => "the relay has a different key for this device id",
            Self::BUSY => "the relay is at a limit (channels or connections)",
            Self::CHANNEL_IN_USE => "the channel id is in use",
            Self::PROTOCOL => "protocol error (another version, or a malformed frame)",
            Self::SHUTDOWN => "the relay is shutting down",
            Self::REPLACED => "another connection attached the same device",
            Self::REGISTRY_UNAVAILABLE => {
                "the device is not attached to this relay, and the relay cannot reach its fleet's \
                 registry to find where it is"
            }
            _ => "unknown reason",
        }
    }

    /// A short stable name for metrics labels (`other` for unknown codes).
    pub fn label(self) -> &'static str {
        match self {
            Self::NORMAL => "normal",
            Self::UNKNOWN_DEVICE => "unknown_device",
            Self::DEVICE_OFFLINE => "device_offline",
            Self::TOKEN_REJECTED => "token_rejected",
            Self::RATE_LIMITED => "rate_limited",
            Self::WRONG_KEY => "wrong_key",
            Self::BUSY => "busy",
            Self::CHANNEL_IN_USE => "channel_in_use",
            Self::PROTOCOL => "protocol",
            Self::SHUTDOWN => "shutdown",
            Self::REPLACED => "replaced",
            Self::REGISTRY_UNAVAILABLE => "registry_unavailable",
            _ => "other",
        }
    }

    /// As a QUIC close code.
    pub fn to_varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self.0)
    }

    /// From a QUIC close code.
    pub fn from_varint(v: quinn::VarInt) -> Self {
        Self(u32::try_from(v.into_inner()).unwrap_or(u32::MAX))
    }
}

impl fmt::Debug for RelayCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayCode({}: {})", self.0, self.describe())
    }
}

impl fmt::Display for RelayCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn tags_round_trip_and_short_datagrams_are_refused() {
        let mut d = tag(0x0102_0304_0506_0708).to_vec();
        d.extend_from_slice(b"inner");
        assert_eq!(split_tag(&d), Some((0x0102_0304_0506_0708, &b"inner"[..])));
        assert_eq!(split_tag(&d[..8]), Some((0x0102_0304_0506_0708, &b""[..])));
        assert_eq!(split_tag(&d[..7]), None);
        assert_eq!(split_tag(&[]), None);
    }

    #[test]
    fn token_hashes_match_only_their_token() {
        let a = Secret::new("tokenA");
        let set = [TokenHash::of(&Secret::new("x")), TokenHash::of(&a)];
        assert!(TokenHash::of(&a).is_in(&set));
        assert!(!TokenHash::of(&Secret::new("tokenB")).is_in(&set));
        assert!(!TokenHash::of(&a).is_in(&[]));
        assert!(!format!("{:?}", set[1]).contains(&hex::encode(set[1].0)));
    }

    #[test]
    fn frames_round_trip_and_every_truncation_fails() {
        let msgs = [
            LegHello::Attach {
                version: PROTOCOL_VERSION,
                device_id: "cam".into(),
                tokens: vec![TokenHash([7; 32])],
                candidates: vec!["203.0.113.1:5592".parse().unwrap()],
            },
            LegHello::Connect {
                version: PROTOCOL_VERSION,
                device_id: "cam".into(),
                channel: u64::MAX,
                token: Some(Secret::new("t")),
                candidates: vec!["[2001:db8::1]:9".parse().unwrap()],
            },
        ];
        for m in &msgs {
            let bytes = codec::encode_to_vec(m, MAX_FRAME).unwrap();
            let back: LegHello = codec::decode_exact(&bytes, MAX_FRAME).unwrap();
            assert_eq!(format!("{back:?}"), format!("{m:?}"));
            for cut in 0..bytes.len() {
                assert!(codec::decode_exact::<LegHello>(&bytes[..cut], MAX_FRAME).is_err());
            }
        }
        let ev = RelayEvent::Refused {
            code: RelayCode::TOKEN_REJECTED,
        };
        let bytes = codec::encode_to_vec(&ev, MAX_FRAME).unwrap();
        assert_eq!(
            codec::decode_exact::<RelayEvent>(&bytes, MAX_FRAME).unwrap(),
            ev
        );
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(RelayCode::TOKEN_REJECTED.0, 3);
        assert_eq!(
            RelayCode::from_varint(RelayCode::WRONG_KEY.to_varint()),
            RelayCode::WRONG_KEY
        );
        assert_eq!(RelayCode(999).describe(), "unknown reason");
    }
}
