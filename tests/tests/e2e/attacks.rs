//! Regression tests of issue 18 (security round 3: the relay path), with the real binaries on
//! loopback and hostile relay clients from this process (throwaway keys, a Guest's token, raw
//! ClientHello floods inside their channels, idle TCP and TLS streams). Each failed on the
//! main branch before the fix; the figures they print are in docs/SECURITY.md.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tunnel_shared::identity::Fingerprint;
use tunnel_shared::relay::{LegHello, PROTOCOL_VERSION, RelayCode, RelayEvent, TokenEntry};
use tunnel_shared::secret::Secret;
use tunnel_testkit::hostile::{self, RelayLeg};
use tunnel_testkit::process::{fd_count, rss_kib};
use tunnel_testkit::servers::TestServer;
use tunnel_testkit::{SOON, wait_for};

use crate::relay::Lab;
use crate::stderr;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A Guest user (who may not even tunnel remotely) with its own key; returns its token.
fn guest(lab: &Lab) -> Secret {
    let g = lab.world.client("guest");
    lab.change_tokens(|| lab.dev.add_user("guest", &g.fingerprint(), "Guest"));
    Secret::new(lab.dev.token("guest"))
}

fn relay_fp(lab: &Lab) -> Fingerprint {
    lab.relay.fingerprint.parse().unwrap()
}

/// Opens up to `n` channels to the lab's device from `from`, each with a fresh key and `token`;
/// stops at the first refusal and returns the open legs and that refusal.
async fn channels(
    lab: &Lab,
    from: &str,
    token: &Secret,
    n: usize,
) -> (Vec<RelayLeg>, Option<RelayCode>) {
    let mut legs = Vec::new();
    for _ in 0..n {
        let (leg, answer) = hostile::relay_leg(
            from,
            lab.relay.addr,
            relay_fp(lab),
            hostile::connect_hello(&lab.device_id, Some(token)),
        )
        .await;
        match answer {
            Some(RelayEvent::Connected { .. }) => legs.push(leg),
            other => return (legs, hostile::refusal(&leg, other.as_ref())),
        }
    }
    (legs, None)
}

/// Waits until every leg is closed; the time it took and whether each was closed with `code`.
fn wait_closed(legs: &[RelayLeg], code: RelayCode, within: Duration) -> Duration {
    let t0 = Instant::now();
    wait_for("the relay to close the legs", within, || {
        legs.iter()
            .all(|l| l.conn.close_reason().is_some())
            .then_some(())
    });
    let took = t0.elapsed();
    for l in legs {
        assert_eq!(
            hostile::refusal(l, None),
            Some(code),
            "closed with another code"
        );
    }
    took
}

fn timed_ok(lab: &Lab, device: &str) -> Duration {
    let t0 = Instant::now();
    let out = lab.client.cmd(&["services", device]);
    assert!(
        out.status.success(),
        "the owner could not connect ({device}): {}",
        stderr(&out)
    );
    t0.elapsed()
}

