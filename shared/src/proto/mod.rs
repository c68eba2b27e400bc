//! Wire protocol: ALPN, control messages, the data-stream header, the frame codec, and the stable
//! close and reject codes.
//!
//! Kind: pure. No IO, no clock. Opening and accepting streams, and exchanging these messages on
//! them, lives in [`crate::wire`]; the frame codec is `tunnel_core::codec`.
//!
//! # Frames
//! Every message is one frame: `len: u32 BE | body: postcard | crc32(body): u32 BE` (see
//! `tunnel_core::codec`). `len` is checked against the caller's maximum before anything is
//! buffered, and every truncation and every byte flip of a frame is rejected.
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

pub mod codes;

use std::collections::BTreeMap;

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

pub use codes::{CloseCode, ErrorCode, StreamCode};
pub use tunnel_core::codec::{
    DecodeError, EncodeError, FRAME_OVERHEAD, crc32, decode, decode_exact, encode, encode_to_vec,
    frame_len,
};

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
    /// Replace a user's server-connect token (`IAM:RotateToken`); the old one stops working.
    RotateToken {
        /// User name.
        username: String,
    },
    /// The relays the device is attached to, so a paired client can reach it from anywhere (any
    /// user; no action needed, like [`Request::GetMe`]).
    GetRelays,
    /// On a relayed connection: try for a direct path (hole punching). `candidates` are where
    /// the device may reach the client (at most [`MAX_CANDIDATES`]); the answer is where the
    /// client may reach the device. Allowed to a user who may `Tunnel:Connect` to some service
    /// on this connection, so the device's addresses go only to those who could use them.
    Punch {
        /// The client's candidate addresses.
        candidates: Vec<std::net::SocketAddr>,
    },
}

/// Candidate addresses one end of a relayed connection tells the other at most.
pub const MAX_CANDIDATES: usize = 8;

impl Request {
    /// Whether the request may change `state.json` (such requests are rate-limited per
    /// connection).
    pub fn changes_state(&self) -> bool {
        !matches!(
            self,
            Self::ListServices
                | Self::GetService { .. }
                | Self::GetMe
                | Self::GetRelays
                | Self::Punch { .. }
                | Self::PairingGet
                | Self::PakeStart { .. }
                | Self::PakeConfirm { .. }
                | Self::ListUsers
                | Self::GetUser { .. }
                | Self::ListRoles
                | Self::GetSettings
        )
    }
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
    /// A user's new server-connect token.
    Token(Secret),
    /// The device's relays (`[[relay]]` in its `device.toml`).
    Relays(Vec<crate::config::RelayRef>),
    /// The device's candidate addresses for hole punching (an answer to [`Request::Punch`]);
    /// it starts probing the client's at once.
    Punch {
        /// Where the client may reach the device directly.
        candidates: Vec<std::net::SocketAddr>,
    },
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};
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
