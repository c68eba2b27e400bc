//! Wire protocol: ALPN, control messages, the data-stream header, the frame codec, and the stable
//! close and reject codes.
//!
//! Kind: pure. No IO, no clock. Reading frames from a QUIC stream lives in [`crate::framed`].
//!
//! # Frames
//! Every message is one frame: `len: u32 BE | body: postcard | crc32(body): u32 BE`. `len` is
//! checked against the caller's maximum before anything is buffered, and trailing bytes, a wrong
//! checksum or a malformed body are errors, so every truncation and every byte flip of a frame is
//! rejected. The checksum is not security (QUIC already authenticates every byte); it catches
//! framing bugs and makes a desynchronised stream fail loudly.
//!
//! # Conversation
//! The client opens the **control stream** (its first bidirectional stream) and sends [`Hello`];
//! the device answers [`Welcome`] or closes the connection with a [`CloseCode`]. After that the
//! client sends [`Request`]s and the device answers each with one [`Response`], in order.
//! A request the device cannot decode (say, from a newer client) gets
//! [`Response::Error`] with [`ErrorCode::UNKNOWN_REQUEST`]; the connection stays up.
//!
//! Every other bidirectional stream is a **data stream**: the client writes one [`StreamOpen`]
//! frame and then, at once, the tunnelled bytes. The device either splices it to the service or
//! resets it with a [`StreamCode`].
//!
//! # Stability
//! Enum variants are encoded by position: append new variants at the end, never reorder. The
//! `golden_encodings` test pins the bytes.

use std::collections::BTreeMap;
use std::fmt;

use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::identity::Fingerprint;
use crate::pairing::PairingMode;
use crate::secret::Secret;

/// ALPN of protocol version 1.
pub const ALPN: &[u8] = b"tunnel/1";

/// Version carried in [`Hello`] and [`Welcome`].
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest control frame body (requests, responses, hello, welcome).
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Largest data-stream header body.
pub const MAX_STREAM_OPEN_LEN: usize = 1024;

/// Bytes of framing around a body: length prefix and checksum.
pub const FRAME_OVERHEAD: usize = 8;

/// First message of a connection, client → device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Server-connect token; required on remote connections.
    pub sct: Option<Secret>,
    /// A name for this client (e.g. its host name), for the device's logs.
    pub client_name: Option<String>,
}

/// The device's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The device's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The device's id (from `device.toml`).
    pub device_id: String,
    /// Its human-friendly name.
    pub device_name: String,
    /// The user this client's key belongs to, if any.
    pub user: Option<String>,
    /// That user's role (`Unpaired` without a user).
    pub role: String,
    /// Whether the device considers this connection local.
    pub local: bool,
}

