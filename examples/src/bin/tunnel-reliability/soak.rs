//! Soak: many connect/transfer/disconnect cycles and unclean client deaths, with the device's
//! file descriptors and memory watched, and a connection left idle past the idle timeout.

use std::process::Command;
use std::time::{Duration, Instant};

use tunnel_shared::client::{ConnectOptions, KnownDevice, Target, connect_to};
use tunnel_shared::identity;
use tunnel_shared::transport::{self, Identity};
use tunnel_shared::wire;
use tunnel_testkit::process::{fd_count, rss_kib};
use tunnel_testkit::servers::TestServer;

use crate::lab::Lab;
use crate::report::{Section, mib};
use crate::{Mode, poll};

/// One cycle: connect as the owner, echo 64 KiB through a tunnel, close.
async fn cycle(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    device: &KnownDevice,
) -> Result<(), String> {
    let opts = ConnectOptions {
        timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    };
    let session = connect_to(endpoint, identity, &Target::from(device), &opts)
        .await
        .map_err(|e| e.to_string())?;
    let header = wire::tunnel_header("echo").map_err(|e| e.to_string())?;
    let (mut send, mut recv) = wire::open_tunnel(&session.conn, header)
        .await
        .map_err(|e| e.to_string())?;
    let data = vec![0x5a; 64 * 1024];
    send.write_all(&data).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let back = recv
        .read_to_end(128 * 1024)
        .await
        .map_err(|e| e.to_string())?;
    session.close();
    if back == data {
        Ok(())
    } else {
        Err(format!("echoed {} bytes, not the 65536 sent", back.len()))
    }
}