/// Defect 1 (high): ten channels of one Guest token pouring ClientHello-only Initials through
/// the relay (≈ 600 KB/s) kept the owner out directly (0/3) and relayed (0/3), and her channels
/// kept flooding after `user remove`. Now each channel gets a small handshake budget at the
/// relay, relayed handshakes have their own gate on the device (per credential, a quarter kept
/// for owners, Retry under load), and a removed user's channels are closed at once.
#[test]
fn token_holders_flooding_through_the_relay_lock_out_no_owner() {
    let lab = Lab::new(&[], "");
    let token = guest(&lab);
    lab.client.pin("direct", &lab.device);
    let rt = runtime();
    let (legs, refused) = rt.block_on(channels(&lab, "127.0.0.2", &token, 10));
    assert_eq!((legs.len(), refused), (10, None));
    let legs = Arc::new(legs);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (legs, stop, sent) = (legs.clone(), stop.clone(), sent.clone());
        let target = lab.device.addr;
        rt.spawn(async move {
            // 5 fresh ClientHellos per channel every 100 ms: 500 Initials (≈ 600 KB) a second.
            while !stop.load(Ordering::Relaxed) {
                let packets = hostile::initial_packets(target, 5 * legs.len());
                for (leg, chunk) in legs.iter().zip(packets.chunks(5)) {
                    let n = hostile::flood_channel(leg, chunk);
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let mut times = Vec::new();
    for _ in 0..3 {
        times.push(("direct", timed_ok(&lab, "direct")));
        times.push(("relayed", timed_ok(&lab, "cam")));
    }
    eprintln!(
        "owner connects during a relayed flood by one token holder ({} Initials sent): {times:?}",
        sent.load(Ordering::Relaxed)
    );
    // The guest removed: the relay closes every channel her token opened, within a second of
    // the device's upload.
    let t0 = Instant::now();
    lab.dev.ok(&["user", "remove", "guest"]);
    let closed = wait_closed(&legs, RelayCode::TOKEN_REJECTED, Duration::from_secs(5));
    eprintln!(
        "flooding channels closed {:?} after `user remove` returned (the device reloads state.json \
         every 0.5 s)",
        t0.elapsed()
    );
    assert!(closed < Duration::from_secs(3), "took {closed:?}");
    stop.store(true, Ordering::Relaxed);
    rt.block_on(flood).unwrap();
    assert!(
        lab.relay.proc.log().contains("no longer accepts the token"),
        "{}",
        lab.relay.proc.log()
    );
}

/// Defect 5 (relay): one token with throw-away keys held 252 channels, and the owner was
/// refused "the relay is at a limit", still after the user was removed. Now a token holds at
/// most `max_channels_per_token` (16), owners keep a reserve, and removal closes the channels.
#[test]
fn one_token_cannot_take_every_channel() {
    let lab = Lab::new(&[], "");
    let token = guest(&lab);
    let rt = runtime();
    let (legs, refused) = rt.block_on(channels(&lab, "127.0.0.2", &token, 40));
    assert_eq!(legs.len(), 16, "channels of one token");
    assert_eq!(refused, Some(RelayCode::BUSY));
    timed_ok(&lab, "cam");
    lab.dev.ok(&["user", "remove", "guest"]);
    wait_closed(&legs, RelayCode::TOKEN_REJECTED, Duration::from_secs(5));
    timed_ok(&lab, "cam");
    drop(rt);
}

/// Defect 5 (device): one Guest key held all 256 connections past hello and the owner was
/// refused "connection limit". Now one user holds at most `max_connections_per_user` (32).
#[test]
fn one_user_cannot_take_every_device_connection() {
    use tunnel_shared::client::{ConnectOptions, Target, connect_to};
    use tunnel_shared::config::{Host, HostPort, TransportSettings};
    use tunnel_shared::transport::{self, Identity};
    let lab = Lab::new(&[], "");
    let _ = guest(&lab);
    let key = tunnel_shared::identity::load_key(&lab.world.client("guest").home.join("client.key"))
        .unwrap();
    let identity = Identity::new(key).unwrap();
    lab.client.pin("direct", &lab.device);
    let rt = runtime();
    let (held, refusal) = rt.block_on(async {
        let endpoint = transport::client_endpoint(&TransportSettings::default()).unwrap();
        let addrs = [HostPort {
            host: Host::Ip(lab.device.addr.ip()),
            port: lab.device.addr.port(),
        }];
        let target = Target {
            name: "dev",
            addresses: &addrs,
            pin: Some(lab.device.fingerprint.parse().unwrap()),
            sct: None,
            relays: &[],
            device_id: None,
        };
        let opts = ConnectOptions::default();
        let mut held = Vec::new();
        for _ in 0..64 {
            match connect_to(&endpoint, &identity, &target, &opts).await {
                Ok(s) => held.push(s),
                Err(e) => return (held, e.to_string()),
            }
        }
        (held, String::new())
    });
    assert_eq!(held.len(), 32, "connections of one user");
    assert!(
        refusal.contains("busy") || refusal.contains("limit"),
        "{refusal}"
    );
    timed_ok(&lab, "direct");
    timed_ok(&lab, "cam");
    assert!(
        lab.device
            .proc
            .log()
            .contains("this user's connection limit reached")
    );
    drop(held);
    drop(rt);
}

/// Defect 4: after `Connect` the relay never read a client's control stream again, and quinn
/// buffered up to the legs' 8 MiB stream window: a token and throw-away keys held the relay's
/// memory (8 → 281 MiB with 32 keys). Now anything after `Connect` closes the leg, and leg
/// windows are 64 KiB.
#[test]
fn a_client_leg_cannot_make_the_relay_buffer() {
    let lab = Lab::new(&[], "");
    let token = guest(&lab);
    let rt = runtime();
    let pid = lab.relay.proc.pid();
    let before = rss_kib(pid);
    let (mut legs, _) = rt.block_on(channels(&lab, "127.0.0.2", &token, 8));
    assert_eq!(legs.len(), 8);
    let junk = vec![0x42_u8; 8 << 20];
    rt.block_on(async {
        for leg in &mut legs {
            let write = leg.send.write_all(&junk);
            let r = tokio::time::timeout(Duration::from_secs(10), write).await;
            assert!(
                !matches!(r, Ok(Ok(()))),
                "the relay took 8 MiB on a control stream it should not read"
            );
        }
    });
    wait_closed(&legs, RelayCode::PROTOCOL, Duration::from_secs(10));
    let after = rss_kib(pid);
    eprintln!("relay RSS {before} KiB before, {after} KiB after 8 legs wrote 8 MiB each");
    assert!(
        after < before + 16 * 1024,
        "the relay grew from {before} to {after} KiB"
    );
}

/// A raw TCP connection from `from` to `to` (bound first, so the source is `from`).
fn tcp_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())?;
    s.connect(&to.into())?;
    Ok(s.into())
}

/// Defect 3: 300 idle TCP connections that never send a ClientHello took every TLS handshake
/// slot (legitimate TCP legs 0/20), and 8,192 TLS streams that never carried QUIC were never
/// reaped (RSS 8 → 108 MB, 8,204 fds). Now one source has 8 TLS handshakes in flight and 16
/// streams that carry nothing, and such a stream is dropped after the handshake timeout.
#[test]
fn tcp_legs_cannot_be_held_by_one_source() {
    let echo = TestServer::echo();
    let lab = Lab::new(&[("echo", echo.addr)], "");
    let tcp = lab.relay.tcp.expect("the relay listens on TCP");
    let pid = lab.relay.proc.pid();
    let fds_before = fd_count(pid);
    // 300 connections that never speak, from one source.
    let idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| tcp_from("127.0.0.2", tcp).ok())
        .collect();
    // TLS streams that never carry QUIC, from another.
    let rt = runtime();
    let tls = rt.block_on(async {
        use tunnel_shared::transport::{self, Identity};
        let id = Identity::new(tunnel_shared::identity::SecretKey::generate()).unwrap();
        let (cfg, _) =
            transport::client_tls_config(&id, transport::tcp::TCP_ALPN, Some(relay_fp(&lab)))
                .unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let mut ok = Vec::new();
        for _ in 0..64 {
            let Ok(s) = tcp_from("127.0.0.3", tcp) else {
                continue;
            };
            s.set_nonblocking(true).unwrap();
            let s = tokio::net::TcpStream::from_std(s).unwrap();
            let name = rustls::pki_types::ServerName::try_from("tunnel-device").unwrap();
            if let Ok(Ok(t)) =
                tokio::time::timeout(Duration::from_secs(5), connector.connect(name, s)).await
            {
                ok.push(t);
            }
        }
        ok
    });
    eprintln!(
        "TLS streams one source got: {}; idle TCP connections kept: {}",
        tls.len(),
        idle.len()
    );
    assert!(tls.len() <= 16, "{} TLS streams from one source", tls.len());
    // A real client's leg over TCP still works, from a third source (the test's own).
    let mut open = lab
        .client
        .open("cam", &["0:echo"], &["--relay-via", "tcp", "--no-punch"]);
    open.wait_path_is("relayed via", SOON);
    let mut s = TcpStream::connect(open.local("echo")).unwrap();
    s.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    // Streams that carry nothing go after the handshake timeout (10 s).
    let reaped = rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let t0 = Instant::now();
        for mut t in tls {
            let mut b = [0u8; 16];
            let r = tokio::time::timeout(Duration::from_secs(25), t.read(&mut b)).await;
            assert!(
                matches!(r, Ok(Ok(0) | Err(_))),
                "a TLS stream was kept: {r:?}"
            );
        }
        t0.elapsed()
    });
    eprintln!("idle TLS streams closed within {reaped:?}");
    drop(idle);
    wait_for("the relay's descriptors to come back", SOON, || {
        (fd_count(pid) <= fds_before + 8).then_some(())
    });
}

