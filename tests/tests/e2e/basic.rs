//! The happy path: pin, authorize, list services, forward.

use std::io::{Read, Write};
use std::net::TcpStream;

use tunnel_testkit::servers::TestServer;

use crate::setup;

#[test]
fn echo_round_trip_services_and_devices() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);

    // Pinned, never reached yet.
    let devices: serde_json::Value =
        serde_json::from_str(&s.client.ok(&["devices", "--json"])).unwrap();
    assert!(devices[0]["last_seen"].is_null(), "{devices}");
    assert!(s.client.ok(&["devices"]).contains(" never "));

    let services: serde_json::Value =
        serde_json::from_str(&s.client.ok(&["services", "cam", "--json"])).unwrap();
    assert_eq!(services[0]["id"], "echo");
    assert_eq!(services[0]["type"], "echo");
    // A listing is not a tunnel: the target saw nothing.
    assert_eq!(echo.record.accepted(), 0);

    // The device told us its id and our user name, and the client recorded them.
    let devices: serde_json::Value =
        serde_json::from_str(&s.client.ok(&["devices", "--json"])).unwrap();
    assert_eq!(devices[0]["name"], "cam");
    assert_eq!(devices[0]["device_id"], "dev-id");
    assert_eq!(devices[0]["user"], "alice");
    assert_eq!(devices[0]["fingerprint"], s.device.fingerprint);
    // … and when and how it last reached the device.
    assert_eq!(devices[0]["last_seen"]["path"], "direct", "{devices}");
    assert_eq!(devices[0]["last_seen"]["addr"], s.device.addr.to_string());
    let table = s.client.ok(&["devices"]);
    assert!(table.contains("direct, just now"), "{table}");
    assert!(table.contains(&s.device.addr.to_string()), "{table}");

    let open = s.client.open("cam", &["0:echo"], &[]);
    let mut conn = TcpStream::connect(open.local("echo")).unwrap();
    conn.write_all(b"hello through the tunnel").unwrap();
    let mut buf = [0u8; 24];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello through the tunnel");
    // Half-close: our EOF reaches the echo server, whose EOF comes back as ours.
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let outcomes = echo.record.wait_outcomes(1, tunnel_testkit::SOON);
    assert_eq!(outcomes[0], Ok((24, String::new())));

    assert!(s.device.proc.log().contains("client connected"));
}

#[test]
fn forget_and_user_listing() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let users: serde_json::Value =
        serde_json::from_str(&s.device_home.ok(&["user", "list", "--json"])).unwrap();
    assert_eq!(users[0]["username"], "alice");
    assert_eq!(users[0]["role"], "Owner");
    assert_eq!(
        users[0]["fingerprints"][0]["fingerprint"],
        s.client.fingerprint()
    );

    // Lookup by fingerprint prefix, then forget.
    let prefix = &s.device.fingerprint[..16];
    assert!(s.client.ok(&["services", prefix]).contains("echo"));
    assert!(
        s.client
            .ok(&["forget", "cam"])
            .contains("Forgot device 'cam'")
    );
    let out = s.client.cmd(&["services", "cam"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(crate::stderr(&out).contains("no known device matches 'cam'"));
}