/// Connect/transfer/disconnect cycles, unclean client deaths, and an idle connection.
pub(crate) fn soak(mode: &Mode) -> Section {
    let mut s = Section::new(
        "Soak",
        "through many connect/transfer/disconnect cycles and kill -9 of clients, sampled after \
         each batch, the device's file descriptors and RSS stay within 10 % of the warmed-up \
         baseline; a connection idle past the idle timeout is still usable",
        &["phase", "cycles", "device fds", "device RSS (MiB)"],
    );
    let echo = TestServer::echo();
    // Windows of 1 MiB: a dead client legitimately pins up to a window of unacknowledged data
    // until the idle timeout, and glibc keeps the freed heap; with the default 16 MiB that alone
    // moves RSS by more than the 10 % this class looks for.
    let lab = Lab::new(
        &[("echo", echo.addr)],
        "[transport]\nidle_timeout_secs = 2\nkeep_alive_secs = 1\nstream_window = 1048576\n\
         connection_window = 1048576\n",
    );
    let pid = lab.device.proc.pid();
    let key = identity::load_key(&lab.client.home.join("client.key")).expect("client key");
    let identity = Identity::new(key).expect("identity");
    let device = lab
        .client
        .ok(&["devices", "--json"])
        .parse::<serde_json::Value>()
        .ok()
        .and_then(|v| {
            let d = &v[0];
            Some(KnownDevice {
                name: "dev".into(),
                fingerprint: d["fingerprint"].as_str()?.parse().ok()?,
                addresses: vec![d["addresses"][0].as_str()?.parse().ok()?],
                device_id: None,
                user: None,
                sct: None,
                relays: Vec::new(),
            })
        })
        .expect("the pinned device");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let endpoint = rt
        .block_on(async {
            transport::client_endpoint(&tunnel_shared::config::TransportSettings::default())
        })
        .expect("endpoint");
    let mut failures = 0;
    let run = |n: usize, failures: &mut usize| {
        for _ in 0..n {
            if rt.block_on(cycle(&endpoint, &identity, &device)).is_err() {
                *failures += 1;
            }
        }
    };
    // Clients killed with SIGKILL in the middle of a transfer, one at a time: the device holds
    // what a dead client had in flight (up to its send window) until it notices, at the idle
    // timeout, and the next kill waits for that.
    let disconnects = || lab.device.proc.log().matches("client disconnected").count();
    let kill_clients = |n: usize| {
        for _ in 0..n {
            let before = disconnects();
            let mut open = lab.open(&["0:echo"]);
            let local = open.local("echo");
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                if let Ok(mut c) = std::net::TcpStream::connect(local) {
                    let buf = vec![7u8; 64 * 1024];
                    while c.write_all(&buf).is_ok() {}
                }
            });
            std::thread::sleep(Duration::from_millis(200));
            open.proc.kill9();
            let _ = writer.join();
            poll(Duration::from_secs(20), || {
                (disconnects() > before).then_some(())
            });
        }
    };
    // Warm-up: the allocator reaches the high-water mark of cycles and of one dead client's
    // buffers; what must stay flat is what many more of them add.
    run(100, &mut failures);
    kill_clients(3);
    run(100, &mut failures);
    let settle = |base_fd: usize| {
        poll(Duration::from_secs(20), || {
            (fd_count(pid) <= base_fd + base_fd / 10).then_some(())
        })
    };
    let (fd0, rss0) = (fd_count(pid), rss_kib(pid));
    s.row(vec![
        "warmed up (200 cycles, 3 clients killed)".into(),
        "200".into(),
        fd0.to_string(),
        mib(rss0),
    ]);
    // RSS and fds after each batch of cycles or kills.
    let mut samples: Vec<(usize, u64)> = Vec::new();
    let sample = |samples: &mut Vec<(usize, u64)>| {
        settle(fd0);
        samples.push((fd_count(pid), rss_kib(pid)));
    };
    let batches = 5;
    let cycles = if mode.quick { 60 } else { 200 };
    let mut total = 0;
    match mode.hours {
        Some(h) => {
            let until = Instant::now() + Duration::from_secs_f64(h * 3600.0);
            while Instant::now() < until {
                run(cycles, &mut failures);
                total += cycles;
                sample(&mut samples);
            }
        }
        None => {
            for _ in 0..batches {
                run(cycles, &mut failures);
                total += cycles;
                sample(&mut samples);
            }
        }
    }
    let range = |v: &[(usize, u64)]| {
        let rss: Vec<u64> = v.iter().map(|x| x.1).collect();
        let fds: Vec<usize> = v.iter().map(|x| x.0).collect();
        (
            format!(
                "{}–{}",
                fds.iter().min().unwrap_or(&0),
                fds.iter().max().unwrap_or(&0)
            ),
            format!(
                "{}–{} (last {})",
                mib(*rss.iter().min().unwrap_or(&0)),
                mib(*rss.iter().max().unwrap_or(&0)),
                mib(*rss.last().unwrap_or(&0))
            ),
        )
    };
    let (fds, rss) = range(&samples);
    s.row(vec![
        format!("connect, echo 64 KiB, close ({} batches)", samples.len()),
        total.to_string(),
        fds,
        rss,
    ]);
    s.check(failures == 0, format!("{failures} cycles failed"));
    let kills = if mode.quick { 10 } else { 50 };
    let first_kill = samples.len();
    for _ in 0..batches {
        kill_clients(kills / batches);
        sample(&mut samples);
    }
    let (fds, rss) = range(&samples[first_kill..]);
    s.row(vec![
        format!("clients killed with SIGKILL mid-transfer ({kills}, {batches} batches)"),
        "-".into(),
        fds,
        rss,
    ]);
    // Flat: no sample above the baseline by more than 10 % (fds: and one), and the last one
    // within 10 % of the baseline either way.
    let max_fd = samples.iter().map(|x| x.0).max().unwrap_or(0);
    let max_rss = samples.iter().map(|x| x.1).max().unwrap_or(0);
    let last_rss = samples.last().map_or(0, |x| x.1);
    s.check(
        max_fd <= fd0 + fd0 / 10 + 1,
        format!("fds {fd0} → up to {max_fd}"),
    );
    s.check(
        max_rss as f64 <= rss0 as f64 * 1.1,
        format!("RSS {} → up to {} MiB", mib(rss0), mib(max_rss)),
    );
    s.check(
        (last_rss as f64 - rss0 as f64).abs() <= rss0 as f64 * 0.1,
        format!("RSS {} → {} MiB at the end", mib(rss0), mib(last_rss)),
    );

    // Idle past the idle timeout: keep-alives hold the connection.
    let open = lab.open(&["0:echo"]);
    let idle = Duration::from_secs(12);
    std::thread::sleep(idle);
    let echoed = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(open.local("echo")).expect("connect");
        let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
        c.write_all(b"still there").is_ok() && {
            let mut b = [0u8; 11];
            c.read_exact(&mut b).is_ok() && &b == b"still there"
        }
    };
    let reconnected = open.proc.log().contains("lost the connection");
    s.row(vec![
        format!("idle {} s (idle timeout 2 s), then used", idle.as_secs()),
        "-".into(),
        "-".into(),
        format!(
            "{}{}",
            if echoed { "echoed" } else { "FAILED" },
            if reconnected {
                ", after a reconnect"
            } else {
                ", same connection"
            }
        ),
    ]);
    s.check(
        echoed && !reconnected,
        "the idle connection was not usable as it was",
    );
    s.headline = format!(
        "{total} cycles, {kills} kills: fds {fd0} → at most {max_fd}, RSS {} → at most {} MiB",
        mib(rss0),
        mib(max_rss)
    );
    s
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The current time, UTC, to the minute.
pub(crate) fn now_utc() -> String {
    sh("date -u +%Y-%m-%dT%H:%MZ")
}

/// The commit being tested.
pub(crate) fn git_commit() -> String {
    sh("git rev-parse --short HEAD 2>/dev/null || echo unknown")
}

/// The kernel release.
pub(crate) fn kernel() -> String {
    sh("uname -r")
}
