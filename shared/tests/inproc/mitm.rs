//! A man in the middle who terminates QUIC/TLS on both sides with its own keys and forwards every
//! pairing message faithfully cannot complete password pairing: the PAKE is bound to each side's
//! view of the channel (both fingerprints and a TLS exporter value).

use tunnel_shared::client::ConnectError;
use tunnel_shared::client::pair::prove_password;
use tunnel_shared::config::TransportSettings;
use tunnel_shared::framed;
use tunnel_shared::identity::SecretKey;
use tunnel_shared::pairing::PairingMode;
use tunnel_shared::proto::{self, ErrorCode, Hello, Request, Response};
use tunnel_shared::transport::{self, Identity};

use tunnel_testkit::inproc::{LOCAL, TestClient, TestDevice, echo_server};

/// Runs a relaying proxy on 127.0.0.1:0; returns its address and key fingerprint.
fn start_proxy(dev: &TestDevice) -> (std::net::SocketAddr, tunnel_shared::identity::Fingerprint) {
    let settings = TransportSettings::default();
    let key = SecretKey::generate();
    let id = Identity::new(key.clone()).unwrap();
    let fp = id.fingerprint();
    let server = transport::server_config(&id, proto::ALPN, &settings, 16, 16).unwrap();
    let ep = transport::server_endpoint("127.0.0.1:0".parse().unwrap(), &key, server, &settings)
        .unwrap();
    let addr = ep.local_addr().unwrap();
    // The proxy's own client key towards the real device.
    let upstream = TestClient::new(LOCAL);
    let dev_target = (dev.addr, dev.fingerprint);
    tokio::spawn(async move {
        let _ep = ep.clone();
        let conn = ep.accept().await.unwrap().await.unwrap();
        let (mut vsend, mut vrecv) = conn.accept_bi().await.unwrap();
        let hello: Hello = framed::read_frame(&mut vrecv, proto::MAX_FRAME_LEN)
            .await
            .unwrap()
            .unwrap();
        let addrs = [tunnel_shared::config::HostPort {
            host: tunnel_shared::config::Host::Ip(dev_target.0.ip()),
            port: dev_target.0.port(),
        }];
        let session = tunnel_shared::client::connect_to(
            &upstream.endpoint,
            &upstream.identity,
            &tunnel_shared::client::Target {
                name: "dev",
                addresses: &addrs,
                pin: Some(dev_target.1),
                sct: hello.sct.as_ref(),
                relays: &[],
                device_id: None,
            },
            &tunnel_shared::client::ConnectOptions::default(),
        )
        .await
        .unwrap();
        framed::write_frame(&mut vsend, &session.welcome, proto::MAX_FRAME_LEN)
            .await
            .unwrap();
        // Forward every request and response unchanged.
        while let Ok(Some(req)) =
            framed::read_frame::<Request>(&mut vrecv, proto::MAX_FRAME_LEN).await
        {
            let resp = session.request(&req).await.unwrap();
            if framed::write_frame(&mut vsend, &resp, proto::MAX_FRAME_LEN)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    (addr, fp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relaying_man_in_the_middle_cannot_complete_password_pairing() {
    let echo = echo_server().await;
    for mode in [PairingMode::PasswordInvite, PairingMode::PasswordOpen] {
        let dev = TestDevice::start(echo, |s| {
            s.pairing.set(PairingMode::PasswordInvite, true);
            s.pairing.set(PairingMode::PasswordOpen, true);
            s.invite_user("guest", "Guest").unwrap();
        })
        .await;
        let state = dev.state();
        let (user, pw) = match mode {
            PairingMode::PasswordInvite => (
                "guest",
                state.user("guest").unwrap().password.clone().unwrap(),
            ),
            _ => ("", state.pairing.open_password.clone()),
        };
        let before = dev.state_bytes();

        // The victim was tricked into pinning the proxy's key (a forged pairing string).
        let (proxy_addr, proxy_fp) = start_proxy(&dev);
        let victim = TestClient::new(LOCAL);
        let addrs = [tunnel_shared::config::HostPort {
            host: tunnel_shared::config::Host::Ip(proxy_addr.ip()),
            port: proxy_addr.port(),
        }];
        let session = tunnel_shared::client::connect_to(
            &victim.endpoint,
            &victim.identity,
            &tunnel_shared::client::Target {
                name: "dev",
                addresses: &addrs,
                pin: Some(proxy_fp),
                sct: None,
                relays: &[],
                device_id: None,
            },
            &tunnel_shared::client::ConnectOptions::default(),
        )
        .await
        .unwrap();
        // The relayed welcome looks genuine.
        assert_eq!(session.welcome.device_id, "dev");

        let err = prove_password(&session, &pw, user).await.unwrap_err();
        assert!(
            matches!(&err, ConnectError::Device { code, .. } if *code == ErrorCode::WRONG_PASSWORD),
            "{mode}: {err}"
        );
        // Nothing the MITM can send now pairs anything.
        for req in [
            Request::PairPasswordInvite { key_name: None },
            Request::PairPasswordOpen {
                username: "mallory".into(),
                key_name: None,
            },
        ] {
            let r = session.request(&req).await.unwrap();
            assert!(
                matches!(&r, Response::Error(e) if e.code == ErrorCode::NOT_AUTHENTICATED),
                "{r:?}"
            );
        }
        assert_eq!(
            dev.state_bytes(),
            before,
            "{mode}: the device changed its state"
        );
        let state = dev.state();
        assert!(state.users.iter().all(|u| u.fingerprints.is_empty()));
        dev.stop().await;
    }
}

/// Without a man in the middle, the same password pairs (the test above fails for the right
/// reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_password_pairs_directly() {
    let echo = echo_server().await;
    let (dev, pw) = TestDevice::with_guest_invite(echo).await;
    let c = TestClient::new(LOCAL);
    let s = c.connect(&dev, None).await.unwrap();
    prove_password(&s, &pw, "guest").await.unwrap();
    let r = s
        .request(&Request::PairPasswordInvite { key_name: None })
        .await
        .unwrap();
    assert!(matches!(r, Response::Paired(_)), "{r:?}");
    dev.stop().await;
}
