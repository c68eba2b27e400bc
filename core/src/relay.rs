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
//!   reach it, each marked when it is an owner's), the relay answers [`RelayEvent::Attached`] or
//!   [`RelayEvent::Refused`]; later the device sends [`DeviceUpdate::Tokens`] whenever its tokens
//!   change (the relay closes every channel a token no longer in the set opened), and the relay
//!   tells it [`RelayEvent::ChannelOpened`] (with the [`Credential`] that opened it) and
//!   [`RelayEvent::ChannelClosed`];
//! - a client sends [`LegHello::Connect`] (the device id, a channel id of its choosing, and a
//!   [`Proof`] that it holds a token: an HMAC keyed by the token's hash over this leg's TLS
//!   exporter, never the token itself; or a JWT), the relay answers [`RelayEvent::Connected`] or
//!   [`RelayEvent::Refused`] with a stable [`RelayCode`]. Nothing is forwarded before the answer,
//!   and nothing more may come on the client's control stream after it.
//!
//! The relay learns a token's hash (from the device) and a MAC bound to one leg (from the
//! client), never the token: a relay, or whoever reads its registry, cannot present a token to
//! the device, and a proof is worthless on any other leg.
//!
//! After that, the client ⇄ device QUIC connection (the same pinned-key TLS as direct) travels
//! in QUIC DATAGRAM frames of the two legs: each datagram is [`TAG_LEN`] bytes of channel id
//! (big endian) and one inner QUIC packet. The relay moves them opaquely; it never holds an inner
//! key.

use std::fmt;
use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// ALPN of relay legs.
pub const ALPN: &[u8] = b"tunnel-relay/1";

/// Version of the leg protocol (3: token proofs instead of tokens, owner marks, credentials of
/// channels; hole-punching candidates travel end to end, not through the relay).
pub const PROTOCOL_VERSION: u16 = 3;

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

    /// The public name of this hash in a [`Proof`] (so the relay finds the hash to check the MAC
    /// with without trying every one).
    pub fn key_id(&self) -> KeyId {
        let mut h = Sha256::new();
        h.update(b"tunnel-relay key id v1\0");
        h.update(self.0);
        let d = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        KeyId(id)
    }

    fn mac(&self, binding: &[u8; 32]) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        m.update(b"tunnel-relay connect v3\0");
        m.update(binding);
        m
    }

    /// The proof of holding the token behind this hash on the leg whose channel binding is
    /// `binding` ([`CONNECT_EXPORTER_LABEL`]).
    pub fn prove(&self, binding: &[u8; 32]) -> Proof {
        Proof::Mac {
            key: self.key_id(),
            mac: self.mac(binding).finalize().into_bytes().into(),
        }
    }

    /// Whether `mac` proves this hash on the leg of `binding` (constant time).
    pub fn verifies(&self, binding: &[u8; 32], mac: &[u8; 32]) -> bool {
        self.mac(binding).verify_slice(mac).is_ok()
    }
}

/// The first 8 bytes of a hash of a [`TokenHash`]: which hash a [`Proof::Mac`] is made with. It
/// reveals nothing the relay does not hold already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 8]);

/// A token the device accepts, as it tells its relays: the hash, and whether the token is an
/// owner's (owners' clients may use the channels and handshakes kept in reserve, so a flood by
/// other token holders cannot lock an owner out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenEntry {
    /// The token's hash.
    pub hash: TokenHash,
    /// Whether it is an owner's token.
    pub owner: bool,
}

/// How a client proves to a relay that it may reach a device.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proof {
    /// No credential (the relay refuses it).
    None,
    /// HMAC-SHA256 keyed by the token's hash over the leg's channel binding
    /// ([`TokenHash::prove`]): the relay checks it with the hash the device uploaded and never
    /// sees the token, and the MAC is useless on any other leg.
    Mac {
        /// Which hash it is made with.
        key: KeyId,
        /// The MAC.
        mac: [u8; 32],
    },
    /// A JWT of the device's identity provider: the relay must see it to check its signature.
    Jwt(Secret),
}

impl fmt::Debug for Proof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("Proof::None"),
            Self::Mac { key, .. } => write!(f, "Proof::Mac({})", hex::encode(key.0)),
            Self::Jwt(_) => f.write_str("Proof::Jwt(<redacted>)"),
        }
    }
}

impl Proof {
    /// The proof for `token` on the leg of `binding`: a MAC for a server-connect token, the JWT
    /// itself for a JWT; [`Proof::None`] without a token.
    pub fn for_token(token: Option<&Secret>, binding: &[u8; 32]) -> Self {
        match token {
            None => Self::None,
            Some(t) if crate::jwt::looks_like_jwt(t.expose()) => Self::Jwt(t.clone()),
            Some(t) => TokenHash::of(t).prove(binding),
        }
    }
}

/// The TLS exporter label of a leg's channel binding: both ends of a leg derive the same 32
/// bytes (context: the device id, a zero byte, the channel id in big endian), nobody else can.
pub const CONNECT_EXPORTER_LABEL: &[u8] = b"EXPORTER-tunnel-relay-connect-v3";

/// The context of [`CONNECT_EXPORTER_LABEL`] for `device_id` and `channel`.
pub fn binding_context(device_id: &str, channel: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(device_id.len() + 9);
    c.extend_from_slice(device_id.as_bytes());
    c.push(0);
    c.extend_from_slice(&channel.to_be_bytes());
    c
}

/// Which credential a relay admitted a channel with, as it tells the device (which budgets
/// handshakes per credential, not per channel): the token's hash, or for a JWT a hash of its
/// issuer and subject.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Credential(pub [u8; 32]);

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}…)", hex::encode(&self.0[..4]))
    }
}

