//! Regression tests of issue 9 (hostile peers): each reproduces a defect found against the
//! release binaries and fails without its fix.

use std::time::Duration;

use tunnel_shared::client::ConnectError;
use tunnel_shared::identity::SecretKey;
use tunnel_shared::pairing::PairingMode;
use tunnel_shared::proto::{CloseCode, ErrorCode, Request, Response, StreamCode};
use tunnel_testkit::hostile;
use tunnel_testkit::inproc::{
    LOCAL, REMOTE, TestClient, TestDevice, add_user, echo_server, tunnel,
};

fn code(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Error(e) => Some(e.code),
        _ => None,
    }
}

async fn closed_with(conn: &quinn::Connection) -> CloseCode {
    match tokio::time::timeout(Duration::from_secs(20), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => CloseCode::from_varint(c.error_code),
        other => panic!("expected an application close, got {other:?}"),
    }
}

/// Defect 1: a burst of ClientHello-only Initials from one (spoofable) remote address used to fill
/// the single connection count for the handshake timeout, so the owner was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_does_not_lock_the_owner_out() {
    let echo = echo_server().await;
    let owner = SecretKey::generate();
    let fp = owner.fingerprint();
    let dev = TestDevice::start(echo, move |s| {
        add_user(s, "owner", "Owner", fp);
    })
    .await;
    let flood = hostile::initial_packets(dev.addr, 400);
    hostile::send_all(&format!("{REMOTE}:0"), dev.addr, &flood);
    let client = TestClient::with_key(LOCAL, owner);
    let session = client
        .connect(&dev, None)
        .await
        .unwrap_or_else(|e| panic!("the owner was locked out by the flood: {e}"));
    assert_eq!(session.services().await.unwrap().len(), 2);
    assert_eq!(tunnel(&session, "ssh").await, Ok(()));
    // A second burst while the owner's connection is up does not disturb it either.
    hostile::send_all(&format!("{REMOTE}:0"), dev.addr, &flood);
    assert_eq!(tunnel(&session, "ssh").await, Ok(()));
    dev.stop().await;
}

/// Opens a stream and sends half a header, so the device waits for the rest.
async fn silent_stream(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0]).await.unwrap();
    (send, recv)
}

/// Defect 2: streams that never sent a header took device-wide permits, so one Guest key got the
/// owner's tunnels refused; and keys on no user could open tunnel streams at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_streams_cannot_starve_other_users() {
    let echo = echo_server().await;
    let (owner, guest, stranger) = (
        SecretKey::generate(),
        SecretKey::generate(),
        SecretKey::generate(),
    );
    let (ofp, gfp) = (owner.fingerprint(), guest.fingerprint());
    let dev = TestDevice::start_with(
        echo,
        move |s| {
            add_user(s, "owner", "Owner", ofp);
            add_user(s, "guest", "Guest", gfp);
            s.pairing.set(PairingMode::LocalOpen, true);
        },
        "[limits]\nmax_streams_total = 40\nmax_streams_per_user = 30\nheader_timeout_secs = 30\n",
        None,
    )
    .await;
    // 36 silent streams of one guest over three connections: 30 fit its cap, 6 are reset.
    let mut sends = Vec::new();
    let mut pending = tokio::task::JoinSet::new();
    let mut guests = Vec::new();
    for _ in 0..3 {
        let s = TestClient::with_key(LOCAL, guest.clone())
            .connect(&dev, None)
            .await
            .unwrap();
        for _ in 0..12 {
            let (send, mut recv) = silent_stream(&s.conn).await;
            sends.push(send);
            pending.spawn(async move {
                let mut b = [0u8; 1];
                match tokio::time::timeout(Duration::from_secs(5), recv.read(&mut b)).await {
                    Ok(Err(quinn::ReadError::Reset(c))) => Some(StreamCode::from_varint(c)),
                    _ => None,
                }
            });
        }
        guests.push(s);
    }
    let mut reset = Vec::new();
    while let Some(r) = pending.join_next().await {
        reset.extend(r.unwrap());
    }
    assert_eq!(reset, vec![StreamCode::LIMIT_REACHED; 6]);
    // The owner, whose tunnels take permits only once authorized, is unaffected.
    let o = TestClient::with_key(LOCAL, owner)
        .connect(&dev, None)
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(tunnel(&o, "ssh").await, Ok(()));
    }
    // A key on no user may pair, but has no stream credit for tunnels.
    let u = TestClient::with_key(LOCAL, stranger)
        .connect(&dev, None)
        .await
        .unwrap();
    assert!(u.welcome.user.is_none());
    assert_eq!(tunnel(&u, "ssh").await, Err(StreamCode::LIMIT_REACHED));
    drop(sends);
    dev.stop().await;
}