/// A control request, client → device. Each is authorized by IAM (the action in parentheses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// List the services this user may see (`Tunnel:ListServices`, filtered by `Tunnel:GetService`).
    ListServices,
    /// One service (`Tunnel:GetService`).
    GetService {
        /// Service id.
        id: String,
    },
    /// This connection's own user, including its server-connect token (no action needed).
    GetMe,
    /// The pairing modes this connection may use (`Pairing:Get`).
    PairingGet,
    /// Become the first user (`Pairing:LocalInitial`).
    PairLocalInitial {
        /// User name (default `owner`).
        username: Option<String>,
        /// Label for this key.
        key_name: Option<String>,
    },
    /// Become a new user (`Pairing:LocalOpen`).
    PairLocalOpen {
        /// User name.
        username: String,
        /// Label for this key.
        key_name: Option<String>,
    },
    /// First PAKE message [`Pairing:PasswordInvite`, or `Pairing:PasswordOpen` with an empty
    /// user name].
    PakeStart {
        /// The invited user, or "" for the open-pairing password.
        username: String,
        /// SPAKE2 message.
        msg: Vec<u8>,
    },
    /// Key confirmation of the PAKE.
    PakeConfirm {
        /// HMAC over the TLS exporter value.
        mac: Vec<u8>,
    },
    /// Claim the invitation the PAKE authenticated (`Pairing:PasswordInvite`).
    PairPasswordInvite {
        /// Label for this key.
        key_name: Option<String>,
    },
    /// Become a new user after an open-password PAKE (`Pairing:PasswordOpen`).
    PairPasswordOpen {
        /// User name.
        username: String,
        /// Label for this key.
        key_name: Option<String>,
    },
    /// (`IAM:ListUsers`).
    ListUsers,
    /// (`IAM:GetUser`).
    GetUser {
        /// User name.
        username: String,
    },
    /// Create a user as an invitation with a one-time password (`IAM:CreateUser`).
    CreateUser {
        /// User name.
        username: String,
        /// Role (default: the open-pairing role).
        role: Option<String>,
    },
    /// (`IAM:DeleteUser`).
    DeleteUser {
        /// User name.
        username: String,
    },
    /// (`IAM:SetUserRole`).
    SetUserRole {
        /// User name.
        username: String,
        /// New role.
        role: String,
    },
    /// (`IAM:SetUserDisplayName`).
    SetUserDisplayName {
        /// User name.
        username: String,
        /// New display name (`None` clears it).
        display_name: Option<String>,
    },
    /// (`IAM:AddFingerprint`).
    AddFingerprint {
        /// User name.
        username: String,
        /// The key.
        fingerprint: Fingerprint,
        /// Label.
        key_name: Option<String>,
    },
    /// (`IAM:RemoveFingerprint`).
    RemoveFingerprint {
        /// User name.
        username: String,
        /// The key.
        fingerprint: Fingerprint,
    },
    /// (`IAM:ListRoles`).
    ListRoles,
    /// Pairing switches and open-pairing secrets (`IAM:GetSettings`).
    GetSettings,
    /// Switch a pairing mode (`IAM:SetSettings`).
    SetPairingMode {
        /// The mode.
        mode: PairingMode,
        /// On or off.
        enabled: bool,
    },
    /// (`Device:SetName`).
    SetDeviceName {
        /// New name.
        name: String,
    },
}

/// A control response, device → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Services visible to the caller.
    Services(Vec<ServiceInfo>),
    /// The request failed.
    Error(ErrorReply),
    /// Done, nothing to return.
    Ok,
    /// One service.
    Service(ServiceInfo),
    /// The caller's own user (with its token), or `None` when unpaired.
    Me(Option<UserInfo>),
    /// Pairing modes usable on this connection.
    Pairing(PairingInfo),
    /// The device's PAKE message.
    PakeReply {
        /// SPAKE2 message.
        msg: Vec<u8>,
    },
    /// The device's key confirmation.
    PakeConfirmed {
        /// HMAC over the TLS exporter value.
        mac: Vec<u8>,
    },
    /// Pairing done: who this key now is.
    Paired(UserInfo),
    /// Users (tokens only ever for the caller's own user).
    Users(Vec<UserInfo>),
    /// One user.
    User(UserInfo),
    /// A new invitation: share `password` with the invitee (with the device's pairing string).
    Invite(Invite),
    /// Role ids.
    Roles(Vec<String>),
    /// Pairing switches and open-pairing secrets.
    Settings(Settings),
}

/// What a client may learn about a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// Name.
    pub username: String,
    /// Display name.
    pub display_name: Option<String>,
    /// Role.
    pub role: String,
    /// Keys and their labels.
    pub fingerprints: Vec<(Fingerprint, Option<String>)>,
    /// Whether an invitation (one-time password) is pending.
    pub invited: bool,
    /// The server-connect token: only in answers about the caller's own user.
    pub sct: Option<Secret>,
}

/// Pairing modes usable on this connection, and what the device is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingInfo {
    /// Usable modes.
    pub modes: Vec<PairingMode>,
    /// Device id.
    pub device_id: String,
    /// Device name.
    pub device_name: String,
}

