//! Hole punching (issue 11) with the real binaries between two homes behind real `nft` NAT
//! routers (`tunnel_testkit::netns::Homes`), the relay on the internet between them: behind two
//! endpoint-independent NATs a relayed connection goes direct while a transfer runs and the relay
//! stops carrying it; behind a symmetric NAT it stays relayed without a probe storm; a direct
//! path cut mid-transfer falls back to the relay with nothing lost. Plus, on loopback, a punched
//! connection that stays authorized like any other.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tunnel_testkit::netns::{A_PUBLIC, B_PUBLIC, Homes, Namespace, NatKind, in_ns};
use tunnel_testkit::servers::{Pattern, TestServer, send_and_hash};
use tunnel_testkit::{RunningDevice, RunningOpen, RunningRelay, SOON, World};

/// The relay's UDP port on the internet namespace.
const RELAY_PORT: u16 = 5593;

/// How long a punch may take once both ends are relayed (attempts run every 200 ms for 5 s).
const PUNCH_WITHIN: Duration = Duration::from_secs(15);

/// Two homes, a relay between them, a device in A with a hasher, an `open` in B through the
/// relay.
struct NatPunch {
    homes: Homes,
    _world: World,
    _relay: RunningRelay,
    _device: RunningDevice,
    open: RunningOpen,
    _hasher: TestServer,
}

impl NatPunch {
    fn new(a: NatKind, b: NatKind) -> Self {
        let homes = Homes::new(a, b, &[]);
        let world = World::new();
        let hasher = in_ns(&homes.a.name, TestServer::hasher);
        let relay_home = world.relay("relay");
        let relay = relay_home.start_in(Some(&homes.wan), &format!("0.0.0.0:{RELAY_PORT}"));
        let dev = world.device("dev", &[("up", hasher.addr)]);
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
        client.pin_relayed(
            "cam",
            &device,
            &device_id,
            (&format!("198.51.100.1:{RELAY_PORT}"), &relay.fingerprint),
            &[],
            Some(&dev.token("alice")),
        );
        let mut open = client.open_in(Some(&homes.b), "cam", &["127.0.0.1:0:up"], &[]);
        open.wait_path();
        // It connected through the relay (the ready file may already say it went direct).
        let log = open.proc.log();
        assert!(
            log.contains("connected") && log.contains("path=relayed via"),
            "{log}"
        );
        homes.wan.nft(&format!(
            "table ip watch {{\n\
             \x20 chain input {{ type filter hook input priority -10; udp dport {RELAY_PORT} counter; }}\n\
             \x20 chain forward {{ type filter hook forward priority -10; \
             ip saddr {{ {A_PUBLIC}, {B_PUBLIC} }} ip daddr {{ {A_PUBLIC}, {B_PUBLIC} }} udp dport != {RELAY_PORT} counter; }}\n\
             }}\n"
        ));
        Self {
            homes,
            _world: world,
            _relay: relay,
            _device: device,
            open,
            _hasher: hasher,
        }
    }