/// Defect 3: locality was decided once per connection, so a Guest that moved its live connection
/// from a local to a remote address kept tunnelling without a token, and a reload of
/// `local_networks` re-checked nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_follows_the_connection() {
    let echo = echo_server().await;
    let guest = SecretKey::generate();
    let gfp = guest.fingerprint();
    let dev = TestDevice::start(echo, move |s| {
        add_user(s, "guest", "Guest", gfp);
    })
    .await;
    let client = TestClient::with_key(LOCAL, guest.clone());
    let s = client.connect(&dev, None).await.unwrap();
    assert!(s.welcome.local);
    assert_eq!(tunnel(&s, "ssh").await, Ok(()));
    // Migrate the live connection to 127.0.0.2, which this device counts as remote.
    let moved = std::net::UdpSocket::bind(format!("{REMOTE}:0")).unwrap();
    client.endpoint.rebind(moved).unwrap();
    let _ = tunnel(&s, "ssh").await;
    assert_eq!(closed_with(&s.conn).await, CloseCode::SCT_REJECTED);

    // A reload that makes 127.0.0.1 remote closes a local connection without a token.
    let s = TestClient::with_key(LOCAL, guest)
        .connect(&dev, None)
        .await
        .unwrap();
    let cfg = std::fs::read_to_string(dev.home.config_path()).unwrap();
    let cfg = cfg.replace("127.0.0.1/32", "10.99.0.0/16");
    tunnel_shared::fsutil::write_atomic(&dev.home.config_path(), cfg.as_bytes(), 0o600).unwrap();
    assert_eq!(closed_with(&s.conn).await, CloseCode::SCT_REJECTED);
    dev.stop().await;
}

/// Defect 4: PAKE attempts were counted at confirm, so key exchanges started on many connections
/// from one address and confirmed later all got a guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pake_attempts_are_counted_when_they_start() {
    let echo = echo_server().await;
    let dev = TestDevice::start(echo, |s| {
        s.pairing.set(PairingMode::PasswordInvite, true);
        s.invite_user("guest", "Guest").unwrap();
    })
    .await;
    // A well-formed first message (any password, any channel view): the device must answer it.
    let (fp, ex) = (SecretKey::generate().fingerprint(), [7u8; 32]);
    let ch = tunnel_shared::pairing::Channel {
        client: &fp,
        device: &fp,
        exporter: &ex,
    };
    let (_, msg) = tunnel_shared::pairing::ClientPake::start(
        &tunnel_shared::secret::Secret::new("guess"),
        "guest",
        ch,
    );
    let mut replies = 0;
    let mut refused = 0;
    let mut sessions = Vec::new();
    for _ in 0..16 {
        let s = TestClient::new(LOCAL).connect(&dev, None).await.unwrap();
        let r = s
            .request(&Request::PakeStart {
                username: "guest".into(),
                msg: msg.clone(),
            })
            .await
            .unwrap();
        match r {
            Response::PakeReply { .. } => replies += 1,
            Response::Error(e) if e.code == ErrorCode::TOO_MANY_ATTEMPTS => refused += 1,
            other => panic!("{other:?}"),
        }
        sessions.push(s);
    }
    assert!(
        replies <= 2,
        "{replies} exchanges in flight from one address"
    );
    assert!(refused >= 11, "{refused} refused of 16");
    dev.stop().await;
}

/// Defect 5: the shared open-pairing token let any paired key in remotely; tokens could not be
/// rotated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_pairing_token_is_for_pairing_only_and_tokens_rotate() {
    let echo = echo_server().await;
    let std_key = SecretKey::generate();
    let sfp = std_key.fingerprint();
    let dev = TestDevice::start(echo, move |s| {
        add_user(s, "std", "Standard", sfp);
        s.pairing.set(PairingMode::PasswordOpen, true);
    })
    .await;
    let state = dev.state();
    let open = state.pairing.open_sct.clone();
    let mine = state.user("std").unwrap().sct.clone();
    let client = TestClient::with_key(REMOTE, std_key);
    match client.connect(&dev, Some(&open)).await {
        Err(ConnectError::Refused { code, .. }) => assert_eq!(code, CloseCode::SCT_REJECTED),
        other => panic!(
            "a paired key got in with the open token: {:?}",
            other.map(|_| ())
        ),
    }
    // Its own token works; rotating it keeps this connection and retires the old token.
    let s = client.connect(&dev, Some(&mine)).await.unwrap();
    let new = match s
        .request(&Request::RotateToken {
            username: "std".into(),
        })
        .await
        .unwrap()
    {
        Response::Token(t) => t,
        other => panic!("{other:?}"),
    };
    assert_ne!(new, mine);
    assert_eq!(
        tunnel(&s, "ssh").await,
        Ok(()),
        "the rotating connection goes on"
    );
    assert!(client.connect(&dev, Some(&mine)).await.is_err());
    assert!(client.connect(&dev, Some(&new)).await.is_ok());
    dev.stop().await;
}

