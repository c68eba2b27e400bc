//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz on nightly) and of their corpus replay
//! (`shared/tests/fuzz_corpus.rs`, on stable): every parser that reads peer or file input, fed
//! arbitrary bytes. Each must return without panicking, whatever the input; where a value
//! parses, encoding it again must give a value that parses to the same thing.
//!
//! Kind: pure.

use crate::client::KnownDevices;
use crate::config::DeviceConfig;
use crate::iam::IamConfig;
use crate::identity::Fingerprint;
use crate::pairing::{Channel, ClientPake, DevicePake, PairingString};
use crate::proto::{self, Hello, MAX_FRAME_LEN, Request, Response, StreamOpen, Welcome};
use crate::secret::Secret;
use crate::state::DeviceState;

/// The fuzz targets, by name (`cargo fuzz run NAME`).
pub const TARGETS: [&str; 8] = [
    "frame",
    "control",
    "state_json",
    "device_toml",
    "iam_toml",
    "known_devices",
    "pairing_string",
    "pake",
];

/// Runs target `name` on `data`.
///
/// # Panics
/// When `name` is not one of [`TARGETS`] (a test mistake), or when the input finds a bug.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "frame" => frame(data),
        "control" => control(data),
        "state_json" => state_json(data),
        "device_toml" => text(data, |t| drop(DeviceConfig::from_toml(t))),
        "iam_toml" => text(data, |t| drop(IamConfig::from_toml(t, None))),
        "known_devices" => text(data, |t| drop(KnownDevices::from_toml(t))),
        "pairing_string" => pairing_string(data),
        "pake" => pake(data),
        other => panic!("no fuzz target '{other}'"),
    }
}

fn text(data: &[u8], f: impl FnOnce(&str)) {
    if let Ok(t) = std::str::from_utf8(data) {
        f(t);
    }
}

/// Whole frames of every message kind, streamed and exact.
fn frame(data: &[u8]) {
    let _ = proto::decode_exact::<Hello>(data, MAX_FRAME_LEN);
    let _ = proto::decode_exact::<Welcome>(data, MAX_FRAME_LEN);
    let _ = proto::decode_exact::<StreamOpen>(data, proto::MAX_STREAM_OPEN_LEN);
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(_)) = proto::decode::<Response>(&mut buf, MAX_FRAME_LEN) {}
}

/// Every request and response body (postcard, no frame): what parses re-encodes to itself.
fn control(data: &[u8]) {
    if let Ok((req, _)) = postcard::take_from_bytes::<Request>(data) {
        let frame = proto::encode_to_vec(&req, MAX_FRAME_LEN);
        if let Ok(frame) = frame {
            assert_eq!(
                proto::decode_exact::<Request>(&frame, MAX_FRAME_LEN).ok(),
                Some(req)
            );
        }
    }
    if let Ok((resp, _)) = postcard::take_from_bytes::<Response>(data)
        && let Ok(frame) = proto::encode_to_vec(&resp, MAX_FRAME_LEN)
    {
        assert_eq!(
            proto::decode_exact::<Response>(&frame, MAX_FRAME_LEN).ok(),
            Some(resp)
        );
    }
}

/// `state.json`: what parses is valid and survives a round trip.
fn state_json(data: &[u8]) {
    if let Ok(state) = DeviceState::from_json(data) {
        assert_eq!(state.validate(), Ok(()));
        assert_eq!(DeviceState::from_json(&state.to_json()).ok(), Some(state));
    }
}

/// Pairing strings: what parses prints to a string that parses to the same thing.
fn pairing_string(data: &[u8]) {
    text(data, |t| {
        if let Ok(ps) = t.parse::<PairingString>() {
            assert_eq!(ps.to_string().parse::<PairingString>().ok(), Some(ps));
        }
    });
}

/// PAKE messages from a hostile peer, on both sides: the first half of `data` is the client's
/// first message, the rest the device's reply and confirmation.
fn pake(data: &[u8]) {
    let fp = Fingerprint::from_bytes([3; 32]);
    let exporter = [5u8; 32];
    let ch = Channel {
        client: &fp,
        device: &fp,
        exporter: &exporter,
    };
    let (first, rest) = data.split_at(data.len() / 2);
    let password = Secret::new("password-fuzz");
    if let Ok((device, _)) = DevicePake::respond(Some(&password), "u", ch, first) {
        let _ = device.confirm(rest);
    }
    let (client, _) = ClientPake::start(&password, "u", ch);
    if let Ok((confirm, _)) = client.finish(first) {
        let _ = confirm.verify(rest);
    }
}