/// A new invitation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The invited user.
    pub username: String,
    /// Its role.
    pub role: String,
    /// Its one-time password.
    pub password: Secret,
    /// Its server-connect token.
    pub sct: Secret,
    /// Whether password invite pairing is enabled (else the invitation cannot be used yet).
    pub mode_enabled: bool,
}

/// Pairing settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Enabled modes.
    pub enabled: Vec<PairingMode>,
    /// Whether local initial pairing was used already.
    pub initial_done: bool,
    /// Role of open-pairing users.
    pub open_pairing_role: String,
    /// The shared open-pairing password.
    pub open_password: Secret,
    /// The open-pairing server-connect token.
    pub open_sct: Secret,
}

/// What a client may learn about a service. The target address stays on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Service id, e.g. `ssh`.
    pub id: String,
    /// Free-form type, e.g. `ssh`, `rtsp`, `http`.
    pub service_type: String,
    /// Free-form metadata from `device.toml`.
    pub metadata: BTreeMap<String, String>,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// A short explanation for the user. Never contains secrets or internal details.
    pub message: String,
}

/// The header of a data stream, client → device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamOpen {
    /// Splice this stream to the named service.
    Tunnel {
        /// The service id.
        service: String,
    },
}

/// Machine-readable reason of an [`ErrorReply`]. Unknown values from newer peers are kept.
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

impl fmt::Display for StreamCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.describe(), self.0)
    }
}

/// Encoding failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// The body would exceed the maximum frame size.
    #[error("message of {len} bytes exceeds the {max}-byte frame limit")]
    TooLarge {
        /// Body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Serialization failed.
    #[error("cannot encode message: {0}")]
    Serialize(String),
}

/// Decoding failed. None of these ever panics or allocates more than the frame limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The length prefix exceeds the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input ended inside a frame.
    #[error("truncated frame")]
    Truncated,
    /// Bytes follow the frame where none may.
    #[error("trailing bytes after the frame")]
    TrailingBytes,
    /// The checksum does not match the body.
    #[error("frame checksum mismatch")]
    Checksum,
    /// The body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Appends `msg` as one frame to `out`.
///
/// # Errors
/// [`EncodeError::TooLarge`] when the body exceeds `max`.
pub fn encode<T: Serialize>(msg: &T, max: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    let body = postcard::to_stdvec(msg).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if body.len() > max {
        return Err(EncodeError::TooLarge {
            len: body.len(),
            max,
        });
    }
    let len = u32::try_from(body.len()).map_err(|_| EncodeError::TooLarge {
        len: body.len(),
        max,
    })?;
    out.reserve(body.len() + FRAME_OVERHEAD);
    out.put_u32(len);
    out.put_slice(&body);
    out.put_u32(crc32(&body));
    Ok(())
}

/// Encodes `msg` into a fresh buffer.
///
/// # Errors
/// As [`encode`].
pub fn encode_to_vec<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, EncodeError> {
    let mut out = BytesMut::new();
    encode(msg, max, &mut out)?;
    Ok(out.to_vec())
}

/// The total frame length (prefix + body + checksum) announced by the start of `buf`, once the
/// prefix is complete. `Ok(None)` means "need more bytes".
///
/// # Errors
/// [`DecodeError::TooLarge`] as soon as the prefix exceeds `max`.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, DecodeError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let mut p = [0u8; 4];
    p.copy_from_slice(prefix);
    let len = usize::try_from(u32::from_be_bytes(p)).unwrap_or(usize::MAX);
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    Ok(Some(len + FRAME_OVERHEAD))
}

