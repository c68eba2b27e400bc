//! Server-connect tokens: remote connections need a valid one (checked before any IAM work),
//! local ones need none; a valid token grants no role; removal and rotation apply at once.

use std::time::Duration;

use tunnel_shared::client::ConnectError;
use tunnel_shared::identity::SecretKey;
use tunnel_shared::pairing::PairingMode;
use tunnel_shared::proto::{CloseCode, ErrorCode, Request, Response};
use tunnel_shared::secret::Secret;

use tunnel_testkit::inproc::{
    LOCAL, REMOTE, TestClient, TestDevice, add_user, echo_server, tunnel,
};

fn refused(r: Result<tunnel_shared::client::Session, ConnectError>) -> CloseCode {
    match r {
        Err(ConnectError::Refused { code, .. }) => code,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(s) => panic!("expected a refusal, got a session as {:?}", s.welcome.user),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_connections_need_a_valid_token() {
    let echo = echo_server().await;
    let (alice, bob) = (SecretKey::generate(), SecretKey::generate());
    let (afp, bfp) = (alice.fingerprint(), bob.fingerprint());
    let dev = TestDevice::start(echo, move |s| {
        add_user(s, "alice", "Standard", afp);
        add_user(s, "bob", "Standard", bfp);
    })
    .await;
    let state = dev.state();
    let a_sct = state.user("alice").unwrap().sct.clone();
    let b_sct = state.user("bob").unwrap().sct.clone();
    let a = TestClient::with_key(REMOTE, alice.clone());

    // None, wrong, empty, long.
    assert_eq!(
        refused(a.connect(&dev, None).await),
        CloseCode::SCT_REJECTED
    );
    assert_eq!(
        refused(a.connect(&dev, Some(&Secret::new("wrong-token-xx"))).await),
        CloseCode::SCT_REJECTED
    );
    assert_eq!(
        refused(a.connect(&dev, Some(&Secret::new(""))).await),
        CloseCode::SCT_REJECTED
    );
    let long = Secret::new("x".repeat(60 * 1024));
    assert_eq!(
        refused(a.connect(&dev, Some(&long)).await),
        CloseCode::SCT_REJECTED
    );
    // 64 KiB does not fit a hello: the client refuses to send it (the device would close the
    // connection as a protocol error, see the e2e raw tests).
    let huge = Secret::new("x".repeat(64 * 1024));
    assert!(matches!(
        a.connect(&dev, Some(&huge)).await,
        Err(ConnectError::Protocol { .. })
    ));

    // Valid: works. Local: needs none.
    let s = a.connect(&dev, Some(&a_sct)).await.unwrap();
    assert!(!s.welcome.local);
    assert_eq!(tunnel(&s, "ssh").await, Ok(()));
    let l = TestClient::with_key(LOCAL, alice)
        .connect(&dev, None)
        .await
        .unwrap();
    assert!(l.welcome.local);

    // Another user's token lets alice in, as alice: the token filters, the key decides.
    let s2 = a.connect(&dev, Some(&b_sct)).await.unwrap();
    assert_eq!(s2.welcome.user.as_deref(), Some("alice"));

    // Rotating alice's token cuts her remote connection that used it, at once.
    dev.home
        .state_store()
        .update(|st| st.rotate_sct("alice").map(|_| ()))
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(30), s.conn.closed())
        .await
        .unwrap();
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == CloseCode::SCT_REJECTED.to_varint()),
        "{reason:?}"
    );
    assert_eq!(
        refused(a.connect(&dev, Some(&a_sct)).await),
        CloseCode::SCT_REJECTED
    );
    // The local connection is unaffected.
    assert_eq!(tunnel(&l, "ssh").await, Ok(()));

    // Removing bob invalidates his token at once (the connection using it is closed too).
    dev.home
        .state_store()
        .update(|st| st.remove_user("bob").map(|_| ()))
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(30), s2.conn.closed())
        .await
        .unwrap();
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(_)),
        "{reason:?}"
    );
    // The close proves the device reloaded: the token is invalid from now on.
    assert_eq!(
        refused(a.connect(&dev, Some(&b_sct)).await),
        CloseCode::SCT_REJECTED
    );
    dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_grants_no_role() {
    let echo = echo_server().await;
    let alice = SecretKey::generate();
    let afp = alice.fingerprint();
    let dev = TestDevice::start(echo, move |s| {
        add_user(s, "alice", "Owner", afp);
    })
    .await;
    let a_sct = dev.state().user("alice").unwrap().sct.clone();
    let stranger = TestClient::new(REMOTE);
    // No pairing mode: an unknown key is closed even with a valid token.
    assert_eq!(
        refused(stranger.connect(&dev, Some(&a_sct)).await),
        CloseCode::UNKNOWN_KEY
    );
    // With a pairing mode it gets in, as unpaired, and can do nothing else.
    dev.home
        .state_store()
        .update(|s| {
            s.pairing.set(PairingMode::PasswordInvite, true);
            Ok(())
        })
        .unwrap();
    let mut session = None;
    for _ in 0..50 {
        if let Ok(s) = stranger.connect(&dev, Some(&a_sct)).await {
            session = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = session.expect("the device did not apply the pairing switch");
    assert_eq!(s.welcome.user, None);
    assert_eq!(s.welcome.role, "Unpaired");
    let r = s.request(&Request::ListServices).await.unwrap();
    assert!(
        matches!(&r, Response::Error(e) if e.code == ErrorCode::FORBIDDEN),
        "{r:?}"
    );
    assert!(matches!(
        s.services().await,
        Err(ConnectError::NotPaired { .. })
    ));
    assert!(tunnel(&s, "ssh").await.is_err());
    dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_access_off_refuses_every_remote_connection() {
    let echo = echo_server().await;
    let alice = SecretKey::generate();
    let afp = alice.fingerprint();
    let dev = TestDevice::start_with(
        echo,
        move |s| {
            add_user(s, "alice", "Owner", afp);
        },
        "",
        None,
    )
    .await;
    let a_sct = dev.state().user("alice").unwrap().sct.clone();
    let text = std::fs::read_to_string(dev.home.config_path())
        .unwrap()
        .replace("[network]\n", "[network]\nremote_access = false\n");
    std::fs::write(dev.home.config_path(), text).unwrap();
    let remote = TestClient::with_key(REMOTE, alice.clone());
    let mut code = None;
    for _ in 0..50 {
        match remote.connect(&dev, Some(&a_sct)).await {
            Err(ConnectError::Refused { code: c, .. }) if c == CloseCode::REMOTE_DISABLED => {
                code = Some(c);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(code, Some(CloseCode::REMOTE_DISABLED));
    assert!(
        TestClient::with_key(LOCAL, alice)
            .connect(&dev, None)
            .await
            .is_ok()
    );
    dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaired_connections_are_capped() {
    let echo = echo_server().await;
    let dev = TestDevice::start_with(
        echo,
        |s| s.pairing.set(PairingMode::LocalOpen, true),
        "[limits]\nmax_unpaired_connections = 2\n",
        None,
    )
    .await;
    let (a, b, c) = (
        TestClient::new(LOCAL),
        TestClient::new(LOCAL),
        TestClient::new(LOCAL),
    );
    let _sa = a.connect(&dev, None).await.unwrap();
    let _sb = b.connect(&dev, None).await.unwrap();
    let third = c.connect(&dev, None).await;
    let code = match third {
        Ok(s) => match tokio::time::timeout(Duration::from_secs(30), s.conn.closed())
            .await
            .unwrap()
        {
            quinn::ConnectionError::ApplicationClosed(c) => CloseCode::from_varint(c.error_code),
            other => panic!("{other:?}"),
        },
        Err(ConnectError::Refused { code, .. }) => code,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(code, CloseCode::BUSY);
    // A paired key is not affected by the cap.
    let d = TestClient::new(LOCAL);
    let fp = d.fingerprint();
    dev.home
        .state_store()
        .update(|s| s.add_user("dee", "Guest", fp, None).map(|_| ()))
        .unwrap();
    // Once the device has reloaded its state, the key connects as its user despite the cap.
    let mut user = None;
    for _ in 0..200 {
        if let Ok(s) = d.connect(&dev, None).await {
            user = s.welcome.user;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(user.as_deref(), Some("dee"));
    dev.stop().await;
}