/// Defect 10: attaches for an unknown id and with a wrong key got different answers, never
/// counted as failures (160/160 from a rate-limited source, each logging a warning), and a
/// connect without a token said whether the device was online. Now both attaches get one
/// answer, every refusal counts, one warning a minute per id, and a stranger's connect is
/// `TOKEN_REJECTED` whether the device is attached or not.
#[test]
fn refusals_tell_a_stranger_nothing_and_all_count() {
    let lab = Lab::new(&[], "");
    let rt = runtime();
    let fp = relay_fp(&lab);
    let attach = |id: &str| {
        let id = id.to_string();
        rt.block_on(async {
            let (leg, answer) =
                hostile::relay_leg("127.0.0.2", lab.relay.addr, fp, move |_| LegHello::Attach {
                    version: PROTOCOL_VERSION,
                    device_id: id,
                    tokens: Vec::<TokenEntry>::new(),
                })
                .await;
            hostile::refusal(&leg, answer.as_ref())
        })
    };
    let squat = attach(&lab.device_id);
    let unknown = attach("no-such-device");
    assert_eq!(squat, Some(RelayCode::UNKNOWN_DEVICE));
    assert_eq!(unknown, squat, "an attach tells which ids are served");
    let mut codes = Vec::new();
    for _ in 0..12 {
        codes.push(attach(&lab.device_id));
    }
    assert!(
        codes.contains(&Some(RelayCode::RATE_LIMITED)),
        "attach refusals are not counted: {codes:?}"
    );
    let warnings = lab
        .relay
        .proc
        .log()
        .matches("not the one relay.toml has")
        .count();
    assert_eq!(
        warnings,
        1,
        "one warning per id and minute: {}",
        lab.relay.proc.log()
    );

    // A stranger's connect, from another source.
    let relay = lab.relay.addr;
    let wrong = Secret::new("guessed1234567");
    let online = connect(&rt, relay, fp, &lab.device_id, Some(&wrong));
    let unserved = connect(&rt, relay, fp, "no-such-device", None);
    assert_eq!(online, Some(RelayCode::TOKEN_REJECTED));
    assert_eq!(unserved, online, "a connect tells which ids are served");
    // The device goes away: a stranger hears the same as before, the token's holder the truth.
    let alice = Secret::new(lab.dev.token("alice"));
    let mut lab = lab;
    lab.device.proc.kill9();
    wait_for("the relay to see the device go", SOON, || {
        lab.relay
            .proc
            .log()
            .contains("device detached")
            .then_some(())
    });
    let offline = connect(&rt, relay, fp, &lab.device_id, Some(&wrong));
    assert_eq!(offline, online, "a stranger learns the device is offline");
    assert_eq!(
        connect(&rt, relay, fp, &lab.device_id, Some(&alice)),
        Some(RelayCode::DEVICE_OFFLINE)
    );
    // Every stranger's refusal counted: the source is limited (a burst of 10).
    let mut codes = Vec::new();
    for _ in 0..10 {
        codes.push(connect(&rt, relay, fp, "no-such-device", None));
    }
    assert!(
        codes.contains(&Some(RelayCode::RATE_LIMITED)),
        "connect refusals are not counted: {codes:?}"
    );
}

