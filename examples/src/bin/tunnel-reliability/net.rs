//! Network classes: faults between two homes behind NAT (network namespaces, nft, tc), delay,
//! jitter, reordering, duplication and a source-port change through the impairment relay, and
//! tampering with one byte on the wire.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tunnel_testkit::impair::{Impairment, Relay, Way};
use tunnel_testkit::natlab::{self, Fetch, NatLab};
use tunnel_testkit::servers::{Pattern, TestServer};

use crate::lab::{Lab, download};
use crate::report::{Section, secs};
use crate::{Mode, poll};

/// Loss, a rate limit, a link going down and up, and a NAT whose UDP mappings expire after 2 s,
/// between a device and a client in two homes behind NAT routers (the device's router forwards
/// its UDP port). Every download is SHA-256 checked.
pub(crate) fn faults(mode: &Mode) -> Section {
    let mut s = Section::new(
        "Network faults between two NATs",
        "every transfer is byte-exact; at 5 % loss within 3× the clean time; an idle connection \
         survives a 2 s NAT timeout (keep-alive) and a 3 s link outage without reconnecting",
        &["condition", "seconds", "× clean", "SHA-256"],
    );
    if let Some(tool) = natlab::missing_tool() {
        s.check(
            false,
            format!("{tool} is missing (bash bench/reliability.sh installs it)"),
        );
        return s;
    }
    let len = mode.transfer();
    let mut lab = NatLab::new(len, mode.seed, &[5592]);
    let url = lab.add_tunnel("dev", 5592, "[transport]\nkeep_alive_secs = 1\n");
    let open = lab.open(0);
    let mut clean = f64::NAN;
    let mut record = |s: &mut Section, label: &str, got: &Fetch| {
        if label == "clean" {
            clean = got.secs;
        }
        s.row(vec![
            label.into(),
            format!("{:.2}", got.secs),
            format!("{:.1}", got.secs / clean),
            got.error.clone().unwrap_or_else(|| "ok".into()),
        ]);
        s.check(
            got.error.is_none(),
            format!("{label}: {}", got.error.as_deref().unwrap_or("")),
        );
        got.secs / clean
    };
    // A first download warms up the HTTP server, the page cache and the connection; not counted.
    let _ = lab.fetch(&url, 300);
    record(&mut s, "clean", &lab.fetch(&url, 300));
    for loss in [1, 5, 20] {
        lab.homes.set_loss(loss);
        let ratio = record(
            &mut s,
            &format!("{loss} % loss each way"),
            &lab.fetch(&url, 300),
        );
        if loss == 5 {
            s.check(
                ratio <= 3.0,
                format!("5 % loss took {ratio:.1}× the clean time"),
            );
        }
    }
    lab.homes.set_loss(0);
    lab.homes.set_rate(50);
    let got = lab.fetch(&url, 300);
    record(&mut s, "50 Mbit/s each way (tc tbf)", &got);
    let ideal = len as f64 * 8.0 / 50e6;
    s.note(format!(
        "At 50 Mbit/s the transfer cannot take less than {ideal:.2} s; it took {:.2} s ({:.0} % of \
         the link).",
        got.secs,
        100.0 * ideal / got.secs
    ));

    // A 3 s outage in the middle of a transfer (still at 50 Mbit/s, so the transfer lasts).
    let reconnects = || open.proc.log().matches("connected").count();
    let before = reconnects();
    let child = lab.start_fetch(&url, 300);
    let started = poll(Duration::from_secs(30), || {
        (lab.fetched() > len / 4).then_some(())
    });
    s.check(
        started.is_some(),
        "the download before the outage did not start",
    );
    lab.homes.set_link(false);
    std::thread::sleep(Duration::from_secs(3));
    lab.homes.set_link(true);
    record(
        &mut s,
        "50 Mbit/s, link down 3 s at 1/4",
        &lab.finish_fetch(child),
    );
    s.check(
        reconnects() == before,
        "the link outage broke the connection",
    );
    lab.homes.set_rate(0);

    // NAT mappings that expire after 2 s of silence: keep-alive (1 s) holds them.
    lab.homes.set_udp_timeout(2);
    std::thread::sleep(Duration::from_secs(8));
    record(
        &mut s,
        "after 8 s idle, NAT UDP timeout 2 s",
        &lab.fetch(&url, 300),
    );
    s.check(
        reconnects() == before,
        "the connection did not survive the NAT timeout",
    );
    s.headline = format!(
        "{} transfers byte-exact; 20 % loss {}× the clean time",
        s.table.len() - 1,
        s.table.get(4).map_or("-", |r| r[2].as_str())
    );
    s
}

