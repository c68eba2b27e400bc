//! Hostile peers: a pre-authentication flood while the owner transfers, and slowloris (stalled
//! handshakes, idle unpaired connections, a local reader that never reads).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tunnel_shared::client::{ConnectError, ConnectOptions, Target, connect_to};
use tunnel_shared::config::{Host, HostPort, TransportSettings};
use tunnel_shared::identity::{Fingerprint, SecretKey};
use tunnel_shared::proto::CloseCode;
use tunnel_shared::transport::{self, Identity};
use tunnel_testkit::hostile;
use tunnel_testkit::process::{peak_kib, reset_peak, rss_kib};
use tunnel_testkit::servers::{Pattern, TestServer};

use crate::lab::{Lab, download};
use crate::report::{Section, mib, secs};
use crate::{Mode, poll};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A connection attempt with a fresh random key from `from` (an IP address).
async fn stranger(
    device: SocketAddr,
    pin: Fingerprint,
    from: &str,
) -> Result<tunnel_shared::client::Session, ConnectError> {
    let settings = TransportSettings::default();
    let endpoint =
        transport::client_endpoint_on(format!("{from}:0").parse().expect("addr"), &settings)
            .expect("endpoint");
    let identity = Identity::new(SecretKey::generate()).expect("identity");
    let addrs = [HostPort {
        host: Host::Ip(device.ip()),
        port: device.port(),
    }];
    let target = Target {
        name: "dev",
        addresses: &addrs,
        pin: Some(pin),
        sct: None,
        relays: &[],
        device_id: None,
    };
    let opts = ConnectOptions {
        timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    };
    connect_to(&endpoint, &identity, &target, &opts).await
}