    /// `(packets, bytes)` of an nft counter of the `watch` table: `input` counts what reaches
    /// the relay, `forward` what crosses the internet between the two homes directly.
    fn counter(&self, chain: &str) -> (u64, u64) {
        let out = self
            .homes
            .wan
            .command("nft".as_ref())
            .args(["list", "chain", "ip", "watch", chain])
            .output()
            .expect("nft list");
        let text = String::from_utf8_lossy(&out.stdout);
        let num = |key: &str| -> u64 {
            text.split_whitespace()
                .skip_while(|w| *w != key)
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        (num("packets"), num("bytes"))
    }

    /// Uploads `len` bytes through the tunnel on a thread inside home B; joins to `(len, sha)`.
    fn upload(&self, len: u64, seed: u64) -> std::thread::JoinHandle<(u64, String)> {
        let up: SocketAddr = self.open.local("up");
        let ns = self.homes.b.name.clone();
        std::thread::spawn(move || {
            in_ns(&ns, move || send_and_hash(up, &Pattern::new(seed), len)).expect("upload")
        })
    }
}

/// Both homes behind endpoint-independent NATs: the connection starts relayed and goes direct
/// within seconds while a SHA-256-checked transfer runs; from then on the relay carries nothing
/// of it, and the bytes cross the internet straight between the two routers.
#[test]
fn behind_two_cone_nats_the_connection_goes_direct_during_a_transfer() {
    let mut lab = NatPunch::new(NatKind::Cone, NatKind::Cone);
    // Slow enough that the transfer is still running when the path switches.
    lab.homes.set_rate(100);
    const LEN: u64 = 48 << 20;
    let transfer = lab.upload(LEN, 3);
    lab.open.wait_path_is("direct (punched)", PUNCH_WITHIN);
    let (_, relayed_at_switch) = lab.counter("input");
    let got = transfer.join().unwrap();
    assert_eq!(
        got,
        (LEN, Pattern::new(3).sha256(LEN)),
        "the transfer differs"
    );
    let (_, relayed_after) = lab.counter("input");
    let (_, direct_bytes) = lab.counter("forward");
    // What reached the relay after the switch: in-flight packets, keepalives of both legs.
    assert!(
        relayed_after - relayed_at_switch < 2 << 20,
        "the relay still carried {} bytes after the switch",
        relayed_after - relayed_at_switch
    );
    assert!(
        direct_bytes > 8 << 20,
        "only {direct_bytes} bytes went straight between the homes"
    );
    let log = lab.open.proc.log();
    assert!(log.contains("the connection changed path"), "{log}");
    lab.homes.set_rate(0);
    // A second transfer, direct from the start, does not touch the relay.
    let (_, before) = lab.counter("input");
    let got = lab.upload(16 << 20, 4).join().unwrap();
    assert_eq!(got, (16 << 20, Pattern::new(4).sha256(16 << 20)));
    let (_, after) = lab.counter("input");
    assert!(
        after - before < 1 << 20,
        "{} bytes via the relay",
        after - before
    );
}

/// The client's home behind a symmetric NAT (a new outside port per destination): no punch can
/// work, the connection stays relayed and carries data, and probing stays a trickle (attempts
/// of a few packets a second, then backoff).
#[test]
fn behind_a_symmetric_nat_the_connection_stays_relayed_without_a_probe_storm() {
    let mut lab = NatPunch::new(NatKind::Cone, NatKind::Symmetric);
    let start = Instant::now();
    let got = lab.upload(8 << 20, 5).join().unwrap();
    assert_eq!(got, (8 << 20, Pattern::new(5).sha256(8 << 20)));
    while start.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let path = lab.open.wait_path();
    assert!(path.starts_with("relayed via"), "{path}");
    let (probes, _) = lab.counter("forward");
    // Two ends, two candidates each, 5 probes a second during 5-second attempts, a 4-second
    // pause doubling: a few hundred packets at most in 12 s.
    assert!(probes > 0, "no probe was ever sent");
    assert!(probes < 600, "{probes} probe packets in 12 s");
}

/// A direct path cut mid-transfer (the routers can no longer reach each other, the relay still
/// can): the connection falls back to the relay within seconds and the transfer completes
/// byte-exact; the path says so.
#[test]
fn a_direct_path_cut_mid_transfer_falls_back_to_the_relay() {
    let mut lab = NatPunch::new(NatKind::Cone, NatKind::Cone);
    lab.open.wait_path_is("direct (punched)", PUNCH_WITHIN);
    lab.homes.set_rate(100);
    const LEN: u64 = 64 << 20;
    let transfer = lab.upload(LEN, 6);
    std::thread::sleep(Duration::from_secs(1));
    lab.homes.wan.nft(&format!(
        "table ip cut {{\n  chain forward {{ type filter hook forward priority -20; \
         ip saddr {{ {A_PUBLIC}, {B_PUBLIC} }} ip daddr {{ {A_PUBLIC}, {B_PUBLIC} }} drop; }}\n}}\n"
    ));
    let (_, relayed_at_cut) = lab.counter("input");
    lab.open.wait_path_is("relayed via", SOON);
    let got = transfer.join().unwrap();
    assert_eq!(
        got,
        (LEN, Pattern::new(6).sha256(LEN)),
        "the transfer differs"
    );
    let (_, relayed_after) = lab.counter("input");
    assert!(
        relayed_after - relayed_at_cut > 4 << 20,
        "the rest of the transfer did not go through the relay"
    );
}
