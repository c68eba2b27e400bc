//! Remote access through `tunnel-relay` (issue 10), with the real binaries: a device behind a NAT
//! that admits nothing inbound, reached from behind another NAT; tokens refused at the relay;
//! faults of the relay and the device; the path MTU a leg needs; and a relay that never sees
//! plaintext.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tunnel_testkit::impair::{Impairment, Relay as Impair};
use tunnel_testkit::netns::{A_PUBLIC, Homes, NatKind, in_ns};
use tunnel_testkit::servers::{Pattern, Sshd, TestServer, hash_reader, send_and_hash};
use tunnel_testkit::{SOON, World, wait_for};

use crate::stderr;

pub(crate) use tunnel_testkit::RelayLab as Lab;

/// 256 MiB each way and ssh through a relay, between two homes behind NAT routers: the device's
/// router admits no inbound connection, so the direct path cannot work (and hole punching is off
/// on the device, so the connection stays relayed; `punch.rs` tests punching).
#[test]
fn through_two_nats_ssh_and_256_mib_each_way_are_relayed() {
    let homes = Homes::new(NatKind::Cone, NatKind::Cone, &[]);
    let world = World::new();
    let a = homes.a.name.clone();
    let b = homes.b.name.clone();
    let sshd_dir = world.path("sshd");
    let sshd = in_ns(&a, move || Sshd::start(&sshd_dir))
        .expect("OpenSSH is required (bash .ci/run installs it)");
    let hasher = in_ns(&a, TestServer::hasher);
    const LEN: u64 = 256 << 20;
    let source = in_ns(&a, || TestServer::source(LEN, 7));

    let relay_home = world.relay("relay");
    let relay = relay_home.start_in(Some(&homes.wan), "0.0.0.0:5593");
    let dev = world.device(
        "dev",
        &[
            ("ssh", sshd.addr),
            ("up", hasher.addr),
            ("down", source.addr),
        ],
    );
    dev.append_config("[network]\nmdns = false\n[transport]\nhole_punching = false\n");
    let device_id = dev.device_id();
    relay_home.serve(&device_id, &dev.fingerprint());
    // The device reaches the relay at its address on the device's side of the internet.
    dev.ok(&[
        "relay",
        "add",
        "203.0.113.1:5593",
        "--fingerprint",
        &relay.fingerprint,
    ]);
    let client = world.client("cli");
    dev.add_user("alice", &client.fingerprint(), "Owner");
    let mut device = dev.start_in(Some(&homes.a), &["--listen", "0.0.0.0:5592"]);
    dev.wait_attached(&mut device);

    // The direct path is closed: the device's router admits nothing from outside.
    client.pin_raw("direct", &format!("{A_PUBLIC}:5592"), &device.fingerprint);
    let out = client.cmd_in(&b, &["services", "direct"]);
    assert!(
        !out.status.success(),
        "the direct path worked through the NAT"
    );
    assert!(stderr(&out).contains("cannot reach"), "{}", stderr(&out));

    // Through the relay (at its address on the client's side), with the direct address too.
    let token = dev.token("alice");
    client.pin_relayed(
        "cam",
        &device,
        &device_id,
        ("198.51.100.1:5593", &relay.fingerprint),
        &[&format!("{A_PUBLIC}:5592")],
        Some(&token),
    );
    let out = client.cmd_in(&b, &["services", "cam"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut open = client.open_in(
        Some(&homes.b),
        "cam",
        &["127.0.0.1:0:ssh", "127.0.0.1:0:up", "127.0.0.1:0:down"],
        &[],
    );
    // The relay as pinned here, or as the device named it (learned at `services`): both are
    // the same relay, reachable from this home.
    let path = open.wait_path();
    assert!(path.starts_with("relayed via "), "{path}");

    let port = open.local("ssh").port();
    let out = in_ns(&b, move || sshd.exec(port, "echo relayed-ok"));
    assert_eq!(out, "relayed-ok\n");

    let up = open.local("up");
    let pattern = Pattern::new(11);
    let want = pattern.sha256(LEN);
    let got = in_ns(&b, move || send_and_hash(up, &pattern, LEN)).unwrap();
    assert_eq!(got, (LEN, want), "upload through the relay differs");

    let down = open.local("down");
    let got = in_ns(&b, move || {
        let mut s = TcpStream::connect(down).unwrap();
        hash_reader(&mut s)
    })
    .unwrap();
    assert_eq!(got, (LEN, Pattern::new(7).sha256(LEN)), "download differs");
    let log = device.proc.log();
    assert!(
        log.contains("path=\"relayed\"") && log.contains("local=false"),
        "a relayed connection must be remote: {log}"
    );
}

#[test]
fn tokens_are_checked_at_the_relay_before_anything_reaches_the_device() {
    let echo = TestServer::echo();
    let lab = Lab::new(&[("echo", echo.addr)], "");
    let relay = lab.relay.addr.to_string();
    let before = lab.connects();
    let out = lab.client.ok(&["services", "cam"]);
    assert!(out.contains("echo"), "{out}");
    assert_eq!(lab.connects(), before + 1);

    let cases: [(&str, Option<&str>); 2] =
        [("notoken", None), ("wrongtoken", Some("guessed1234567"))];
    for (name, token) in cases {
        lab.pin(name, &relay, token);
        let out = lab.client.cmd(&["services", name]);
        assert!(!out.status.success(), "{name} was let through");
        assert!(
            stderr(&out).contains(&format!("relay {relay} refused the connection"))
                && stderr(&out).contains("token"),
            "{name}: {}",
            stderr(&out)
        );
    }
    // A removed user's token is refused at the relay at once.
    let bob = lab.world.client("bob");
    lab.change_tokens(|| lab.dev.add_user("bob", &bob.fingerprint(), "Standard"));
    let bob_token = lab.dev.token("bob");
    bob.pin_relayed(
        "cam",
        &lab.device,
        &lab.device_id,
        (&relay, &lab.relay.fingerprint),
        &[],
        Some(&bob_token),
    );
    let out = bob.cmd(&["services", "cam"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The device reloads state.json within half a second and uploads the hashes at once.
    let t0 = Instant::now();
    lab.change_tokens(|| {
        lab.dev.ok(&["user", "remove", "bob"]);
    });
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
    let seen = lab.connects();
    let out = bob.cmd(&["services", "cam"]);
    assert!(
        stderr(&out).contains("refused the token"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        lab.connects(),
        seen,
        "a refused client must never reach the device"
    );
    // An unknown device id.
    lab.client.pin_relayed(
        "ghost",
        &lab.device,
        "ghost-id",
        (&relay, &lab.relay.fingerprint),
        &[],
        Some(&lab.dev.token("alice")),
    );
    // Issue 18, defect 10: an id the relay does not serve gets the same answer as a wrong
    // token, so a stranger cannot enumerate the ids a relay serves.
    let out = lab.client.cmd(&["services", "ghost"]);
    assert!(
        stderr(&out).contains("refused the token"),
        "{}",
        stderr(&out)
    );
    // Failures from one source are limited (a burst of 10, then 12 a minute).
    let mut limited = false;
    for _ in 0..12 {
        let out = lab.client.cmd(&["services", "wrongtoken"]);
        if stderr(&out).contains("too many failed attempts") {
            limited = true;
            break;
        }
    }
    assert!(limited, "the relay never limited failed connects");
}

#[test]
fn relays_and_devices_are_pinned_and_ids_cannot_be_squatted() {
    let lab = Lab::new(&[], "");
    // A client that pins another key for the relay sends nothing to it.
    let other = "ab".repeat(32);
    lab.client.pin_relayed(
        "fake",
        &lab.device,
        &lab.device_id,
        (&lab.relay.addr.to_string(), &other),
        &[],
        Some(&lab.dev.token("alice")),
    );
    let out = lab.client.cmd(&["services", "fake"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not the pinned"), "{}", stderr(&out));
    // A second device claiming the first one's id with its own key is refused by the relay.
    let imposter = lab.world.device("imp", &[]);
    let text = std::fs::read_to_string(imposter.home.join("device.toml")).unwrap();
    std::fs::write(
        imposter.home.join("device.toml"),
        text.replace("imp-id", &lab.device_id),
    )
    .unwrap();
    imposter.append_config("[network]\nmdns = false\n");
    imposter.ok(&[
        "relay",
        "add",
        &lab.relay.addr.to_string(),
        "--fingerprint",
        &lab.relay.fingerprint,
    ]);
    let mut imp = imposter.start();
    let ready = lab.world.path("imp.ready");
    wait_for("the relay to refuse the imposter", SOON, || {
        let _ = imp.proc.try_status();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&ready).ok()?).ok()?;
        let state = v["relays"][0]["state"].as_str()?.to_string();
        state
            .contains("serves no device with that id and key")
            .then_some(())
    });
    assert!(lab.relay.proc.log().contains("not the one relay.toml has"));
    // The real device is still attached and reachable.
    assert!(lab.client.cmd(&["services", "cam"]).status.success());
}

/// Through the echo service of `open`: `payload` in, the same out.
fn echo_through(open: &tunnel_testkit::RunningOpen, payload: &[u8]) -> bool {
    use std::io::Write;
    let Ok(mut s) = TcpStream::connect(open.local("echo")) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(payload).is_err() || s.shutdown(std::net::Shutdown::Write).is_err() {
        return false;
    }
    let mut back = Vec::new();
    s.read_to_end(&mut back).is_ok() && back == payload
}

#[test]
fn relay_and_device_restarts_are_survived_without_restarting_open() {
    let echo = TestServer::echo();
    let mut lab = Lab::new(&[("echo", echo.addr)], crate::FAST_IDLE);
    // On the relay throughout: it is the relay's restart that is survived.
    let mut open = lab.client.open("cam", &["0:echo"], &["--no-punch"]);
    assert!(open.wait_path().starts_with("relayed via"));
    assert!(echo_through(&open, b"before"));

    // kill -9 of the relay, and a new one on the same address.
    let addr = lab.relay.addr.to_string();
    lab.relay.proc.kill9();
    lab.relay = lab.relay_home.start_in(None, &addr);
    lab.dev.wait_attached(&mut lab.device);
    wait_for(
        "open to carry data again after the relay restart",
        SOON,
        || echo_through(&open, b"after the relay restart").then_some(()),
    );

    // kill -9 of the device, and the same device again.
    lab.device.proc.kill9();
    lab.device = lab.dev.start();
    lab.dev.wait_attached(&mut lab.device);
    wait_for(
        "open to carry data again after the device restart",
        SOON,
        || echo_through(&open, b"after the device restart").then_some(()),
    );
    assert!(open.proc.try_status().is_none(), "open must keep running");
}

#[test]
fn a_removed_users_live_relayed_tunnel_is_cut() {
    let echo = TestServer::echo();
    let lab = Lab::new(&[("echo", echo.addr)], "");
    let bob = lab.world.client("bob");
    lab.change_tokens(|| lab.dev.add_user("bob", &bob.fingerprint(), "Standard"));
    bob.pin_relayed(
        "cam",
        &lab.device,
        &lab.device_id,
        (&lab.relay.addr.to_string(), &lab.relay.fingerprint),
        &[],
        Some(&lab.dev.token("bob")),
    );
    let mut open = bob.open("cam", &["0:echo"], &["--no-punch"]);
    assert!(open.wait_path().starts_with("relayed via"));
    let mut conn = TcpStream::connect(open.local("echo")).unwrap();
    std::io::Write::write_all(&mut conn, b"hello").unwrap();
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).unwrap();
    lab.dev.ok(&["user", "remove", "bob"]);
    assert!(
        tunnel_testkit::saw_reset(&mut conn, b"more"),
        "the removed user's tunnel was not reset"
    );
}

/// Pairing through the relay alone (a pairing string without addresses): the invitation's token
/// opens the relay channel, pairing replaces that token with the user's own, and the relay must
/// not cut the channel the pairing is answered on (it did: pairing timed out). Afterwards the
/// consumed invitation opens nothing at the relay.
#[test]
fn an_invitation_pairs_through_the_relay_alone() {
    let echo = TestServer::echo();
    let lab = Lab::new(&[("echo", echo.addr)], "");
    lab.client
        .ok(&["pairing", "cam", "enable", "password-invite"]);
    let mut out = String::new();
    lab.change_tokens(|| {
        out = lab
            .client
            .ok(&["user", "cam", "invite", "bob", "--role", "Standard"]);
    });
    let string: String = crate::pairing::pairing_line(&out)
        .split(',')
        .filter(|f| !f.starts_with("a="))
        .collect::<Vec<_>>()
        .join(",");
    assert!(string.contains(",r="), "no relay in {string}");
    let bob = lab.world.client("bob");
    let paired = bob.ok(&["pair", &string, "--name", "cam"]);
    assert!(paired.contains("as user 'bob'"), "{paired}");
    let mut open = bob.open("cam", &["0:echo"], &["--no-punch"]);
    assert!(open.wait_path().starts_with("relayed via"));
    assert!(echo_through(&open, b"paired through the relay"));
    // The same string again: its token is gone from the relay once the pairing channel closed.
    let eve = lab.world.client("eve");
    let again = eve.cmd(&["pair", &string, "--name", "cam"]);
    assert!(
        !again.status.success(),
        "a consumed invitation paired twice"
    );
    assert!(
        stderr(&again).contains("refused the token"),
        "{}",
        stderr(&again)
    );
}

/// A leg needs a path that carries 1208-byte datagrams (an inner QUIC packet and its tag): a
/// 1280-byte path MTU works, a smaller one fails with an error that says so (the TCP fallback
/// it then tries finds nothing at the proxy's port), and once TCP reaches the relay at that
/// port the same leg goes over TCP instead.
#[test]
fn a_leg_needs_a_1280_byte_path() {
    let echo = TestServer::echo();
    let lab = Lab::new(&[("echo", echo.addr)], "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let token = lab.dev.token("alice");
    let through = |max_datagram: usize, name: &str| {
        let imp = rt
            .block_on(Impair::start(
                lab.relay.addr,
                Impairment {
                    max_datagram,
                    ..Impairment::none()
                },
            ))
            .unwrap();
        lab.pin(name, &imp.addr.to_string(), Some(&token));
        let out = lab.client.cmd(&["services", name]);
        (out, imp)
    };
    // IPv4 path MTU 1280: 1252 bytes of UDP payload.
    let (out, _imp) = through(1252, "mtu1280");
    assert!(out.status.success(), "{}", stderr(&out));
    // Room for QUIC (1200) but not for a relayed packet and its tag.
    let (out, _imp) = through(1230, "mtu1258");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not carry 1208-byte datagrams"),
        "{}",
        stderr(&out)
    );
    // Path MTU 1200: not even the leg's own handshake fits.
    let (out, _imp) = through(1172, "mtu1200");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("1280"), "{}", stderr(&out));
    // The small path again, now with TCP to the relay at the proxy's port: the leg takes TCP.
    let (_, imp) = through(1230, "mtu1258-tcp");
    let relay_tcp = lab.relay.tcp.expect("the relay listens on TCP");
    let listener = std::net::TcpListener::bind(imp.addr).expect("TCP on the proxy's port");
    std::thread::spawn(move || {
        for inbound in listener.incoming().flatten() {
            let Ok(outbound) = TcpStream::connect(relay_tcp) else {
                continue;
            };
            let (mut ri, mut wo) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut ri, &mut wo));
            let (mut ro, mut wi) = (outbound, inbound);
            std::thread::spawn(move || std::io::copy(&mut ro, &mut wi));
        }
    });
    // No punching: the path under test is the relayed one.
    let mut open = lab.client.open("mtu1258-tcp", &["0:echo"], &["--no-punch"]);
    let path = open.wait_path();
    assert!(path.ends_with(" over TCP"), "{path}");
    assert!(echo_through(&open, &[7u8; 100_000]), "the echo differs");
}

/// What the relay forwards is ciphertext: a marker the client sends many times over never
/// appears in a datagram on the way, while a datagram that carries it in the clear is caught.
#[test]
fn the_relay_never_sees_plaintext() {
    let echo = TestServer::echo();
    // Relayed all the way (no direct path to leave the relay for).
    let lab = Lab::new(
        &[("echo", echo.addr)],
        "[transport]\nhole_punching = false\n",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let imp = rt
        .block_on(Impair::start(lab.relay.addr, Impairment::none()))
        .unwrap();
    const MARKER: &[u8] = b"PLAINTEXT-MARKER-7d3f9a";
    imp.control.scan_for(MARKER);
    lab.pin(
        "watched",
        &imp.addr.to_string(),
        Some(&lab.dev.token("alice")),
    );
    let mut open = lab.client.open("watched", &["0:echo"], &[]);
    assert!(open.wait_path().starts_with("relayed via"));
    let payload = MARKER.repeat(100_000);
    assert!(echo_through(&open, &payload), "the echo differs");
    let forwarded = imp
        .control
        .forwarded
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(forwarded > 1000, "only {forwarded} datagrams went through");
    assert_eq!(
        imp.control.marker_hits(),
        0,
        "the marker crossed in the clear"
    );
    // The scan itself works: a datagram with the marker in the clear is counted.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(&[b"xx".as_slice(), MARKER].concat(), imp.addr)
        .unwrap();
    wait_for("the control datagram to be scanned", SOON, || {
        (imp.control.marker_hits() == 1).then_some(())
    });
}

/// JWTs of an identity provider, instead of a token: checked by the relay (before forwarding)
/// and by the device; expired, forged, wrong-audience and other-device tokens are refused at the
/// relay, and a relay that accepts a JWT does not make the device accept it.
#[test]
fn jwts_are_checked_at_the_relay_and_on_the_device() {
    use tunnel_testkit::jwt::{Issuer, now};
    let echo = TestServer::echo();
    let world = World::new();
    let issuer = Issuer::new();
    let jwks = world.path("jwks.json");
    issuer.write_jwks(&jwks);
    let relay_home = world.relay("relay");
    relay_home.append_config(&issuer.config(&jwks));
    let relay = relay_home.start_in(None, "127.0.0.1:0");
    let dev = world.device("dev", &[("echo", echo.addr)]);
    dev.append_config(&format!(
        "[network]\nmdns = false\n{}",
        issuer.config(&jwks)
    ));
    let device_id = relay_home.attach(&dev, &relay);
    let client = world.client("cli");
    dev.add_user("alice", &client.fingerprint(), "Standard");
    let mut device = dev.start();
    dev.wait_attached(&mut device);
    let pin = |name: &str, token: &str| {
        client.pin_relayed(
            name,
            &device,
            &device_id,
            (&relay.addr.to_string(), &relay.fingerprint),
            &[],
            Some(token),
        );
    };
    pin("good", &issuer.token(&[&device_id]));
    let out = client.cmd(&["services", "good"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("echo"));

    let other = Issuer::new();
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = serde_json::json!({
            "iss": issuer.issuer, "aud": issuer.audience, "exp": now() + 3600,
            "tunnel_devices": [device_id],
        });
        f(&mut c);
        issuer.token_with(c)
    };
    let before = device.proc.log().matches("client connected").count();
    let bad = [
        ("expired", claims(&|c| c["exp"] = (now() - 3600).into())),
        ("audience", claims(&|c| c["aud"] = "someone-else".into())),
        (
            "device",
            claims(&|c| c["tunnel_devices"] = serde_json::json!(["other"])),
        ),
        ("forged", other.token(&[&device_id])),
    ];
    for (name, token) in &bad {
        pin(name, token);
        let out = client.cmd(&["services", name]);
        assert!(!out.status.success(), "{name} JWT was let through");
        assert!(
            stderr(&out).contains("refused the token"),
            "{name}: {}",
            stderr(&out)
        );
    }
    assert_eq!(
        device.proc.log().matches("client connected").count(),
        before,
        "a refused JWT must never reach the device"
    );

    // The device checks for itself: without [jwt] it refuses what the relay let through.
    drop(device);
    dev.remove_config("jwt");
    let mut device = dev.start();
    dev.wait_attached(&mut device);
    let out = client.cmd(&["services", "good"]);
    assert!(
        !out.status.success(),
        "the device accepted a JWT it has no keys for"
    );
    assert!(
        stderr(&out).contains("server-connect token"),
        "{}",
        stderr(&out)
    );
}

/// On loopback the relayed connection punches a direct path at once: the relay stops carrying it
/// (counted by a forwarder in front of the relay), the device still treats it as remote, and a
/// removed user's punched tunnel is cut like any other.
#[test]
fn a_punched_connection_leaves_the_relay_and_stays_authorized() {
    let echo = TestServer::echo();
    let lab = Lab::new(&[("echo", echo.addr)], "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let imp = rt
        .block_on(Impair::start(lab.relay.addr, Impairment::none()))
        .unwrap();
    lab.pin(
        "watched",
        &imp.addr.to_string(),
        Some(&lab.dev.token("alice")),
    );
    let mut open = lab.client.open("watched", &["0:echo"], &[]);
    open.wait_path_is("direct (punched)", SOON);
    // Each end moves when its own probe comes back: the device too.
    wait_for("the device to go direct", SOON, || {
        lab.device
            .proc
            .log()
            .contains("direct path punched")
            .then_some(())
    });
    let forwarded = || {
        imp.control
            .forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = forwarded();
    let payload = vec![0x5a; 8 << 20];
    assert!(echo_through(&open, &payload), "the echo differs");
    let after = forwarded();
    assert!(
        after - before < 100,
        "{} datagrams still went through the relay",
        after - before
    );
    let log = lab.device.proc.log();
    assert!(
        log.contains("path=\"relayed\"") && log.contains("local=false"),
        "a punched connection is still remote: {log}"
    );
    let mut conn = TcpStream::connect(open.local("echo")).unwrap();
    std::io::Write::write_all(&mut conn, b"hello").unwrap();
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).unwrap();
    lab.dev.ok(&["user", "remove", "alice"]);
    assert!(
        tunnel_testkit::saw_reset(&mut conn, b"more"),
        "the removed user's punched tunnel was not reset"
    );
}
