//! Integrity and concurrency: large transfers, many parallel connections, half-close, a reader
//! that stops reading.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use tunnel_testkit::SOON;
use tunnel_testkit::servers::{Pattern, TestServer, hash_reader, send_and_hash};

use crate::setup;

const MIB: u64 = 1024 * 1024;

#[test]
fn large_transfers_both_directions_are_byte_exact() {
    const LEN: u64 = 256 * MIB;
    let sink = TestServer::hasher();
    let source = TestServer::source(LEN, 7);
    let s = setup(&[("sink", sink.addr), ("source", source.addr)]);
    let open = s.client.open("cam", &["0:sink", "0:source"], &[]);

    let up = Pattern::new(3);
    let (n, hex) = send_and_hash(open.local("sink"), &up, LEN).unwrap();
    assert_eq!((n, hex), (LEN, up.sha256(LEN)), "upload corrupted");

    let mut down = TcpStream::connect(open.local("source")).unwrap();
    let got = hash_reader(&mut down).unwrap();
    assert_eq!(
        got,
        (LEN, Pattern::new(7).sha256(LEN)),
        "download corrupted"
    );
}

#[test]
fn two_hundred_concurrent_connections_each_hash_checked() {
    const N: usize = 200;
    const LEN: u64 = 256 * 1024;
    let sink = TestServer::hasher();
    let s = setup(&[("sink", sink.addr)]);
    let open = s.client.open("cam", &["0:sink"], &[]);
    let local = open.local("sink");
    // All connections are established before any of them finishes.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(N));
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let pattern = Pattern::new(1000 + i as u64);
                let mut conn = TcpStream::connect(local).unwrap();
                conn.write_all(b"x").unwrap();
                barrier.wait();
                let mut reader = conn.try_clone().unwrap();
                let reply = std::thread::spawn(move || {
                    let mut out = String::new();
                    reader.read_to_string(&mut out).map(|_| out)
                });
                let mut data = Vec::new();
                pattern.write_to(&mut data, LEN).unwrap();
                conn.write_all(&data).unwrap();
                conn.shutdown(Shutdown::Write).unwrap();
                let reply = reply.join().unwrap().unwrap();
                let mut expected = vec![b'x'];
                expected.extend_from_slice(&data);
                let mut h = tunnel_testkit::servers::HashWriter::default();
                h.write_all(&expected).unwrap();
                assert_eq!(
                    reply.trim(),
                    format!("{} {}", LEN + 1, h.hex()),
                    "connection {i}"
                );
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let outcomes = sink.record.wait_outcomes(N, SOON);
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
}

#[test]
fn half_close_in_both_directions() {
    let sink = TestServer::hasher();
    let source = TestServer::source(3 * MIB, 11);
    let s = setup(&[("sink", sink.addr), ("source", source.addr)]);
    let open = s.client.open("cam", &["0:sink", "0:source"], &[]);

    // Client half-closes first: the server sees EOF and can still answer.
    let pattern = Pattern::new(5);
    let reply = send_and_hash(open.local("sink"), &pattern, 100_000).unwrap();
    assert_eq!(reply, (100_000, pattern.sha256(100_000)));

    // Server half-closes first: we see EOF after all data, and can still send afterwards.
    let mut conn = TcpStream::connect(open.local("source")).unwrap();
    let got = hash_reader(&mut conn).unwrap();
    assert_eq!(got, (3 * MIB, Pattern::new(11).sha256(3 * MIB)));
    conn.write_all(b"after eof").unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    let outcomes = source.record.wait_outcomes(1, SOON);
    assert!(outcomes[0].is_ok(), "{outcomes:?}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_stalled_reader_does_not_stall_other_streams_and_memory_stays_bounded() {
    let sink = TestServer::hasher();
    let source = TestServer::source(4096 * MIB, 13);
    let s = setup(&[("sink", sink.addr), ("source", source.addr)]);
    let open = s.client.open("cam", &["0:sink", "0:source"], &[]);

    // Open a download and never read it: flow control must stop the source.
    let stalled = TcpStream::connect(open.local("source")).unwrap();
    // Give the pipeline time to fill every buffer it is allowed to fill.
    let mut last = (0, 0);
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        last = (rss_kib(s.device.proc.pid()), rss_kib(open.proc.pid()));
    }
    // Meanwhile another stream on the same connection works at full speed.
    let pattern = Pattern::new(21);
    let reply = send_and_hash(open.local("sink"), &pattern, 64 * MIB).unwrap();
    assert_eq!(reply, (64 * MIB, pattern.sha256(64 * MIB)));
    let (dev_rss, cli_rss) = (
        rss_kib(s.device.proc.pid()).max(last.0),
        rss_kib(open.proc.pid()).max(last.1),
    );
    // One stream window (8 MiB) plus socket buffers, not gigabytes.
    assert!(dev_rss < 150 * 1024, "device RSS {dev_rss} KiB");
    assert!(cli_rss < 150 * 1024, "client RSS {cli_rss} KiB");
    // The source is blocked, not finished.
    assert!(source.record.wait_outcomes(0, SOON).is_empty());
    drop(stalled);
}