/// Takes one frame off the front of `buf` if it is complete.
///
/// `Ok(None)` means more bytes are needed; `buf` is then untouched.
///
/// # Errors
/// [`DecodeError`] for an oversized, corrupt or malformed frame.
pub fn decode<T: DeserializeOwned>(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<T>, DecodeError> {
    let Some(total) = frame_len(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let frame = buf.split_to(total);
    decode_body(&frame[4..total - 4], &frame[total - 4..]).map(Some)
}

/// Decodes a buffer that must hold exactly one frame.
///
/// # Errors
/// [`DecodeError`], including [`DecodeError::Truncated`] and [`DecodeError::TrailingBytes`].
pub fn decode_exact<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, DecodeError> {
    let total = frame_len(bytes, max)?.ok_or(DecodeError::Truncated)?;
    match bytes.len().cmp(&total) {
        std::cmp::Ordering::Less => Err(DecodeError::Truncated),
        std::cmp::Ordering::Greater => Err(DecodeError::TrailingBytes),
        std::cmp::Ordering::Equal => decode_body(&bytes[4..total - 4], &bytes[total - 4..]),
    }
}

fn decode_body<T: DeserializeOwned>(body: &[u8], mut crc: &[u8]) -> Result<T, DecodeError> {
    if crc.get_u32() != crc32(body) {
        return Err(DecodeError::Checksum);
    }
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(msg)
}

/// CRC-32 (IEEE 802.3), bitwise: control frames are small and rare, so no table.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_messages() -> Vec<Vec<u8>> {
        let meta: BTreeMap<String, String> = [("path".to_string(), "/video".to_string())].into();
        vec![
            encode_to_vec(
                &Hello {
                    version: PROTOCOL_VERSION,
                    sct: Some(Secret::new("abcDEF123456")),
                    client_name: Some("laptop".into()),
                },
                MAX_FRAME_LEN,
            )
            .unwrap(),
            encode_to_vec(
                &Welcome {
                    version: 1,
                    device_id: "cam-1".into(),
                    device_name: "Front door".into(),
                    user: Some("alice".into()),
                    role: "Owner".into(),
                    local: true,
                },
                MAX_FRAME_LEN,
            )
            .unwrap(),
            encode_to_vec(
                &Response::Services(vec![ServiceInfo {
                    id: "rtsp".into(),
                    service_type: "rtsp".into(),
                    metadata: meta,
                }]),
                MAX_FRAME_LEN,
            )
            .unwrap(),
            encode_to_vec(
                &StreamOpen::Tunnel {
                    service: "ssh".into(),
                },
                MAX_STREAM_OPEN_LEN,
            )
            .unwrap(),
        ]
    }

    fn decode_any(bytes: &[u8]) -> Vec<bool> {
        vec![
            decode_exact::<Hello>(bytes, MAX_FRAME_LEN).is_ok(),
            decode_exact::<Welcome>(bytes, MAX_FRAME_LEN).is_ok(),
            decode_exact::<Response>(bytes, MAX_FRAME_LEN).is_ok(),
            decode_exact::<StreamOpen>(bytes, MAX_FRAME_LEN).is_ok(),
            decode_exact::<Request>(bytes, MAX_FRAME_LEN).is_ok(),
        ]
    }

    #[test]
    fn crc32_known_vector() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error() {
        for frame in sample_messages() {
            for cut in 0..frame.len() {
                assert!(
                    decode_any(&frame[..cut]).iter().all(|ok| !ok),
                    "truncation at {cut} decoded"
                );
            }
            for i in 0..frame.len() {
                for bit in 0..8 {
                    let mut f = frame.clone();
                    f[i] ^= 1 << bit;
                    assert!(
                        decode_any(&f).iter().all(|ok| !ok),
                        "flip of bit {bit} in byte {i} decoded"
                    );
                }
                for v in [0x00, 0xff, 0x80, 0x7f] {
                    let mut f = frame.clone();
                    if f[i] == v {
                        continue;
                    }
                    f[i] = v;
                    assert!(
                        decode_any(&f).iter().all(|ok| !ok),
                        "byte {i} := {v:#x} decoded"
                    );
                }
            }
            let mut longer = frame.clone();
            longer.push(0);
            assert_eq!(
                decode_exact::<Hello>(&longer, MAX_FRAME_LEN),
                Err(DecodeError::TrailingBytes)
            );
        }
    }

    #[test]
    fn oversized_prefix_is_rejected_before_buffering() {
        let mut buf = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode::<Hello>(&mut buf, MAX_FRAME_LEN),
            Err(DecodeError::TooLarge { .. })
        ));
        let big = Hello {
            version: 1,
            sct: Some(Secret::new("x".repeat(MAX_FRAME_LEN))),
            client_name: None,
        };
        assert!(matches!(
            encode_to_vec(&big, MAX_FRAME_LEN),
            Err(EncodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn streaming_decode_waits_for_whole_frame() {
        let frames = sample_messages();
        let mut buf = BytesMut::new();
        let first = &frames[0];
        for (i, b) in first.iter().enumerate() {
            assert_eq!(
                decode::<Hello>(&mut buf, MAX_FRAME_LEN).unwrap(),
                None,
                "at {i}"
            );
            buf.put_u8(*b);
        }
        buf.extend_from_slice(&frames[0]);
        assert!(decode::<Hello>(&mut buf, MAX_FRAME_LEN).unwrap().is_some());
        assert!(decode::<Hello>(&mut buf, MAX_FRAME_LEN).unwrap().is_some());
        assert!(buf.is_empty());
    }

    #[test]
    fn unknown_request_variant_is_a_decode_error_not_a_panic() {
        // Variant index 200 does not exist (yet).
        let body = [200u8, 1];
        let mut frame = BytesMut::new();
        frame.put_u32(2);
        frame.put_slice(&body);
        frame.put_u32(crc32(&body));
        assert!(matches!(
            decode_exact::<Request>(&frame, MAX_FRAME_LEN),
            Err(DecodeError::Malformed(_))
        ));
    }

    /// Pins the encoding: if this fails, the wire format changed incompatibly.
    #[test]
    fn golden_encodings() {
        assert_eq!(
            hex::encode(encode_to_vec(&Request::ListServices, MAX_FRAME_LEN).unwrap()),
            "00000001".to_owned() + "00" + &format!("{:08x}", crc32(&[0]))
        );
        let open = encode_to_vec(
            &StreamOpen::Tunnel {
                service: "ssh".into(),
            },
            MAX_STREAM_OPEN_LEN,
        )
        .unwrap();
        assert_eq!(&open[..9], &[0, 0, 0, 5, 0, 3, b's', b's', b'h']);
        let hello = encode_to_vec(
            &Hello {
                version: 1,
                sct: None,
                client_name: None,
            },
            MAX_FRAME_LEN,
        )
        .unwrap();
        assert_eq!(&hello[..7], &[0, 0, 0, 3, 1, 0, 0]);
    }

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

    proptest! {
        #[test]
        fn hello_round_trip(version: u16, sct in proptest::option::of(".{0,64}"), name in proptest::option::of(".{0,64}")) {
            let m = Hello { version, sct: sct.map(Secret::new), client_name: name };
            let bytes = encode_to_vec(&m, MAX_FRAME_LEN).unwrap();
            prop_assert_eq!(decode_exact::<Hello>(&bytes, MAX_FRAME_LEN).unwrap(), m);
        }

        #[test]
        fn services_round_trip(ids in proptest::collection::vec(("[a-z]{1,10}", "[a-z]{0,10}", proptest::collection::btree_map(".{0,8}", ".{0,8}", 0..3)), 0..8)) {
            let m = Response::Services(ids.into_iter().map(|(id, t, metadata)| ServiceInfo { id, service_type: t, metadata }).collect());
            let bytes = encode_to_vec(&m, MAX_FRAME_LEN).unwrap();
            prop_assert_eq!(decode_exact::<Response>(&bytes, MAX_FRAME_LEN).unwrap(), m);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_any(&bytes);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode::<Response>(&mut buf, MAX_FRAME_LEN);
        }
    }
}