/// Garbage datagrams, ClientHello-only Initials and complete handshakes with random keys, all from
/// 127.0.0.2, while the owner downloads from 127.0.0.1 and a new owner connection is made.
pub(crate) fn flood(mode: &Mode) -> Section {
    let mut s = Section::new(
        "Pre-authentication flood",
        "while garbage, ClientHello-only Initials and handshakes with random keys arrive, the \
         owner connects and its transfers stay byte-exact; device memory stays bounded",
        &[
            "phase",
            "download (s)",
            "Mbit/s",
            "owner connects (s)",
            "device RSS (MiB)",
        ],
    );
    let len = mode.transfer();
    let source = TestServer::source(len, mode.seed);
    let want = Pattern::new(mode.seed).sha256(len);
    let lab = Lab::new(
        &[("src", source.addr)],
        "[limits]\nhandshake_timeout_secs = 5\n",
    );
    let open = lab.open(&["0:src"]);
    let local = open.local("src");
    let pid = lab.device.proc.pid();
    let owner_connects = || {
        let t0 = Instant::now();
        let out = lab.client.cmd(&["services", "dev"]);
        (out.status.success(), t0.elapsed())
    };
    // Downloads back to back for `window`: bytes per second over all of them, every one checked.
    let window = Duration::from_secs(if mode.quick { 5 } else { 20 });
    let sustained = || {
        let t0 = Instant::now();
        let (mut bytes, mut n, mut bad) = (0u64, 0u32, 0u32);
        while t0.elapsed() < window {
            let got = download(local, |_| {});
            bytes += got.bytes;
            n += 1;
            if got.sha256 != want || got.error.is_some() {
                bad += 1;
            }
        }
        (bytes, t0.elapsed(), n, bad)
    };
    let _warm = download(local, |_| {});
    let (bytes, took, n, bad) = sustained();
    let (ok, t_conn) = owner_connects();
    s.check(ok, "the owner could not connect before the flood");
    let base_rss = rss_kib(pid);
    let mbit = |b: u64, t: Duration| b as f64 * 8.0 / t.as_secs_f64() / 1e6;
    let base = mbit(bytes, took);
    s.row(vec![
        format!("without flood ({n} downloads)"),
        secs(took),
        format!("{base:.0}"),
        secs(t_conn),
        mib(base_rss),
    ]);
    s.check(
        bad == 0,
        format!("{bad} of {n} downloads before the flood differ"),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (garbage, initials, handshakes, completed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let device = lab.device.addr;
    let pin: Fingerprint = lab.device.fingerprint.parse().expect("fingerprint");
    let mut threads = Vec::new();
    {
        let (stop, garbage) = (stop.clone(), garbage.clone());
        let seed = mode.seed;
        threads.push(std::thread::spawn(move || {
            let sock = std::net::UdpSocket::bind("127.0.0.2:0").expect("bind");
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                for d in hostile::garbage(500, seed + k) {
                    let _ = sock.send_to(&d, device);
                }
                garbage.fetch_add(500, Ordering::Relaxed);
                k += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
    }
    {
        let (stop, initials) = (stop.clone(), initials.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                hostile::send_all(
                    "127.0.0.2:0",
                    device,
                    &hostile::initial_packets(device, 100),
                );
                initials.fetch_add(100, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
    }
    let rt = runtime();
    for _ in 0..4 {
        let (stop, handshakes, completed) = (stop.clone(), handshakes.clone(), completed.clone());
        rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // A completed handshake ends in a refusal of the unknown key.
                let r = stranger(device, pin, "127.0.0.3").await;
                handshakes.fetch_add(1, Ordering::Relaxed);
                if matches!(r, Err(ConnectError::Refused { code, .. }) if code == CloseCode::UNKNOWN_KEY)
                {
                    completed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    reset_peak(pid);
    std::thread::sleep(Duration::from_secs(1));
    let t_flood = Instant::now();
    let (bytes, took, n, bad) = sustained();
    let (ok, t_conn) = owner_connects();
    let during = mbit(bytes, took);
    let peak = peak_kib(pid);
    s.row(vec![
        format!("during the flood ({n} downloads)"),
        secs(took),
        format!("{during:.0}"),
        secs(t_conn),
        format!("{} (peak)", mib(peak)),
    ]);
    s.check(ok, "the owner could not connect during the flood");
    s.check(
        bad == 0,
        format!("{bad} of {n} downloads during the flood differ"),
    );
    let flood_secs = t_flood.elapsed().as_secs_f64() + 1.0;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    drop(rt);
    // Handshakes in flight time out (5 s here), then memory goes back.
    let after = poll(Duration::from_secs(30), || {
        let r = rss_kib(pid);
        (r <= base_rss + base_rss / 10).then_some(r)
    })
    .unwrap_or_else(|| rss_kib(pid));
    s.row(vec![
        "after".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        mib(after),
    ]);
    let ratio = during / base;
    s.check(
        ratio >= 0.25,
        format!("throughput during the flood fell to {ratio:.2}× "),
    );
    s.check(
        peak < 256 * 1024,
        format!("device peak RSS {} MiB", mib(peak)),
    );
    let rate = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64 / flood_secs;
    s.note(format!(
        "Flood: {:.0} garbage datagrams/s and {:.0} ClientHello-only Initials/s from 127.0.0.2, \
         {:.0} handshakes/s with random keys from 127.0.0.3 ({:.0}/s completed and refused as an \
         unknown key), on the same 2 cores as the device, the client and the downloads.",
        rate(&garbage),
        rate(&initials),
        rate(&handshakes),
        rate(&completed)
    ));
    s.note(format!(
        "Device RSS {} MiB before, {} MiB peak during, {} MiB after.",
        mib(base_rss),
        mib(peak),
        mib(after)
    ));
    s.headline = format!(
        "throughput during the flood {ratio:.2}× without; owner connected in {}",
        secs(t_conn)
    );
    s
}

/// Stalled handshakes, idle unpaired connections, and a local reader that never reads: all
/// reaped or bounded, other tunnels unaffected.
pub(crate) fn slowloris(mode: &Mode) -> Section {
    let mut s = Section::new(
        "Slowloris",
        "stalled handshakes and idle unpaired connections are capped and reaped; a reader that \
         never reads holds a bounded amount of device memory; other tunnels are unaffected",
        &["attack", "what was measured", "result"],
    );
    let len = mode.transfer() / 4;
    let source = TestServer::source(len, mode.seed);
    let endless = TestServer::source(1 << 40, mode.seed + 1);
    let want = Pattern::new(mode.seed).sha256(len);
    let lab = Lab::new(
        &[("src", source.addr), ("endless", endless.addr)],
        "[limits]\nunpaired_timeout_secs = 10\nhandshake_timeout_secs = 3\n",
    );
    // Through the running device, so it is in force before the first stranger arrives.
    lab.client.ok(&["pairing", "dev", "enable", "local-open"]);
    let open = lab.open(&["0:src", "0:endless"]);
    let pid = lab.device.proc.pid();
    let device = lab.device.addr;
    let pin: Fingerprint = lab.device.fingerprint.parse().expect("fingerprint");

    // 1. Handshakes that never complete.
    hostile::send_all(
        "127.0.0.2:0",
        device,
        &hostile::initial_packets(device, 300),
    );
    let t0 = Instant::now();
    let ok = lab.client.cmd(&["services", "dev"]).status.success();
    s.row(vec![
        "300 ClientHello-only Initials".into(),
        "the owner connects right after".into(),
        format!(
            "{} in {}",
            if ok { "yes" } else { "NO" },
            secs(t0.elapsed())
        ),
    ]);
    s.check(ok, "the owner could not connect after stalled handshakes");

    // 2. Unpaired keys that connect and wait.
    let rt = runtime();
    let results: Vec<_> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..20 {
            v.push(stranger(device, pin, "127.0.0.1").await);
        }
        v
    });
    let admitted: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let busy = results
        .iter()
        .filter(
            |r| matches!(r, Err(ConnectError::Refused { code, .. }) if *code == CloseCode::BUSY),
        )
        .count();
    s.row(vec![
        "20 unpaired keys connect and wait".into(),
        "admitted / refused as busy".into(),
        format!("{} / {busy}", admitted.len()),
    ]);
    s.check(
        admitted.len() == 16 && busy == 4,
        "the unpaired cap (16) did not hold",
    );
    let t0 = Instant::now();
    let reaped = rt.block_on(async {
        let mut n = 0;
        for c in &admitted {
            if tokio::time::timeout(Duration::from_secs(30), c.conn.closed())
                .await
                .is_ok()
            {
                n += 1;
            }
        }
        n
    });
    s.row(vec![
        "the same, after unpaired_timeout_secs = 10".into(),
        "closed by the device".into(),
        format!("{reaped} of {} in {}", admitted.len(), secs(t0.elapsed())),
    ]);
    s.check(
        reaped == admitted.len(),
        "idle unpaired connections were not reaped",
    );
    let again = rt.block_on(stranger(device, pin, "127.0.0.1")).is_ok();
    s.check(
        again,
        "a new unpaired key was refused after the others were reaped",
    );

    // 3. A local application that never reads what the service sends.
    let base = rss_kib(pid);
    let stuck = std::net::TcpStream::connect(open.local("endless")).expect("connect");
    std::thread::sleep(Duration::from_secs(3));
    let got = download(open.local("src"), |_| {});
    let held = rss_kib(pid);
    s.row(vec![
        "a local reader that never reads an endless service".into(),
        "device RSS growth; another tunnel's download".into(),
        format!(
            "+{} MiB; {} MiB in {} s, {}",
            mib(held.saturating_sub(base)),
            len >> 20,
            secs(got.took),
            if got.sha256 == want {
                "byte-exact"
            } else {
                "MISMATCH"
            }
        ),
    ]);
    s.check(got.sha256 == want, "the other tunnel's download differs");
    s.check(
        held.saturating_sub(base) < 64 * 1024,
        "a stalled reader grew device memory by 64 MiB or more",
    );
    drop(stuck);
    s.headline = format!(
        "unpaired cap 16 held, {reaped} reaped; stalled reader +{} MiB",
        mib(held.saturating_sub(base))
    );
    s
}