impl Credential {
    /// The credential of a token with this hash.
    pub fn token(hash: &TokenHash) -> Self {
        Self(hash.0)
    }

    /// The credential of a JWT from `issuer` about `subject` (or, without a subject, of the
    /// JWT itself).
    pub fn jwt(issuer: &str, subject: Option<&str>, jwt: &Secret) -> Self {
        let mut h = Sha256::new();
        h.update(b"tunnel-relay jwt credential v1\0");
        match subject {
            Some(s) => {
                h.update(issuer.as_bytes());
                h.update([0]);
                h.update(s.as_bytes());
            }
            None => h.update(jwt.expose().as_bytes()),
        }
        Self(h.finalize().into())
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
        /// Every token that may reach the device; at most [`MAX_TOKENS`].
        tokens: Vec<TokenEntry>,
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
        /// That it holds a token the device accepts (or a JWT).
        proof: Proof,
    },
}

/// Later frames from a device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DeviceUpdate {
    /// The device's tokens changed: the whole new set. Channels opened with a token no longer in
    /// it are closed.
    Tokens(Vec<TokenEntry>),
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
    },
    /// To a device: a client opened a channel with `credential` (sent before the client hears
    /// `Connected`, so before its first packet).
    ChannelOpened {
        /// The channel.
        channel: u64,
        /// What admitted it.
        credential: Credential,
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
    /// the same channel and token). The leg is closed after this. The client follows it only to
    /// a relay it knows for the device (one the device itself named).
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
    /// The relay serves no device with that id and key (an attach; clients are told
    /// [`Self::DEVICE_OFFLINE`] or [`Self::TOKEN_REJECTED`] instead, so an id's existence is no
    /// answer to a stranger).
    pub const UNKNOWN_DEVICE: Self = Self(1);
    /// The device is not attached now.
    pub const DEVICE_OFFLINE: Self = Self(2);
    /// The token (or JWT) is not one the device accepts.
    pub const TOKEN_REJECTED: Self = Self(3);
    /// Too many failed attempts from this source; retry later.
    pub const RATE_LIMITED: Self = Self(4);
    /// A device id presented with a key that is not the one the relay has for it (no longer
    /// sent: such an attach is refused [`Self::UNKNOWN_DEVICE`], like an id the relay does not
    /// serve; kept for older peers).
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
            Self::UNKNOWN_DEVICE => "the relay serves no device with that id and key",
            Self::DEVICE_OFFLINE => "the device is not attached to the relay now",
            Self::TOKEN_REJECTED => {
                "the relay refused the token (not one the device accepts, or no longer)"
            }
            Self::RATE_LIMITED => "too many failed attempts from this address; retry later",
            Self::WRONG_KEY => "the relay has a different key for this device id",
            Self::BUSY => "the relay is at a limit (channels per device, token or client, or legs)",
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
        let hash = TokenHash([7; 32]);
        let msgs = [
            LegHello::Attach {
                version: PROTOCOL_VERSION,
                device_id: "cam".into(),
                tokens: vec![TokenEntry { hash, owner: true }],
            },
            LegHello::Connect {
                version: PROTOCOL_VERSION,
                device_id: "cam".into(),
                channel: u64::MAX,
                proof: hash.prove(&[1; 32]),
            },
            LegHello::Connect {
                version: PROTOCOL_VERSION,
                device_id: "cam".into(),
                channel: 1,
                proof: Proof::Jwt(Secret::new("a.b.c")),
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

    /// Issue 18, defect 7: the relay was sent the token itself, so a rogue relay (one a
    /// rewritten registry entry redirected to) harvested it. A proof carries no token, verifies
    /// only with the token's hash and only for the leg it was made on.
    #[test]
    fn a_proof_carries_no_token_and_binds_to_its_leg() {
        let token = Secret::new("abcdefghijkmnop");
        let hash = TokenHash::of(&token);
        let leg: [u8; 32] = [9; 32];
        let proof = Proof::for_token(Some(&token), &leg);
        let bytes = codec::encode_to_vec(
            &LegHello::Connect {
                version: PROTOCOL_VERSION,
                device_id: "cam".into(),
                channel: 7,
                proof: proof.clone(),
            },
            MAX_FRAME,
        )
        .unwrap();
        assert!(
            !bytes
                .windows(token.expose().len())
                .any(|w| w == token.expose().as_bytes()),
            "the token is in the Connect frame"
        );
        let Proof::Mac { key, mac } = proof else {
            panic!("a token gives a MAC proof");
        };
        assert_eq!(key, hash.key_id());
        assert!(hash.verifies(&leg, &mac));
        assert!(!hash.verifies(&[8; 32], &mac), "valid on another leg");
        assert!(!TokenHash::of(&Secret::new("other")).verifies(&leg, &mac));
        let mut bad = mac;
        bad[31] ^= 1;
        assert!(!hash.verifies(&leg, &bad));
        assert!(matches!(
            Proof::for_token(Some(&Secret::new("a.b.c")), &leg),
            Proof::Jwt(_)
        ));
        assert!(matches!(Proof::for_token(None, &leg), Proof::None));
        assert!(!format!("{:?}", Proof::Jwt(Secret::new("a.b.c"))).contains("a.b.c"));
    }

    #[test]
    fn binding_contexts_differ_per_device_and_channel() {
        assert_ne!(binding_context("cam", 1), binding_context("cam", 2));
        assert_ne!(binding_context("ca", 1), binding_context("cam", 1));
        let sub = Credential::jwt("iss", Some("alice"), &Secret::new("x.y.z"));
        assert_eq!(
            sub,
            Credential::jwt("iss", Some("alice"), &Secret::new("p.q.r"))
        );
        assert_ne!(
            sub,
            Credential::jwt("iss", Some("bob"), &Secret::new("x.y.z"))
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
