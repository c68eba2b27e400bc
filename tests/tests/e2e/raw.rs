//! Hostile or broken clients built from the library: they hold an authorized key but skip the
//! real client's checks. The device must answer with the documented codes, never panic, and keep
//! serving everyone else.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use tunnel_shared::config::TransportSettings;
use tunnel_shared::identity;
use tunnel_shared::proto::{
    self, CloseCode, ErrorCode, Hello, Request, Response, StreamCode, Welcome, crc32,
};
use tunnel_shared::transport::{self, Identity};
use tunnel_shared::wire;
use tunnel_testkit::servers::TestServer;

use crate::{Setup, setup};

struct Raw {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

fn identity_of(s: &Setup) -> Identity {
    let key = identity::load_key(&s.client.home.join("client.key")).unwrap();
    Identity::new(key).unwrap()
}

async fn raw_connect(s: &Setup) -> Raw {
    let settings = TransportSettings::default();
    let endpoint = transport::client_endpoint(&settings).unwrap();
    let (cfg, _) = transport::client_config(
        &identity_of(s),
        proto::ALPN,
        Some(s.device.fingerprint.parse().unwrap()),
        &settings,
    )
    .unwrap();
    let conn = endpoint
        .connect_with(cfg, s.device.addr, transport::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    Raw {
        _endpoint: endpoint,
        conn,
    }
}

async fn raw_hello(raw: &Raw) -> (quinn::SendStream, quinn::RecvStream, Welcome) {
    let (mut send, mut recv) = raw.conn.open_bi().await.unwrap();
    let hello = Hello {
        version: proto::PROTOCOL_VERSION,
        sct: None,
        client_name: Some("raw".into()),
    };
    wire::write_frame(&mut send, &hello, proto::MAX_FRAME_LEN)
        .await
        .unwrap();
    let welcome = wire::read_frame::<Welcome>(&mut recv, proto::MAX_FRAME_LEN)
        .await
        .unwrap()
        .unwrap();
    (send, recv, welcome)
}

async fn close_code(conn: &quinn::Connection) -> CloseCode {
    match tokio::time::timeout(Duration::from_secs(20), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => CloseCode::from_varint(c.error_code),
        other => panic!("expected an application close, got {other:?}"),
    }
}

fn device_still_serves(s: &Setup) {
    assert!(s.client.ok(&["services", "cam"]).contains("echo"));
    assert!(!s.device.proc.log().contains("panicked"));
}

#[tokio::test]
async fn garbage_on_the_control_stream_closes_only_that_connection() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let raw = raw_connect(&s).await;
    let (mut send, _recv) = raw.conn.open_bi().await.unwrap();
    send.write_all(b"\x00\x00\x00\x05hello\xde\xad\xbe\xef")
        .await
        .unwrap();
    assert_eq!(close_code(&raw.conn).await, CloseCode::PROTOCOL);
    device_still_serves(&s);
}

#[tokio::test]
async fn an_oversized_frame_is_refused_before_it_is_read() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let raw = raw_connect(&s).await;
    let (mut send, _recv) = raw.conn.open_bi().await.unwrap();
    send.write_all(&[0x7f, 0xff, 0xff, 0xff]).await.unwrap();
    assert_eq!(close_code(&raw.conn).await, CloseCode::PROTOCOL);

    // A 64 KiB token makes the hello too large: same answer.
    let raw = raw_connect(&s).await;
    let (mut send, _recv) = raw.conn.open_bi().await.unwrap();
    let body = vec![b'a'; 64 * 1024 + 16];
    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let _ = send.write_all(&frame).await;
    assert_eq!(close_code(&raw.conn).await, CloseCode::PROTOCOL);
    device_still_serves(&s);
}

#[tokio::test]
async fn a_data_stream_cannot_skip_the_hello() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let raw = raw_connect(&s).await;
    let (mut send, _recv) = raw.conn.open_bi().await.unwrap();
    let header = wire::tunnel_header("echo").unwrap();
    send.write_all(&header).await.unwrap();
    send.write_all(b"payload").await.unwrap();
    assert_eq!(close_code(&raw.conn).await, CloseCode::PROTOCOL);
    assert_eq!(echo.record.accepted(), 0);
}

#[tokio::test]
async fn a_newer_protocol_version_is_refused_with_its_code() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let raw = raw_connect(&s).await;
    let (mut send, _recv) = raw.conn.open_bi().await.unwrap();
    let hello = Hello {
        version: 99,
        sct: None,
        client_name: None,
    };
    wire::write_frame(&mut send, &hello, proto::MAX_FRAME_LEN)
        .await
        .unwrap();
    assert_eq!(close_code(&raw.conn).await, CloseCode::VERSION);
}

