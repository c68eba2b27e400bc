//! Replays every input the fuzzers kept (`fuzz/corpus/<target>/`, crash and regression inputs in
//! `fuzz/regressions/<target>/`) through the same entry points, on stable: a crash found once stays
//! fixed.

use std::path::Path;

use tunnel_shared::fuzzing;

#[test]
fn every_kept_input_passes_every_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut inputs = 0;
    for target in fuzzing::TARGETS {
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).unwrap();
                fuzzing::run(target, &data);
                inputs += 1;
            }
        }
    }
    assert!(inputs > 0, "no fuzz inputs found under {}", root.display());
}

#[test]
fn targets_survive_edge_inputs() {
    for target in fuzzing::TARGETS {
        for data in [
            &b""[..],
            b"\x00",
            &[0xff; 64],
            b"\x00\x00\x00\x05hello\x00\x00\x00\x00",
            b"tp1,d=x,f=y,a=z,p=w",
            b"{\"version\":1}",
        ] {
            fuzzing::run(target, data);
        }
    }
}

/// With `TUNNEL_WRITE_FUZZ_SEEDS=1`, writes the seed inputs (`fuzz/corpus/<target>/seed-*`): real
/// encodings of every message kind and real files, for the fuzzers to mutate.
#[test]
fn write_seeds_when_asked() {
    if std::env::var_os("TUNNEL_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    use tunnel_shared::identity::SecretKey;
    use tunnel_shared::proto::{
        self, ErrorCode, ErrorReply, Hello, MAX_FRAME_LEN, Request, Response, ServiceInfo,
        StreamOpen, Welcome,
    };
    use tunnel_shared::secret::Secret;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };
    let fp = SecretKey::generate().fingerprint();
    let requests = [
        Request::ListServices,
        Request::GetService { id: "ssh".into() },
        Request::PakeStart {
            username: "guest".into(),
            msg: vec![1; 33],
        },
        Request::AddFingerprint {
            username: "a".into(),
            fingerprint: fp,
            key_name: Some("laptop".into()),
        },
        Request::RotateToken {
            username: "a".into(),
        },
    ];
    let responses = [
        Response::Services(vec![ServiceInfo {
            id: "cam".into(),
            service_type: "rtsp".into(),
            metadata: [("path".to_string(), "/video".to_string())].into(),
        }]),
        Response::Error(ErrorReply {
            code: ErrorCode::FORBIDDEN,
            message: "no".into(),
        }),
        Response::Token(Secret::new("abcdefghijkmnp")),
    ];
    for (i, r) in requests.iter().enumerate() {
        write(
            "control",
            &format!("req{i}"),
            &postcard::to_stdvec(r).unwrap(),
        );
        write(
            "frame",
            &format!("req{i}"),
            &proto::encode_to_vec(r, MAX_FRAME_LEN).unwrap(),
        );
    }
    for (i, r) in responses.iter().enumerate() {
        write(
            "control",
            &format!("resp{i}"),
            &postcard::to_stdvec(r).unwrap(),
        );
        write(
            "frame",
            &format!("resp{i}"),
            &proto::encode_to_vec(r, MAX_FRAME_LEN).unwrap(),
        );
    }
    let hello = Hello {
        version: 1,
        sct: Some(Secret::new("abcdefghijkmnp")),
        client_name: Some("laptop".into()),
    };
    write(
        "frame",
        "hello",
        &proto::encode_to_vec(&hello, MAX_FRAME_LEN).unwrap(),
    );
    let welcome = Welcome {
        version: 1,
        device_id: "cam-1".into(),
        device_name: "Front door".into(),
        user: Some("owner".into()),
        role: "Owner".into(),
        local: true,
    };
    write(
        "frame",
        "welcome",
        &proto::encode_to_vec(&welcome, MAX_FRAME_LEN).unwrap(),
    );
    let open = StreamOpen::Tunnel {
        service: "ssh".into(),
    };
    write(
        "frame",
        "open",
        &proto::encode_to_vec(&open, proto::MAX_STREAM_OPEN_LEN).unwrap(),
    );
    let mut state = tunnel_shared::state::DeviceState::new_device();
    state
        .add_user("alice", "Owner", fp, Some("laptop".into()))
        .unwrap();
    state.invite_user("bob", "Guest").unwrap();
    write("state_json", "state", &state.to_json());
    write(
        "device_toml",
        "sample",
        include_bytes!("../../examples/config/device.toml"),
    );
    write(
        "known_devices",
        "sample",
        include_bytes!("../../examples/config/known_devices.toml"),
    );
    write(
        "iam_toml",
        "default",
        tunnel_shared::iam::DEFAULT_IAM_TOML.as_bytes(),
    );
    write(
        "pairing_string",
        "invite",
        format!("tp1,d=cam-1,f={fp},a=192.168.1.2:5592+[fd00::1]:5592,u=owner,p=abcdefghijkmnp,s=qrstuvwxyzABCD").as_bytes(),
    );
    let ch = tunnel_shared::pairing::Channel {
        client: &fp,
        device: &fp,
        exporter: &[5; 32],
    };
    let (_, msg) = tunnel_shared::pairing::ClientPake::start(&Secret::new("pw"), "u", ch);
    let mut pake = msg.clone();
    pake.extend_from_slice(&msg);
    write("pake", "msgs", &pake);
}
