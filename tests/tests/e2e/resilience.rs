//! Crashes, restarts and signals: kill -9 of either end mid-transfer, a device that is down,
//! graceful shutdown.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tunnel_testkit::servers::{Pattern, TestServer};
use tunnel_testkit::{SOON, wait_for};

use crate::{FAST_IDLE, setup_with};

const MIB: u64 = 1024 * 1024;

#[test]
fn kill9_of_the_device_resets_the_local_app_and_open_recovers_after_restart() {
    let source = TestServer::source(8192 * MIB, 31);
    let echo = TestServer::echo();
    let mut s = setup_with(&[("source", source.addr), ("echo", echo.addr)], FAST_IDLE);
    let open = s.client.open("cam", &["0:source", "0:echo"], &[]);

    let mut conn = TcpStream::connect(open.local("source")).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < 8 * MIB {
        got += conn.read(&mut buf).unwrap() as u64;
    }
    s.device.proc.kill9();
    // Restart on the same port with the same home: same key, same users.
    let addr = s.device.addr.to_string();
    let restarted = s.device_home.start_with(&["--listen", &addr]);
    assert_eq!(restarted.fingerprint, s.device.fingerprint);

    // The transfer must end in an error, never in a clean EOF on truncated data.
    let end = loop {
        match conn.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => got += n as u64,
            Err(e) => break Some(e.kind()),
        }
    };
    assert_eq!(end, Some(ErrorKind::ConnectionReset), "after {got} bytes");
    assert!(got < 8192 * MIB);

    // The same `open` reconnects by itself.
    let mut c = TcpStream::connect(open.local("echo")).unwrap();
    c.write_all(b"back again").unwrap();
    let mut b = [0u8; 10];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"back again");
    assert!(
        open.proc.log().contains("lost the connection") || open.proc.log().contains("reconnecting")
    );
}

#[test]
fn kill9_of_the_client_gives_the_service_a_reset() {
    let sink = TestServer::hasher();
    let s = setup_with(&[("sink", sink.addr)], FAST_IDLE);
    let mut open = s.client.open("cam", &["0:sink"], &[]);
    let mut conn = TcpStream::connect(open.local("sink")).unwrap();
    let pattern = Pattern::new(4);
    let mut data = Vec::new();
    pattern.write_to(&mut data, 8 * MIB).unwrap();
    conn.write_all(&data).unwrap();
    // The service has started receiving.
    wait_for("the sink to accept", SOON, || {
        (sink.record.accepted() == 1).then_some(())
    });
    open.proc.kill9();
    // The service sees its connection reset (after the device notices the dead client), not an EOF
    // that would make the truncated upload look complete.
    let outcomes = sink.record.wait_outcomes(1, SOON);
    assert_eq!(outcomes[0], Err(ErrorKind::ConnectionReset), "{outcomes:?}");
    drop(conn);
}

#[test]
fn open_keeps_listening_while_the_device_is_down() {
    let echo = TestServer::echo();
    let mut s = setup_with(&[("echo", echo.addr)], FAST_IDLE);
    let addr = s.device.addr.to_string();
    s.device.proc.signal("TERM");
    assert_eq!(s.device.proc.wait_exit(SOON).code(), Some(0));

    let mut open = s.client.open("cam", &["0:echo"], &["--connect-wait", "1"]);
    // While the device is down, a local connection waits, then is reset with a logged reason.
    let started = Instant::now();
    let mut conn = TcpStream::connect(open.local("echo")).unwrap();
    let mut buf = [0u8; 1];
    let r = conn.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected a reset, got {r:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(
        open.proc.try_status().is_none(),
        "open exited: {}",
        open.proc.log()
    );
    wait_for("reason in log", SOON, || {
        open.proc
            .log()
            .contains("device not reachable")
            .then_some(())
    });

    // Once the device is back, the same listener works.
    let _device = s.device_home.start_with(&["--listen", &addr]);
    let ok = wait_for("tunnel to come back", SOON, || {
        let mut c = TcpStream::connect(open.local("echo")).ok()?;
        c.write_all(b"up").ok()?;
        let mut b = [0u8; 2];
        c.read_exact(&mut b).ok()?;
        Some(b)
    });
    assert_eq!(&ok, b"up");
}

#[test]
fn sigterm_stops_device_and_client_gracefully() {
    let echo = TestServer::echo();
    let mut s = setup_with(&[("echo", echo.addr)], "");
    let mut open = s.client.open("cam", &["0:echo"], &[]);
    let mut c = TcpStream::connect(open.local("echo")).unwrap();
    c.write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    c.read_exact(&mut b).unwrap();
    drop(c);

    s.device.proc.signal("TERM");
    assert_eq!(s.device.proc.wait_exit(SOON).code(), Some(0));
    assert!(s.device.proc.log().contains("stopped"));
    // The client treats a device shutdown as transient: it keeps running and retries.
    wait_for("client to notice", SOON, || {
        open.proc
            .log()
            .contains("lost the connection")
            .then_some(())
    });
    assert!(open.proc.try_status().is_none());

    open.proc.signal("TERM");
    assert_eq!(open.proc.wait_exit(SOON).code(), Some(0));
}

#[test]
fn a_second_signal_exits_at_once() {
    let echo = TestServer::echo();
    let s = setup_with(&[("echo", echo.addr)], "");
    let mut open = s
        .client
        .open("cam", &["0:echo"], &["--drain-timeout", "600"]);
    // A live tunnel makes the first signal wait for it to drain.
    let mut c = TcpStream::connect(open.local("echo")).unwrap();
    c.write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    c.read_exact(&mut b).unwrap();
    open.proc.signal("INT");
    wait_for("drain to start", SOON, || {
        open.proc
            .log()
            .contains("waiting for live tunnels")
            .then_some(())
    });
    open.proc.signal("INT");
    assert_eq!(open.proc.wait_exit(SOON).code(), Some(130));
}