#[tokio::test]
async fn an_unknown_request_gets_an_error_reply_and_the_connection_stays() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let raw = raw_connect(&s).await;
    let (mut send, mut recv, welcome) = raw_hello(&raw).await;
    assert_eq!(welcome.user.as_deref(), Some("alice"));
    assert!(welcome.local);

    // A request kind from the future: variant 200, with a valid frame around it.
    let mut frame = proto::encode_to_vec(&Request::ListServices, proto::MAX_FRAME_LEN).unwrap();
    frame[4] = 200;
    let crc = crc32(&frame[4..5]);
    frame[5..9].copy_from_slice(&crc.to_be_bytes());
    send.write_all(&frame).await.unwrap();
    match wire::read_frame::<Response>(&mut recv, proto::MAX_FRAME_LEN)
        .await
        .unwrap()
    {
        Some(Response::Error(e)) => assert_eq!(e.code, ErrorCode::UNKNOWN_REQUEST),
        other => panic!("expected an error reply, got {other:?}"),
    }
    wire::write_frame(&mut send, &Request::ListServices, proto::MAX_FRAME_LEN)
        .await
        .unwrap();
    match wire::read_frame::<Response>(&mut recv, proto::MAX_FRAME_LEN)
        .await
        .unwrap()
    {
        Some(Response::Services(list)) => assert_eq!(list[0].id, "echo"),
        other => panic!("expected services, got {other:?}"),
    }
}

async fn stream_reset_code(raw: &Raw, payload: &[u8]) -> StreamCode {
    let (mut send, mut recv) = raw.conn.open_bi().await.unwrap();
    let _ = send.write_all(payload).await;
    let _ = send.finish();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(20), recv.read(&mut buf)).await {
        Ok(Err(quinn::ReadError::Reset(code))) => StreamCode::from_varint(code),
        other => panic!("expected a stream reset, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_headers_and_unconfigured_targets_are_reset_with_codes() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let raw = raw_connect(&s).await;
    let _control = raw_hello(&raw).await;

    assert_eq!(
        stream_reset_code(&raw, b"\x00\x00\x00\x02??garbage").await,
        StreamCode::BAD_HEADER
    );
    assert_eq!(stream_reset_code(&raw, b"").await, StreamCode::BAD_HEADER);

    // There is no "connect to any host:port": only configured service ids.
    for target in [
        echo.addr.to_string(),
        "127.0.0.1:22".to_string(),
        "ECHO".to_string(),
    ] {
        let header = wire::tunnel_header(&target).unwrap();
        assert_eq!(
            stream_reset_code(&raw, &header).await,
            StreamCode::NO_SUCH_SERVICE,
            "{target}"
        );
    }
    assert_eq!(echo.record.accepted(), 0);

    // The connection survived all of it.
    let header = wire::tunnel_header("echo").unwrap();
    let (mut send, mut recv) = raw.conn.open_bi().await.unwrap();
    send.write_all(&header).await.unwrap();
    send.write_all(b"ok").await.unwrap();
    send.finish().unwrap();
    let echoed = recv.read_to_end(16).await.unwrap();
    assert_eq!(echoed, b"ok");
}

#[tokio::test]
async fn wrong_alpn_and_missing_client_certificate_fail_the_handshake() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let settings = TransportSettings::default();
    let endpoint = transport::client_endpoint(&settings).unwrap();
    let fp = Some(s.device.fingerprint.parse().unwrap());

    let (mut tls, _) = transport::client_tls_config(&identity_of(&s), proto::ALPN, fp).unwrap();
    tls.alpn_protocols = vec![b"tunnel/0".to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let r = endpoint
        .connect_with(cfg, s.device.addr, transport::SERVER_NAME)
        .unwrap()
        .await;
    assert!(r.is_err(), "wrong ALPN was accepted");

    // Same verifier, but no client certificate.
    let (verifier, _) = transport::PinnedKeyVerifier::new(fp);
    let no_cert = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(verifier)
    .with_no_client_auth();
    let mut no_cert = no_cert;
    no_cert.alpn_protocols = vec![proto::ALPN.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(no_cert).unwrap()));
    let r = match endpoint
        .connect_with(cfg, s.device.addr, transport::SERVER_NAME)
        .unwrap()
        .await
    {
        // TLS 1.3 client auth completes on the client before the server checks it: the failure
        // then arrives as the connection closing.
        Ok(conn) => {
            let e = conn.closed().await;
            Err::<(), _>(e)
        }
        Err(e) => Err(e),
    };
    assert!(r.is_err());
    device_still_serves(&s);
}