/// A stranger's `Connect` from 127.0.0.3: the relay's refusal, if any.
fn connect(
    rt: &tokio::runtime::Runtime,
    relay: SocketAddr,
    fp: Fingerprint,
    id: &str,
    token: Option<&Secret>,
) -> Option<RelayCode> {
    rt.block_on(async {
        let (leg, answer) =
            hostile::relay_leg("127.0.0.3", relay, fp, hostile::connect_hello(id, token)).await;
        hostile::refusal(&leg, answer.as_ref())
    })
}

/// Defect 8: the device probed whatever candidates a relayed peer named, a Guest's (who may not
/// even tunnel remotely) included, and every token holder learned the device's LAN and public
/// addresses from the relay. Now candidates go end to end, and only to a user who may tunnel.
#[test]
fn a_guest_gets_no_direct_path_and_no_device_address() {
    let echo = TestServer::echo();
    let lab = Lab::new(&[("echo", echo.addr)], "");
    let token = guest(&lab);
    let g = lab.world.client("guest");
    g.pin_relayed(
        "cam",
        &lab.device,
        &lab.device_id,
        (&lab.relay.addr.to_string(), &lab.relay.fingerprint),
        &[],
        Some(token.expose()),
    );
    let mut open = g.open("cam", &["0:echo"], &[]);
    assert!(open.wait_path().starts_with("relayed via"));
    wait_for("the device to refuse the guest's punch", SOON, || {
        lab.device
            .proc
            .log()
            .contains("a relayed connection that may not tunnel asked to punch")
            .then_some(())
    });
    let log = lab.device.proc.log();
    assert!(!log.contains("asked for a direct path: probing"), "{log}");
    assert!(!log.contains("direct path punched"), "{log}");
    // The owner, who may tunnel, gets a direct path (on loopback: the relay is here too).
    let mut owner = lab.client.open("cam", &["0:echo"], &[]);
    owner.wait_path_is("direct (punched)", SOON);
}