/// A runtime for the relay (it lives in this process).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Delay, jitter, loss, duplication and reordering from the seeded impairment relay, then the
/// client's source port changing mid-transfer (as a NAT rebinding): byte-exact, no reconnect.
pub(crate) fn impaired(mode: &Mode) -> Section {
    let mut s = Section::new(
        "Delay, reordering, duplication, source-port change",
        "byte-exact through a seeded relay adding delay, jitter, 1 % loss, 2 % duplicates and 5 % \
         reordering; a change of the client's source port mid-transfer keeps the connection",
        &[
            "condition",
            "seconds",
            "Mbit/s",
            "relay: forwarded / dropped / duplicated / reordered",
            "SHA-256",
        ],
    );
    let len = mode.transfer() / 2;
    let source = TestServer::source(len, mode.seed);
    let want = Pattern::new(mode.seed).sha256(len);
    let lab = Lab::new(&[("src", source.addr)], "");
    let rt = runtime();
    let impairment = Impairment {
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(3),
        loss: 0.01,
        duplicate: 0.02,
        reorder: 0.05,
        reorder_by: Duration::from_millis(8),
        max_datagram: 1472,
        seed: mode.seed,
    };
    let relay = rt
        .block_on(Relay::start(lab.device.addr, impairment))
        .expect("relay");
    lab.client
        .pin_raw("viarelay", &relay.addr.to_string(), &lab.device.fingerprint);
    let open = lab.client.open("viarelay", &["0:src"], &[]);
    let local = open.local("src");
    let counters = |r: &Relay| {
        let c = &r.control;
        format!(
            "{} / {} / {} / {}",
            c.forwarded.load(Ordering::Relaxed),
            c.dropped.load(Ordering::Relaxed),
            c.duplicated.load(Ordering::Relaxed),
            c.reordered.load(Ordering::Relaxed)
        )
    };
    let got = download(local, |_| {});
    let mbit = |b: u64, t: Duration| format!("{:.0}", b as f64 * 8.0 / t.as_secs_f64() / 1e6);
    s.row(vec![
        "delay 5 ms + jitter 3 ms, 1 % loss, 2 % dup, 5 % reorder".into(),
        secs(got.took),
        mbit(got.bytes, got.took),
        counters(&relay),
        if got.sha256 == want {
            "ok".into()
        } else {
            "MISMATCH".into()
        },
    ]);
    s.check(
        got.sha256 == want && got.error.is_none(),
        "the impaired download differs",
    );

    let connects = || lab.device.proc.log().matches("client connected").count();
    let before = connects();
    let rebound = AtomicBool::new(false);
    let got = download(local, |n| {
        if n > len / 3 && !rebound.swap(true, Ordering::Relaxed) {
            rt.block_on(relay.rebind()).expect("rebind");
        }
    });
    s.row(vec![
        "the same, client source port changed at 1/3".into(),
        secs(got.took),
        mbit(got.bytes, got.took),
        counters(&relay),
        if got.sha256 == want {
            "ok".into()
        } else {
            "MISMATCH".into()
        },
    ]);
    s.check(
        got.sha256 == want && got.error.is_none(),
        "the download across the port change differs",
    );
    s.check(
        connects() == before,
        "the source-port change cost a reconnect",
    );
    s.headline = format!(
        "{} downloads byte-exact, port change without reconnect",
        s.table.len() - 1
    );
    s
}

/// One byte flipped in a datagram after the handshake, at many offsets, both ways: the tunnel must
/// never deliver a corrupted byte. QUIC discards a datagram that fails authentication and sends it
/// again, so a flip costs a retransmission; a transfer ends either byte-exact or with an error.
pub(crate) fn tamper(mode: &Mode) -> Section {
    let mut s = Section::new(
        "Tamper on the wire",
        "no flipped byte ever reaches the application: each transfer is byte-exact or fails",
        &["flips", "byte-exact", "ended in an error", "corrupted"],
    );
    let len: u64 = 256 * 1024;
    let source = TestServer::source(len, mode.seed);
    let want = Pattern::new(mode.seed).sha256(len);
    let lab = Lab::new(&[("src", source.addr)], "");
    let rt = runtime();
    let relay = Arc::new(
        rt.block_on(Relay::start(lab.device.addr, Impairment::none()))
            .expect("relay"),
    );
    lab.client
        .pin_raw("viarelay", &relay.addr.to_string(), &lab.device.fingerprint);
    let open = lab.client.open("viarelay", &["0:src"], &[]);
    let local = open.local("src");
    let flips = if mode.quick { 60 } else { 600 };
    let (mut exact, mut failed, mut corrupted) = (0, 0, 0);
    for i in 0..flips {
        let armed = AtomicBool::new(false);
        let way = if i % 2 == 0 { Way::Down } else { Way::Up };
        let offset = (i * 23) % 1400;
        let got = download(local, |n| {
            if n > 32 * 1024 && !armed.swap(true, Ordering::Relaxed) {
                relay.control.tamper_next(way, offset);
            }
        });
        match (got.error, got.sha256 == want) {
            (None, true) => exact += 1,
            (Some(_), _) => failed += 1,
            (None, false) => corrupted += 1,
        }
    }
    s.row(vec![
        format!("{} ({} applied)", flips, relay.control.tampered()),
        exact.to_string(),
        failed.to_string(),
        corrupted.to_string(),
    ]);
    s.check(
        corrupted == 0,
        format!("{corrupted} transfers delivered corrupted data"),
    );
    s.note(
        "Offsets cycle through the first 1400 bytes of a datagram (header, packet number, \
         payload, tag), downstream and upstream alternately.",
    );
    s.headline = format!("{flips} flips, {corrupted} corrupted bytes delivered");
    s
}
