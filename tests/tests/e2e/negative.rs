//! Refusals: wrong device key, unknown client key, removed user, unknown service, target down,
//! garbage UDP.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, UdpSocket};

use rand::RngCore;
use tunnel_testkit::servers::TestServer;
use tunnel_testkit::{SOON, World, saw_reset, wait_for};

use crate::{setup, stderr};

/// Reads until EOF or error; returns the error kind, or `None` for a clean EOF.
fn read_until_end(conn: &mut TcpStream) -> Option<ErrorKind> {
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(e.kind()),
        }
    }
}

#[test]
fn wrong_device_fingerprint_is_a_loud_refusal_and_nothing_is_sent() {
    let echo = TestServer::echo();
    let world = World::new();
    let dev = world.device("dev", &[("echo", echo.addr)]);
    let client = world.client("cli");
    dev.add_user("alice", &client.fingerprint(), "Owner");
    let device = dev.start();
    let impostor = tunnel_shared::identity::SecretKey::generate()
        .fingerprint()
        .to_string();
    client.pin_raw("cam", &device.addr.to_string(), &impostor);

    let out = client.cmd(&["services", "cam"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("DEVICE IDENTIFICATION HAS CHANGED"), "{err}");
    assert!(
        err.contains(&device.fingerprint),
        "actual key not shown: {err}"
    );
    assert!(err.contains(&impostor), "pinned key not shown: {err}");

    // `open` gives up at once instead of retrying, and never forwards a byte.
    let (status, log) = client.open_until_exit("cam", &["0:echo"]);
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("DEVICE IDENTIFICATION HAS CHANGED"), "{log}");
    assert_eq!(echo.record.accepted(), 0);
    assert!(!device.proc.log().contains("client connected"));
}

#[test]
fn unknown_client_key_is_refused_with_a_clear_message() {
    let echo = TestServer::echo();
    let world = World::new();
    let dev = world.device("dev", &[("echo", echo.addr)]);
    let device = dev.start();
    let client = world.client("stranger");
    client.pin("cam", &device);
    let fp = client.fingerprint();

    let out = client.cmd(&["services", "cam"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("does not know your key {fp}")),
        "{err}"
    );
    assert!(err.contains("tunnel-device user add"), "{err}");

    let (status, log) = client.open_until_exit("cam", &["0:echo"]);
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("does not know your key"), "{log}");
    assert_eq!(echo.record.accepted(), 0);
    wait_for("device log", SOON, || {
        device
            .proc
            .log()
            .contains("refused a client key")
            .then_some(())
    });
}

#[test]
fn removing_a_user_cuts_their_live_tunnel() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let mut open = s.client.open("cam", &["0:echo"], &[]);
    let mut conn = TcpStream::connect(open.local("echo")).unwrap();
    conn.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();

    s.device_home.ok(&["user", "remove", "alice"]);

    // The local application sees a reset, not a clean end.
    assert_eq!(read_until_end(&mut conn), Some(ErrorKind::ConnectionReset));
    // So does the target on the device side.
    let outcomes = echo.record.wait_outcomes(1, SOON);
    assert!(outcomes[0].is_err(), "{outcomes:?}");
    // `open` stops: retrying with a revoked key cannot help.
    assert_eq!(open.proc.wait_exit(SOON).code(), Some(1));
    assert!(open.proc.log().contains("revoked"), "{}", open.proc.log());
    assert!(s.device.proc.log().contains("access removed"));
}

#[test]
fn unknown_service_is_reset_with_a_reason() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let open = s.client.open("cam", &["0:nosuch"], &[]);
    let mut conn = TcpStream::connect(open.local("nosuch")).unwrap();
    assert!(saw_reset(&mut conn, b"hello"), "expected a reset");
    wait_for("client log", SOON, || {
        open.proc
            .log()
            .contains("refused the tunnel to 'nosuch': no such service")
            .then_some(())
    });
    // Logged by the connection manager's service check, which can finish after the refusal.
    wait_for("the service check in the client log", SOON, || {
        open.proc
            .log()
            .contains("offers no service 'nosuch'")
            .then_some(())
    });
    assert_eq!(echo.record.accepted(), 0);
}

#[test]
fn unreachable_target_is_reset_with_a_reason() {
    // A port nobody listens on: below 1024, so no test (nor an ephemeral port) takes it.
    let closed: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let s = setup(&[("down", closed)]);
    let open = s.client.open("cam", &["0:down"], &[]);
    let mut conn = TcpStream::connect(open.local("down")).unwrap();
    assert!(saw_reset(&mut conn, b"hello"), "expected a reset");
    wait_for("client log", SOON, || {
        open.proc
            .log()
            .contains("could not reach the service's target")
            .then_some(())
    });
    assert!(s.device.proc.log().contains("cannot reach the service"));
}

#[test]
fn removing_a_service_resets_its_live_tunnels() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let open = s.client.open("cam", &["0:echo"], &[]);
    let mut conn = TcpStream::connect(open.local("echo")).unwrap();
    conn.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    s.device_home.ok(&["service", "remove", "echo"]);
    assert_eq!(read_until_end(&mut conn), Some(ErrorKind::ConnectionReset));
}

#[test]
fn garbage_udp_does_not_hurt_the_device() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = rand::thread_rng();
    for i in 0..2000usize {
        let mut pkt = vec![0u8; 1 + (i * 7919) % 1500];
        rng.fill_bytes(&mut pkt);
        if i % 3 == 0 {
            // Looks like a QUIC long-header Initial of version 1.
            pkt[0] = 0xc0 | (pkt[0] & 0x0f);
            if pkt.len() > 5 {
                pkt[1..5].copy_from_slice(&1u32.to_be_bytes());
            }
        }
        let _ = sock.send_to(&pkt, s.device.addr);
    }
    let open = s.client.open("cam", &["0:echo"], &[]);
    let mut conn = TcpStream::connect(open.local("echo")).unwrap();
    conn.write_all(b"still alive").unwrap();
    let mut buf = [0u8; 11];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still alive");
    let mut dev = s.device;
    assert!(dev.proc.try_status().is_none(), "device died");
    assert!(!dev.proc.log().contains("panicked"));
}