/// Defect 6: two owners demoting each other at once both succeeded, and a sole owner could remove
/// its own last key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_owner_check_holds_under_races() {
    let echo = echo_server().await;
    let (a, b) = (SecretKey::generate(), SecretKey::generate());
    let (afp, bfp) = (a.fingerprint(), b.fingerprint());
    let dev = TestDevice::start(echo, move |s| {
        add_user(s, "a", "Owner", afp);
        add_user(s, "b", "Owner", bfp);
    })
    .await;
    for _ in 0..5 {
        let sa = TestClient::with_key(LOCAL, a.clone())
            .connect(&dev, None)
            .await
            .unwrap();
        let sb = TestClient::with_key(LOCAL, b.clone())
            .connect(&dev, None)
            .await
            .unwrap();
        let demote = |who: &str| Request::SetUserRole {
            username: who.into(),
            role: "Guest".into(),
        };
        let (db, da) = (demote("b"), demote("a"));
        let (ra, rb) = tokio::join!(sa.request(&db), sb.request(&da));
        let oks = [ra.unwrap(), rb.unwrap()]
            .iter()
            .filter(|r| matches!(r, Response::Ok))
            .count();
        assert_eq!(oks, 1, "exactly one demotion may win");
        assert_eq!(dev.state().users_with_keys("Owner"), 1);
        // The one still an owner makes the other an owner again, for the next round.
        let (winner, loser) = if matches!(ra_kind(&dev), "a") {
            (&sa, "b")
        } else {
            (&sb, "a")
        };
        let r = winner
            .request(&Request::SetUserRole {
                username: loser.into(),
                role: "Owner".into(),
            })
            .await
            .unwrap();
        assert!(matches!(r, Response::Ok), "{r:?}");
    }
    // The sole owner cannot remove its own last key.
    let sa = TestClient::with_key(LOCAL, a.clone())
        .connect(&dev, None)
        .await
        .unwrap();
    let r = sa
        .request(&Request::DeleteUser {
            username: "b".into(),
        })
        .await
        .unwrap();
    assert!(matches!(r, Response::Ok), "{r:?}");
    let r = sa
        .request(&Request::RemoveFingerprint {
            username: "a".into(),
            fingerprint: afp,
        })
        .await
        .unwrap();
    assert_eq!(code(&r), Some(ErrorCode::CONFLICT), "{r:?}");
    assert_eq!(dev.state().users_with_keys("Owner"), 1);
    dev.stop().await;
}

/// Which of `a` and `b` is the owner now.
fn ra_kind(dev: &TestDevice) -> &'static str {
    if dev.state().user("a").is_some_and(|u| u.role == "Owner") {
        "a"
    } else {
        "b"
    }
}

/// Defect 10: every state-changing request did a locked read-modify-write with two fsyncs, with
/// no limit; requests that changed nothing wrote anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_writes_are_limited_and_no_ops_write_nothing() {
    let echo = echo_server().await;
    let guest = SecretKey::generate();
    let gfp = guest.fingerprint();
    let dev = TestDevice::start(echo, move |s| {
        add_user(s, "guest", "Guest", gfp);
    })
    .await;
    let s = TestClient::with_key(LOCAL, guest.clone())
        .connect(&dev, None)
        .await
        .unwrap();
    let set = |n: u32| Request::SetUserDisplayName {
        username: "guest".into(),
        display_name: Some(format!("name {n}")),
    };
    let mut ok = 0;
    let mut limited = 0;
    for n in 0..100 {
        match s.request(&set(n)).await.unwrap() {
            Response::Ok => ok += 1,
            r if code(&r) == Some(ErrorCode::RATE_LIMITED) => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(ok <= 15, "{ok} writes accepted in a burst");
    assert_eq!(ok + limited, 100);
    // A change to the value it already has writes nothing (a fresh connection has a full budget).
    let s = TestClient::with_key(LOCAL, guest)
        .connect(&dev, None)
        .await
        .unwrap();
    let name = dev.state().user("guest").unwrap().display_name.clone();
    let before = tunnel_shared::fsutil::FileStamp::of(&dev.state_path());
    let r = s
        .request(&Request::SetUserDisplayName {
            username: "guest".into(),
            display_name: name,
        })
        .await
        .unwrap();
    assert!(matches!(r, Response::Ok), "{r:?}");
    assert_eq!(
        tunnel_shared::fsutil::FileStamp::of(&dev.state_path()),
        before
    );
    dev.stop().await;
}

/// A tunnel whose header is only half sent is reset once the header timeout passes, and does not
/// stop the connection's other tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_that_never_completes_is_reset() {
    let echo = echo_server().await;
    let key = SecretKey::generate();
    let fp = key.fingerprint();
    let dev = TestDevice::start_with(
        echo,
        move |s| {
            add_user(s, "u", "Standard", fp);
        },
        "[limits]\nheader_timeout_secs = 1\n",
        None,
    )
    .await;
    let s = TestClient::with_key(LOCAL, key)
        .connect(&dev, None)
        .await
        .unwrap();
    let (_send, mut recv) = silent_stream(&s.conn).await;
    assert_eq!(tunnel(&s, "ssh").await, Ok(()));
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(10), recv.read(&mut b)).await {
        Ok(Err(quinn::ReadError::Reset(c))) => {
            assert_eq!(StreamCode::from_varint(c), StreamCode::BAD_HEADER);
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    dev.stop().await;
}
