//! The TCP fallback of relay legs (issue 11), with the real binaries: homes whose routers drop
//! every UDP packet their hosts send reach the relay over TLS-over-TCP on the relay's port, the
//! inner connection unchanged; ssh and a SHA-256-checked transfer go through. Plus, on loopback,
//! a leg forced onto TCP and a relay that says which TCP port it took.

use std::net::SocketAddr;

use tunnel_testkit::netns::{Homes, NatKind, Ns, in_ns};
use tunnel_testkit::servers::{Pattern, Sshd, TestServer, send_and_hash};
use tunnel_testkit::{SOON, World};

/// The relay's port (UDP and TCP) on the internet namespace.
const RELAY_PORT: u16 = 5593;

/// Makes `router` drop every UDP packet its LAN sends, as a locked-down hotel or office network.
fn block_udp(router: &Ns) {
    router.nft(
        "table ip block {\n  chain forward { type filter hook forward priority -5; \
         iifname \"lan\" meta l4proto udp drop; }\n}\n",
    );
}

/// The device's home and the client's home both drop all outbound UDP: the device attaches over
/// TCP, the client's `open` connects over TCP (after the one-second UDP head start), and ssh and
/// a 32 MiB upload work through two TCP legs.
#[test]
fn with_udp_blocked_both_ends_reach_the_relay_over_tcp_and_ssh_works() {
    let homes = Homes::new(NatKind::Cone, NatKind::Cone, &[]);
    block_udp(&homes.ra);
    block_udp(&homes.rb);
    let world = World::new();
    let a = homes.a.name.clone();
    let b = homes.b.name.clone();
    let sshd_dir = world.path("sshd");
    let sshd = in_ns(&a, move || Sshd::start(&sshd_dir))
        .expect("OpenSSH is required (bash .ci/run installs it)");
    let hasher = in_ns(&a, TestServer::hasher);
    let relay_home = world.relay("relay");
    let relay = relay_home.start_in(Some(&homes.wan), &format!("0.0.0.0:{RELAY_PORT}"));
    let dev = world.device("dev", &[("ssh", sshd.addr), ("up", hasher.addr)]);
    dev.append_config("[network]\nmdns = false\n");
    let device_id = dev.device_id();
    relay_home.serve(&device_id, &dev.fingerprint());
    dev.ok(&[
        "relay",
        "add",
        &format!("203.0.113.1:{RELAY_PORT}"),
        "--fingerprint",
        &relay.fingerprint,
    ]);
    let client = world.client("cli");
    dev.add_user("alice", &client.fingerprint(), "Owner");
    let mut device = dev.start_in(Some(&homes.a), &["--listen", "0.0.0.0:5592"]);
    dev.wait_attached(&mut device);
    let log = device.proc.log();
    assert!(
        log.contains("attached to the relay") && log.contains("over=TCP"),
        "{log}"
    );
    client.pin_relayed(
        "cam",
        &device,
        &device_id,
        (&format!("198.51.100.1:{RELAY_PORT}"), &relay.fingerprint),
        &[],
        Some(&dev.token("alice")),
    );
    let mut open = client.open_in(
        Some(&homes.b),
        "cam",
        &["127.0.0.1:0:ssh", "127.0.0.1:0:up"],
        &[],
    );
    open.wait_path_is("relayed via", SOON);
    let path = open.wait_path();
    assert!(path.ends_with(" over TCP"), "{path}");

    let port = open.local("ssh").port();
    let out = in_ns(&b, move || sshd.exec(port, "echo over-tcp-ok"));
    assert_eq!(out, "over-tcp-ok\n");

    const LEN: u64 = 32 << 20;
    let up: SocketAddr = open.local("up");
    let got = in_ns(&b, move || send_and_hash(up, &Pattern::new(21), LEN)).unwrap();
    assert_eq!(got, (LEN, Pattern::new(21).sha256(LEN)), "upload differs");
    // Nothing of it could have taken UDP.
    assert!(path.starts_with("relayed via"), "{path}");
}

/// On loopback, `--relay-via tcp` puts the client's leg on TCP even though UDP works; the relay
/// listens on TCP at the UDP port it was given (`:0` included) and says so in its ready file.
#[test]
fn a_leg_forced_onto_tcp_carries_a_checked_transfer() {
    let world = World::new();
    let hasher = TestServer::hasher();
    let relay_home = world.relay("relay");
    let relay = relay_home.start_in(None, "127.0.0.1:0");
    assert_eq!(relay.tcp, Some(relay.addr), "TCP on the UDP port");
    let dev = world.device("dev", &[("up", hasher.addr)]);
    dev.append_config("[network]\nmdns = false\n[transport]\nhole_punching = false\n");
    let device_id = relay_home.attach(&dev, &relay);
    let client = world.client("cli");
    dev.add_user("alice", &client.fingerprint(), "Owner");
    let mut device = dev.start();
    dev.wait_attached(&mut device);
    client.pin_relayed(
        "cam",
        &device,
        &device_id,
        (&relay.addr.to_string(), &relay.fingerprint),
        &[],
        Some(&dev.token("alice")),
    );
    let mut open = client.open("cam", &["127.0.0.1:0:up"], &["--relay-via", "tcp"]);
    let path = open.wait_path();
    assert!(
        path.starts_with("relayed via") && path.ends_with(" over TCP"),
        "{path}"
    );
    const LEN: u64 = 64 << 20;
    let got = send_and_hash(open.local("up"), &Pattern::new(22), LEN).unwrap();
    assert_eq!(got, (LEN, Pattern::new(22).sha256(LEN)), "upload differs");
}
