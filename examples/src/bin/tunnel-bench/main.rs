//! `tunnel-bench`: measures the tunnel against raw TCP, socat and `ssh -L` in one interleaved run
//! (A B C … A B C …, so machine drift cancels out) and writes `docs/BENCHMARKS.md`.
//!
//! `bash bench/run.sh` installs the tools and runs it on release binaries;
//! `tunnel-bench --quick` (under two minutes, used by CI) proves the harness works and asserts
//! nothing about speed.
//!
//! What it runs, all on loopback:
//! - iperf3 single stream, both directions, through each path; 8 parallel streams through the
//!   tunnel and through `ssh -L`;
//! - CPU seconds of each end of the tunnel and of ssh/sshd per run (`/proc/PID/stat`);
//! - latency of a new TCP connection through an established tunnel until the first echoed byte,
//!   against a new channel of an established `ssh -L`;
//! - time from starting `tunnel-client open` (or `ssh -N -L`) to the first echoed byte;
//! - RSS of each end idle, with 1,000 and 10,000 idle tunnelled connections, and peak RSS
//!   during the throughput runs;
//! - one stream through a user-space UDP relay adding 25 ms each way (this kernel has no netem),
//!   with the tunnel's windows and with quinn's defaults.

mod lossy;
mod relay;
mod sys;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sys::{
    Child, cpu_seconds_tree, free_port, peak_kib, reset_peak, rss_kib, wait_file, wait_port,
};
use tunnel_testkit::impair::{self, Impairment};
use tunnel_testkit::inproc;
use tunnel_testkit::servers::Sshd;

#[derive(Clone)]
struct Opts {
    quick: bool,
    bin_dir: PathBuf,
    out: PathBuf,
    rounds: usize,
    secs: u64,
    latency_samples: usize,
    startup_samples: usize,
    idle_counts: Vec<usize>,
    wan_secs: u64,
}

fn usage() -> &'static str {
    "usage: tunnel-bench [--quick] [--bin-dir DIR] [--out FILE] [--rounds N] [--secs S]\n\
     \n  --quick     short run for CI (1 round, 1 s runs, 200 idle connections); asserts nothing\n\
     \x20 --bin-dir   where tunnel-device and tunnel-client are (default: next to this binary)\n\
     \x20 --out       report path (default docs/BENCHMARKS.md, or target/bench-quick.md with --quick)\n\
     \x20 --rounds    interleaved rounds (default 3)\n\
     \x20 --secs      seconds per iperf3 run (default 6)"
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("echo-server") => {
            let port_file = PathBuf::from(args.get(1).context("echo-server PORT_FILE")?);
            let _ = rlimit::increase_nofile_limit(u64::MAX);
            return runtime()?.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                std::fs::write(&port_file, listener.local_addr()?.port().to_string())?;
                inproc::serve_echo(listener).await;
                Ok(())
            });
        }
        Some("relay") => {
            let upstream: SocketAddr = args
                .get(1)
                .context("relay UPSTREAM MS PORT_FILE")?
                .parse()?;
            let ms: u64 = args
                .get(2)
                .context("relay UPSTREAM MS PORT_FILE")?
                .parse()?;
            let port_file = PathBuf::from(args.get(3).context("relay UPSTREAM MS PORT_FILE")?);
            return Ok(runtime()?.block_on(impair::relay(
                upstream,
                Impairment::delay(Duration::from_millis(ms)),
                &port_file,
            ))?);
        }
        _ => {}
    }
    let opts = parse(&args)?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    run(&opts)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn parse(args: &[String]) -> anyhow::Result<Opts> {
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("no exe dir")?
        .to_owned();
    let mut quick = false;
    let mut bin_dir = exe_dir;
    let mut out = None;
    let mut rounds = None;
    let mut secs = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--bin-dir" => bin_dir = PathBuf::from(it.next().context("--bin-dir DIR")?),
            "--out" => out = Some(PathBuf::from(it.next().context("--out FILE")?)),
            "--rounds" => rounds = Some(it.next().context("--rounds N")?.parse()?),
            "--secs" => secs = Some(it.next().context("--secs S")?.parse()?),
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}'\n{}", usage()),
        }
    }
    Ok(Opts {
        quick,
        bin_dir,
        out: out.unwrap_or_else(|| {
            PathBuf::from(if quick {
                "target/bench-quick.md"
            } else {
                "docs/BENCHMARKS.md"
            })
        }),
        rounds: rounds.unwrap_or(if quick { 1 } else { 3 }),
        secs: secs.unwrap_or(if quick { 1 } else { 6 }),
        latency_samples: if quick { 40 } else { 400 },
        startup_samples: if quick { 2 } else { 5 },
        idle_counts: if quick { vec![200] } else { vec![1000, 10000] },
        wan_secs: if quick { 3 } else { 12 },
    })
}

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

struct Bench {
    opts: Opts,
    dir: tempfile::TempDir,
    iperf_port: u16,
    echo_port: u16,
    _iperf: Child,
    _echo: Child,
    sshd: Sshd,
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.opts.bin_dir.join(name)
    }
}

/// A device and an `open` client with forwards to iperf and echo.
struct Tunnel {
    device: Child,
    client: Child,
    device_addr: SocketAddr,
    iperf: u16,
    echo: u16,
}

fn device_home(b: &Bench, name: &str, extra_toml: &str) -> anyhow::Result<PathBuf> {
    let home = b.path(name);
    let ok = Command::new(b.bin("tunnel-device"))
        .arg("--home")
        .arg(&home)
        .args(["init", "--listen", "127.0.0.1:0", "--service"])
        .arg(format!("iperf=127.0.0.1:{}", b.iperf_port))
        .arg("--service")
        .arg(format!("echo=127.0.0.1:{}", b.echo_port))
        .stdout(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("tunnel-device init failed");
    }
    if !extra_toml.is_empty() {
        let p = home.join("device.toml");
        let merged = merge_toml(&std::fs::read_to_string(&p)?, extra_toml)?;
        std::fs::write(&p, merged)?;
    }
    let client_fp = output(
        Command::new(b.bin("tunnel-client"))
            .arg("--home")
            .arg(b.path("client"))
            .arg("fingerprint"),
    )?;
    let _ = Command::new(b.bin("tunnel-device"))
        .arg("--home")
        .arg(&home)
        .args(["user", "add", "bench", "--fingerprint", &client_fp])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    Ok(home)
}

/// Sets every key of `extra` (tables of scalars) in `base`, keeping the rest.
fn merge_toml(base: &str, extra: &str) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = base.parse()?;
    let extra: toml_edit::DocumentMut = extra.parse()?;
    for (table, item) in extra.iter() {
        let Some(src) = item.as_table() else {
            doc[table] = item.clone();
            continue;
        };
        for (k, v) in src.iter() {
            doc[table][k] = v.clone();
        }
    }
    Ok(doc.to_string())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stderr(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed");
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn start_device(
    b: &Bench,
    home: &Path,
    listen: &str,
    tag: &str,
) -> anyhow::Result<(Child, SocketAddr)> {
    let ready = b.path(&format!("{tag}.ready"));
    let _ = std::fs::remove_file(&ready);
    let device = Child::spawn(
        "tunnel-device",
        Command::new(b.bin("tunnel-device"))
            .arg("--home")
            .arg(home)
            .args([
                "--log-level",
                "warn",
                "run",
                "--listen",
                listen,
                "--ready-file",
            ])
            .arg(&ready),
        &b.path(&format!("{tag}.log")),
    )?;
    let addr = wait_file(&ready, Duration::from_secs(20), |s| {
        let v: Value = serde_json::from_str(s).ok()?;
        v["listen"][0].as_str()?.parse().ok()
    })?;
    Ok((device, addr))
}

fn start_open(
    b: &Bench,
    device: &str,
    forwards: &[&str],
    tag: &str,
    extra: &[&str],
) -> anyhow::Result<(Child, BTreeMap<String, u16>)> {
    let ready = b.path(&format!("{tag}.ready"));
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Command::new(b.bin("tunnel-client"));
    cmd.arg("--home")
        .arg(b.path("client"))
        .args(["--log-level", "warn", "open", device, "--ready-file"])
        .arg(&ready)
        .args(extra);
    for f in forwards {
        cmd.arg("-L").arg(f);
    }
    let client = Child::spawn("tunnel-client", &mut cmd, &b.path(&format!("{tag}.log")))?;
    let ports = wait_file(&ready, Duration::from_secs(20), |s| {
        let v: Value = serde_json::from_str(s).ok()?;
        let mut m = BTreeMap::new();
        for svc in v["services"].as_array()? {
            let local: SocketAddr = svc["local"].as_str()?.parse().ok()?;
            m.insert(svc["service"].as_str()?.to_string(), local.port());
        }
        Some(m)
    })?;
    Ok((client, ports))
}

fn pin(b: &Bench, name: &str, addr: SocketAddr, home: &Path) -> anyhow::Result<()> {
    let fp = output(
        Command::new(b.bin("tunnel-device"))
            .arg("--home")
            .arg(home)
            .arg("fingerprint"),
    )?;
    pin_client(
        b,
        name,
        &["--addr", &addr.to_string(), "--fingerprint", &fp],
    )
}

/// Pins `name` on the benchmark client afresh: `forget` (if known), then `device add name ARGS`.
fn pin_client(b: &Bench, name: &str, args: &[&str]) -> anyhow::Result<()> {
    let client = b.path("client");
    let _ = Command::new(b.bin("tunnel-client"))
        .arg("--home")
        .arg(&client)
        .args(["forget", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    output(
        Command::new(b.bin("tunnel-client"))
            .arg("--home")
            .arg(&client)
            .args(["device", "add", name])
            .args(args),
    )?;
    Ok(())
}

fn start_tunnel(b: &Bench, name: &str, extra_toml: &str) -> anyhow::Result<Tunnel> {
    let home = device_home(b, name, extra_toml)?;
    let (device, device_addr) = start_device(b, &home, "127.0.0.1:0", name)?;
    pin(b, name, device_addr, &home)?;
    let (client, ports) = start_open(
        b,
        name,
        &["0:iperf", "0:echo"],
        &format!("{name}-open"),
        &[],
    )?;
    let t = Tunnel {
        device,
        client,
        device_addr,
        iperf: ports["iperf"],
        echo: ports["echo"],
    };
    echo_once(t.echo).context("the tunnel does not echo")?;
    Ok(t)
}

fn start_sshd(dir: &Path) -> anyhow::Result<Sshd> {
    Sshd::start(dir).context("OpenSSH (sshd, ssh, ssh-keygen) is required")
}

fn ssh_forward(
    b: &Bench,
    cipher: Option<&str>,
    forwards: &[(u16, u16)],
    log: &str,
) -> anyhow::Result<(Child, u32)> {
    let before = b.sshd.pids().len();
    let mut cmd = b.sshd.ssh_options(b.sshd.addr.port());
    cmd.args(["-o", "ExitOnForwardFailure=yes"]).arg("-N");
    if let Some(c) = cipher {
        cmd.args(["-c", c]);
    }
    for (local, remote) in forwards {
        cmd.arg("-L")
            .arg(format!("127.0.0.1:{local}:127.0.0.1:{remote}"));
    }
    cmd.arg(b.sshd.destination());
    let child = Child::spawn("ssh", &mut cmd, &b.path(log))?;
    for (local, _) in forwards {
        wait_port(*local, Duration::from_secs(20))?;
    }
    let sshd_pid = b
        .sshd
        .pids()
        .get(before)
        .copied()
        .context("sshd did not start")?;
    Ok((child, sshd_pid))
}

fn echo_once(port: u16) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(&[42])?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(t0.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------

fn iperf(port: u16, secs: u64, reverse: bool, parallel: usize, omit: u64) -> anyhow::Result<f64> {
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
        "-J",
    ]);
    if omit > 0 {
        cmd.args(["-O", &omit.to_string()]);
    }
    if reverse {
        cmd.arg("-R");
    }
    if parallel > 1 {
        cmd.args(["-P", &parallel.to_string()]);
    }
    let out = cmd.stderr(Stdio::null()).output()?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 printed no JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no bits_per_second in iperf3 output")
}

#[derive(Clone)]
struct BenchPath {
    name: &'static str,
    port: u16,
    /// (client-side pid, server-side pid) whose CPU and memory are measured.
    ends: Option<(u32, u32)>,
    /// A process in the middle (the relay) whose CPU and memory are measured too.
    middle: Option<u32>,
    parallel: usize,
}

#[derive(Default, Clone, serde::Serialize)]
struct Sample {
    gbps: Option<f64>,
    cpu_client: f64,
    cpu_server: f64,
    peak_client_kib: u64,
    peak_server_kib: u64,
    cpu_middle: f64,
    peak_middle_kib: u64,
    secs: f64,
}

fn measure(path: &BenchPath, secs: u64, reverse: bool) -> Sample {
    let mut s = Sample::default();
    let (c0, d0) = path.ends.map_or((0.0, 0.0), |(c, d)| {
        reset_peak(c);
        reset_peak(d);
        (cpu_seconds_tree(c), cpu_seconds_tree(d))
    });
    let m0 = path.middle.map_or(0.0, |m| {
        reset_peak(m);
        cpu_seconds_tree(m)
    });
    let t0 = Instant::now();
    s.gbps = match iperf(path.port, secs, reverse, path.parallel, 0) {
        Ok(g) => Some(g),
        Err(e) => {
            // iperf3's server occasionally refuses a test right after another; retry once.
            eprintln!(
                "[bench]   {} {}: {e:#}; retrying",
                path.name,
                if reverse { "down" } else { "up" }
            );
            std::thread::sleep(Duration::from_secs(1));
            iperf(path.port, secs, reverse, path.parallel, 0)
                .map_err(|e| eprintln!("[bench]   failed again: {e:#}"))
                .ok()
        }
    };
    s.secs = t0.elapsed().as_secs_f64();
    if let Some((c, d)) = path.ends {
        s.cpu_client = cpu_seconds_tree(c) - c0;
        s.cpu_server = cpu_seconds_tree(d) - d0;
        s.peak_client_kib = peak_kib(c);
        s.peak_server_kib = peak_kib(d);
    }
    if let Some(m) = path.middle {
        s.cpu_middle = cpu_seconds_tree(m) - m0;
        s.peak_middle_kib = peak_kib(m);
    }
    s
}

fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    Some((mid, s[0], s[s.len() - 1]))
}

fn percentile(v: &[f64], p: u8) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    // Nearest rank, in integers: p is a whole percentage.
    let rank = (p as usize * (s.len() - 1) + 50) / 100;
    s[rank.min(s.len() - 1)]
}

fn fmt_stat(v: &[f64], digits: usize) -> String {
    match stats(v) {
        Some((m, lo, hi)) => format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})"),
        None => "error".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

fn run(opts: &Opts) -> anyhow::Result<()> {
    for tool in ["iperf3", "ssh", "ssh-keygen", "socat"] {
        if !tunnel_testkit::have(tool) {
            bail!(
                "{tool} is not installed: run bench/run.sh, which installs iperf3, openssh and socat"
            );
        }
    }
    if !Path::new("/usr/sbin/sshd").exists() {
        bail!("/usr/sbin/sshd is missing: run bench/run.sh (it installs openssh-server)");
    }
    for b in ["tunnel-device", "tunnel-client"] {
        if !opts.bin_dir.join(b).exists() {
            bail!(
                "{} not found in {}: build with cargo build --release",
                b,
                opts.bin_dir.display()
            );
        }
    }
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("tunnel-bench-").tempdir()?;
    let iperf_port = free_port()?;
    let iperf = Child::spawn(
        "iperf3 -s",
        Command::new("iperf3").args(["-s", "-p", &iperf_port.to_string()]),
        &dir.path().join("iperf3.log"),
    )?;
    wait_port(iperf_port, Duration::from_secs(10))?;
    let echo_file = dir.path().join("echo.port");
    let echo = Child::spawn(
        "echo-server",
        Command::new(std::env::current_exe()?)
            .arg("echo-server")
            .arg(&echo_file),
        &dir.path().join("echo.log"),
    )?;
    let echo_port: u16 = wait_file(&echo_file, Duration::from_secs(10), |s| {
        s.trim().parse().ok()
    })?;
    let sshd = start_sshd(&dir.path().join("sshd"))?;
    let b = Bench {
        opts: opts.clone(),
        dir,
        iperf_port,
        echo_port,
        _iperf: iperf,
        _echo: echo,
        sshd,
    };
    let mut report = Report {
        machine: machine(&b),
        ..Report::default()
    };

    // --- Paths -----------------------------------------------------------------------------
    eprintln!("[bench] starting paths");
    let relay = relay::start(&b)?;
    let tunnel = start_tunnel(&b, "dev", &relay.device_toml())?;
    let relayed = relay::open_relayed(&b, &relay, "dev")?;
    let over_tcp = relay::open_relayed_tcp(&b)?;
    eprintln!("[bench] hole punching");
    let (punched, punch_times) = relay::punch_times(&b, b.opts.startup_samples.max(1))?;
    report.punch = punch_times;
    report.idle = Some((rss_kib(tunnel.client.pid()), rss_kib(tunnel.device.pid())));
    let socat_port = free_port()?;
    let _socat = Child::spawn(
        "socat",
        Command::new("socat")
            .arg(format!(
                "TCP-LISTEN:{socat_port},bind=127.0.0.1,reuseaddr,fork"
            ))
            .arg(format!("TCP:127.0.0.1:{iperf_port}")),
        &b.path("socat.log"),
    )?;
    wait_port(socat_port, Duration::from_secs(10))?;
    let (ssh_iperf, ssh_echo) = (free_port()?, free_port()?);
    let (ssh_def, sshd_def) = ssh_forward(
        &b,
        None,
        &[(ssh_iperf, iperf_port), (ssh_echo, echo_port)],
        "ssh-default.log",
    )?;
    let ssh_aes_port = free_port()?;
    let (ssh_aes, sshd_aes) = ssh_forward(
        &b,
        Some("aes128-gcm@openssh.com"),
        &[(ssh_aes_port, iperf_port)],
        "ssh-aes.log",
    )?;

    let paths = vec![
        BenchPath {
            name: "raw TCP",
            port: iperf_port,
            ends: None,
            middle: None,
            parallel: 1,
        },
        BenchPath {
            name: "socat",
            port: socat_port,
            ends: None,
            middle: None,
            parallel: 1,
        },
        BenchPath {
            name: "ssh -L (default cipher)",
            port: ssh_iperf,
            ends: Some((ssh_def.pid(), sshd_def)),
            middle: None,
            parallel: 1,
        },
        BenchPath {
            name: "ssh -L aes128-gcm",
            port: ssh_aes_port,
            ends: Some((ssh_aes.pid(), sshd_aes)),
            middle: None,
            parallel: 1,
        },
        BenchPath {
            name: "tunnel",
            port: tunnel.iperf,
            ends: Some((tunnel.client.pid(), tunnel.device.pid())),
            middle: None,
            parallel: 1,
        },
        BenchPath {
            name: "ssh -L (default cipher), 8 streams",
            port: ssh_iperf,
            ends: Some((ssh_def.pid(), sshd_def)),
            middle: None,
            parallel: 8,
        },
        BenchPath {
            name: "tunnel, 8 streams",
            port: tunnel.iperf,
            ends: Some((tunnel.client.pid(), tunnel.device.pid())),
            middle: None,
            parallel: 8,
        },
        BenchPath {
            name: "tunnel via relay",
            port: relayed.iperf,
            ends: Some((relayed.client.pid(), tunnel.device.pid())),
            middle: Some(relay.child.pid()),
            parallel: 1,
        },
        BenchPath {
            name: "tunnel via relay, client leg over TCP",
            port: over_tcp.iperf,
            ends: Some((over_tcp.client.pid(), tunnel.device.pid())),
            middle: Some(relay.child.pid()),
            parallel: 1,
        },
        BenchPath {
            name: "tunnel via relay, punched direct",
            port: punched.iperf,
            ends: Some((punched.client.pid(), tunnel.device.pid())),
            middle: Some(relay.child.pid()),
            parallel: 1,
        },
    ];

    // --- Throughput, interleaved -------------------------------------------------------------
    for round in 0..b.opts.rounds {
        eprintln!("[bench] throughput round {}/{}", round + 1, b.opts.rounds);
        for p in &paths {
            for reverse in [false, true] {
                let s = measure(p, b.opts.secs, reverse);
                report
                    .throughput
                    .entry((p.name, reverse))
                    .or_default()
                    .push(s);
            }
        }
    }

    // --- New-connection latency, interleaved ---------------------------------------------
    eprintln!("[bench] new-connection latency");
    let mut lat: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..b.opts.latency_samples {
        for (name, port) in [
            ("raw TCP", echo_port),
            ("ssh -L (default cipher)", ssh_echo),
            ("tunnel", tunnel.echo),
            ("tunnel via relay", relayed.echo),
        ] {
            if let Ok(d) = echo_once(port) {
                lat.entry(name).or_default().push(d.as_secs_f64() * 1000.0);
            }
        }
    }
    report.latency = lat;

    // --- Start-up to first byte ---------------------------------------------------------
    eprintln!("[bench] start-up to first byte");
    for _ in 0..b.opts.startup_samples {
        for (label, device) in [
            ("tunnel-client open", "dev"),
            ("tunnel-client open, via relay", relay::RELAYED_NAME),
        ] {
            let port = free_port()?;
            let t0 = Instant::now();
            let child = Child::spawn(
                "tunnel-client open",
                Command::new(b.bin("tunnel-client"))
                    .arg("--home")
                    .arg(b.path("client"))
                    .args([
                        "--log-level",
                        "warn",
                        "open",
                        device,
                        "-L",
                        &format!("{port}:echo"),
                    ])
                    .args((device == relay::RELAYED_NAME).then_some("--no-punch")),
                &b.path("startup.log"),
            )?;
            if let Some(d) = first_byte(port, t0) {
                report.startup.entry(label).or_default().push(d);
            }
            drop(child);
        }
        let port = free_port()?;
        let t0 = Instant::now();
        let mut cmd = b.sshd.ssh_options(b.sshd.addr.port());
        cmd.arg("-N")
            .arg("-L")
            .arg(format!("127.0.0.1:{port}:127.0.0.1:{echo_port}"))
            .arg(b.sshd.destination());
        let child = Child::spawn("ssh -N -L", &mut cmd, &b.path("startup-ssh.log"))?;
        if let Some(d) = first_byte(port, t0) {
            report.startup.entry("ssh -N -L").or_default().push(d);
        }
        drop(child);
    }
    drop(ssh_def);
    drop(ssh_aes);

    // --- WAN: 25 ms each way ------------------------------------------------------------------
    eprintln!("[bench] WAN relay");
    report.wan = wan(&b, &tunnel)?;
    drop(relayed);
    drop(over_tcp);
    drop(punched);
    drop(tunnel);
    drop(relay);

    // --- Lossy links across two NATs, against TCP ----------------------------------------
    eprintln!("[bench] lossy links");
    report.lossy = Some(lossy::lossy(b.opts.quick, 0x5eed));

    // --- Memory with many idle connections ----------------------------------------------
    eprintln!("[bench] idle connections");
    report.idle_many = Some(idle_connections(&b)?);

    // --- The relay's memory per attached device and per channel ---------------------------
    eprintln!("[bench] relay scale");
    report.relay_scale = Some(relay::scale(&b)?);

    report.duration = started.elapsed();
    let md = report.render(&b.opts);
    if let Some(parent) = b.opts.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&b.opts.out, md)?;
    std::fs::write(
        b.opts.out.with_extension("json"),
        serde_json::to_string_pretty(&report.json())?,
    )?;
    eprintln!(
        "[bench] wrote {} in {:.0} s",
        b.opts.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Time from `t0` until a connection to `port` echoes a byte (retrying while it is not up).
fn first_byte(port: u16, t0: Instant) -> Option<f64> {
    let deadline = t0 + Duration::from_secs(30);
    while Instant::now() < deadline {
        if echo_once(port).is_ok() {
            return Some(t0.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

#[derive(Default)]
struct Wan {
    rows: Vec<(String, &'static str, Vec<f64>, u64, u64)>,
}

fn wan(b: &Bench, tunnel: &Tunnel) -> anyhow::Result<Wan> {
    let relay_file = b.path("relay.port");
    let _relay = Child::spawn(
        "relay",
        Command::new(std::env::current_exe()?)
            .arg("relay")
            .arg(tunnel.device_addr.to_string())
            .arg("25")
            .arg(&relay_file),
        &b.path("relay.log"),
    )?;
    let relay_port: u16 = wait_file(&relay_file, Duration::from_secs(10), |s| {
        s.trim().parse().ok()
    })?;
    let relay_addr = SocketAddr::from(([127, 0, 0, 1], relay_port));
    pin(b, "wan", relay_addr, &b.path("dev"))?;
    let mut rows = Vec::new();
    let omit = if b.opts.quick { 1 } else { 2 };
    {
        let (client, ports) = start_open(b, "wan", &["0:iperf"], "wan-open", &[])?;
        for (dir, reverse) in [("up", false), ("down", true)] {
            reset_peak(client.pid());
            reset_peak(tunnel.device.pid());
            let g = iperf(ports["iperf"], b.opts.wan_secs, reverse, 1, omit).ok();
            rows.push((
                {
                    let t = tunnel_shared::config::TransportSettings::default();
                    format!(
                        "tunnel defaults: stream {} MiB, connection {} MiB",
                        t.stream_window >> 20,
                        t.connection_window >> 20
                    )
                },
                dir,
                g.into_iter().collect(),
                peak_kib(client.pid()),
                peak_kib(tunnel.device.pid()),
            ));
        }
    }
    // quinn's default stream window (1.25 MB) on the receiving device: the upload is capped.
    let home = device_home(
        b,
        "devq",
        "[transport]\nstream_window = 1250000\nconnection_window = 10000000\n",
    )?;
    let (device, addr) = start_device(b, &home, "127.0.0.1:0", "devq")?;
    let relay_file = b.path("relayq.port");
    let _relay2 = Child::spawn(
        "relay",
        Command::new(std::env::current_exe()?)
            .arg("relay")
            .arg(addr.to_string())
            .arg("25")
            .arg(&relay_file),
        &b.path("relayq.log"),
    )?;
    let rport: u16 = wait_file(&relay_file, Duration::from_secs(10), |s| {
        s.trim().parse().ok()
    })?;
    pin(b, "wanq", SocketAddr::from(([127, 0, 0, 1], rport)), &home)?;
    let (client, ports) = start_open(b, "wanq", &["0:iperf"], "wanq-open", &[])?;
    reset_peak(client.pid());
    reset_peak(device.pid());
    let g = iperf(ports["iperf"], b.opts.wan_secs, false, 1, omit).ok();
    rows.push((
        "quinn's default stream window (1.25 MB) on the device".to_string(),
        "up",
        g.into_iter().collect(),
        peak_kib(client.pid()),
        peak_kib(device.pid()),
    ));
    Ok(Wan { rows })
}

struct IdleMany {
    idle: (u64, u64),
    rows: Vec<(usize, usize, u64, u64)>,
    max_streams: u32,
}

fn idle_connections(b: &Bench) -> anyhow::Result<IdleMany> {
    let max = *b.opts.idle_counts.iter().max().unwrap_or(&1000);
    let max_streams = u32::try_from(max + 100)?;
    let t = start_tunnel(
        b,
        "devm",
        &format!(
            "[limits]\nmax_streams_per_connection = {max_streams}\nmax_streams_per_user = \
             {max_streams}\nmax_streams_total = {}\n",
            max_streams + 100
        ),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let idle = (rss_kib(t.client.pid()), rss_kib(t.device.pid()));
    let mut conns = Vec::new();
    let mut rows = Vec::new();
    let mut errors = 0usize;
    for &target in &b.opts.idle_counts {
        while conns.len() + errors < target {
            match TcpStream::connect(("127.0.0.1", t.echo)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                s.write_all(&[1])?;
                let mut buf = [0u8; 1];
                s.read_exact(&mut buf)?;
                Ok(s)
            }) {
                Ok(s) => conns.push(s),
                Err(_) => errors += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        rows.push((
            conns.len(),
            errors,
            rss_kib(t.client.pid()),
            rss_kib(t.device.pid()),
        ));
        eprintln!(
            "[bench]   {} idle connections, {errors} errors",
            conns.len()
        );
    }
    drop(conns);
    Ok(IdleMany {
        idle,
        rows,
        max_streams,
    })
}

fn machine(b: &Bench) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "cpu",
        sys::sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
    );
    m.insert("cores", sys::sh("nproc"));
    m.insert(
        "memory",
        sys::sh("free -g | awk '/Mem:/ {print $2 \" GiB\"}'"),
    );
    m.insert("kernel", sys::sh("uname -r"));
    m.insert(
        "net.core.rmem_max",
        sys::sh("cat /proc/sys/net/core/rmem_max"),
    );
    m.insert("commit", sys::sh("git rev-parse --short HEAD 2>/dev/null"));
    m.insert("date", sys::sh("date -u +%Y-%m-%dT%H:%MZ"));
    m.insert("iperf3", sys::sh("iperf3 --version | head -1"));
    m.insert("openssh", sys::sh("ssh -V 2>&1"));
    m.insert("binaries", b.opts.bin_dir.display().to_string());
    m
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Report {
    machine: BTreeMap<&'static str, String>,
    throughput: BTreeMap<(&'static str, bool), Vec<Sample>>,
    latency: BTreeMap<&'static str, Vec<f64>>,
    startup: BTreeMap<&'static str, Vec<f64>>,
    idle: Option<(u64, u64)>,
    idle_many: Option<IdleMany>,
    wan: Wan,
    lossy: Option<lossy::Lossy>,
    relay_scale: Option<relay::Scale>,
    punch: relay::PunchTimes,
    duration: Duration,
}

impl Report {
    /// Hole punching: how soon a relayed `open` carries data and goes direct, and its
    /// throughput once direct against a plain direct connection.
    fn render_punch(&self, s: &mut String) {
        s.push_str("## Hole punching\n\n");
        s.push_str(
            "`tunnel via relay, punched direct`: an `open` that knows the device only through the \
             relay (no direct address), with hole punching on, so the connection starts relayed \
             and moves to the direct path inside the client's and the device's sockets (same \
             virtual address, no new handshake). Times from starting `open` (median (min–max) \
             of the samples), and throughput once direct, per round, ÷ the plain direct tunnel \
             of the same round:\n\n",
        );
        s.push_str("| measure | value |\n|---|---|\n");
        s.push_str(&format!(
            "| start → connected via the relay (ms) | {} |\n| start → direct (punched) (ms) | {} |\n",
            fmt_stat(&self.punch.relayed, 0),
            fmt_stat(&self.punch.direct, 0)
        ));
        for (rev, dir) in [(false, "up"), (true, "down")] {
            s.push_str(&format!(
                "| punched ÷ direct, {dir} | {} |\n",
                fmt_stat(
                    &self.ratio_of("tunnel via relay, punched direct", "tunnel", rev),
                    2
                )
            ));
        }
        s.push('\n');
    }

    /// The relay: its CPU per Gbit/s and peak memory in the relayed runs, and its memory per
    /// attached device and per channel.
    fn render_relay(&self, s: &mut String) {
        s.push_str("## The relay\n\n");
        s.push_str(
            "`tunnel via relay`: the same client and device, the end-to-end connection carried \
             through a `tunnel-relay` on loopback (QUIC DATAGRAM legs, each leg discovering its path MTU up to 6500 bytes, as loopback allows), \
             in the same rounds as the direct paths. The relay's CPU per Gbit/s relayed (user + \
             system, cores busy ÷ Gbit/s) and its peak RSS:\n\n",
        );
        s.push_str("| dir | relay cores per Gbit/s | relay peak RSS (MiB) |\n|---|---|---|\n");
        for rev in [false, true] {
            let Some(v) = self.throughput.get(&("tunnel via relay", rev)) else {
                continue;
            };
            let per: Vec<f64> = v
                .iter()
                .filter_map(|x| Some((x.cpu_middle / x.secs) / x.gbps?))
                .collect();
            let peak: Vec<f64> = v
                .iter()
                .map(|x| x.peak_middle_kib as f64 / 1024.0)
                .collect();
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                if rev { "down" } else { "up" },
                fmt_stat(&per, 3),
                fmt_stat(&peak, 1)
            ));
        }
        if let Some(sc) = &self.relay_scale {
            s.push_str(
                "\nMemory with many simulated devices, each attached by its own leg (its own key, \
                 one token hash), then channels to one of them from as many client keys (RSS of \
                 the relay process, KiB):\n\n| devices | channels | errors | idle RSS | with the \
                 devices | with the channels | per device | per channel |\n|---|---|---|---|---|---|---|---|\n",
            );
            for (n, c, idle, dev, ch, errors) in &sc.rows {
                let per = |a: u64, b: u64, k: usize| a.saturating_sub(b) as f64 / k.max(1) as f64;
                s.push_str(&format!(
                    "| {n} | {c} | {errors} | {idle} | {dev} | {ch} | {:.1} | {:.1} |\n",
                    per(*dev, *idle, *n),
                    per(*ch, *dev, *c)
                ));
            }
        }
        s.push('\n');
    }

    /// Writes `| path | dir | cells |` for every measured path with two ends and direction.
    fn per_end_rows(&self, s: &mut String, cells: impl Fn(&[Sample]) -> String) {
        for name in [
            "ssh -L (default cipher)",
            "ssh -L aes128-gcm",
            "tunnel",
            "tunnel, 8 streams",
            "tunnel via relay",
        ] {
            for rev in [false, true] {
                if let Some(v) = self.throughput.get(&(name, rev)) {
                    let dir = if rev { "down" } else { "up" };
                    s.push_str(&format!("| {name} | {dir} | {} |\n", cells(v)));
                }
            }
        }
    }

    fn gbps(&self, name: &str, reverse: bool) -> Vec<f64> {
        self.throughput
            .get(&(name, reverse))
            .map(|v| v.iter().filter_map(|s| s.gbps).collect())
            .unwrap_or_default()
    }

    /// Per-round ratios tunnel / other.
    fn ratios(&self, other: &str, reverse: bool) -> Vec<f64> {
        self.ratio_of("tunnel", other, reverse)
    }

    /// Per-round ratios `one` / `other`.
    fn ratio_of(&self, one: &str, other: &str, reverse: bool) -> Vec<f64> {
        let t = self.throughput.get(&(one, reverse));
        let o = self.throughput.get(&(other, reverse));
        match (t, o) {
            (Some(t), Some(o)) => t
                .iter()
                .zip(o)
                .filter_map(|(a, b)| Some(a.gbps? / b.gbps?))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn json(&self) -> Value {
        let mut tp = serde_json::Map::new();
        for ((name, rev), v) in &self.throughput {
            tp.insert(
                format!("{name} {}", if *rev { "down" } else { "up" }),
                json!(v),
            );
        }
        json!({
            "machine": self.machine,
            "throughput": tp,
            "latency_ms": self.latency,
            "startup_ms": self.startup,
            "idle_rss_kib": self.idle,
            "wan": self.wan.rows.iter().map(|r| json!({"case": r.0, "dir": r.1, "gbps": r.2, "client_peak_kib": r.3, "device_peak_kib": r.4})).collect::<Vec<_>>(),
            "lossy": self.lossy.as_ref().map(|l| json!({"bytes": l.len, "cap_secs": l.cap_secs, "paths": lossy::PATHS, "rows": l.rows.iter().map(|(loss, c)| json!({"loss_percent": loss, "secs": c})).collect::<Vec<_>>(), "verified": l.verified})),
            "relay_scale": self.relay_scale,
            "punch_ms": {"to_relayed": self.punch.relayed, "to_direct": self.punch.direct},
            "idle_many": self.idle_many.as_ref().map(|m| json!({"idle": m.idle, "rows": m.rows, "max_streams_per_connection": m.max_streams})),
        })
    }

    fn render(&self, o: &Opts) -> String {
        let mut s = String::new();
        let w = |s: &mut String, t: &str| {
            s.push_str(t);
            s.push('\n');
        };
        w(&mut s, "# Benchmarks");
        w(&mut s, "");
        w(
            &mut s,
            "Generated by `bash bench/run.sh` (`tunnel-bench`); do not edit by hand. Every figure is",
        );
        w(
            &mut s,
            "from one interleaved run (each round runs every path once, so drift of the machine affects",
        );
        w(
            &mut s,
            "all paths alike): the **median** over the rounds, with **min–max** in parentheses.",
        );
        if o.quick {
            w(&mut s, "");
            w(
                &mut s,
                "**This is a `--quick` run (CI smoke test): too short to compare anything.**",
            );
        }
        w(&mut s, "");
        w(&mut s, "## Machine");
        w(&mut s, "");
        w(&mut s, "| | |\n|---|---|");
        for (k, v) in &self.machine {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
        s.push_str(&format!(
            "| run | {} rounds × {} s per iperf3 run, {:.0} s in all |\n",
            o.rounds,
            o.secs,
            self.duration.as_secs_f64()
        ));
        w(&mut s, "");
        w(
            &mut s,
            "Everything runs on loopback on this one machine: iperf3 client and server, both tunnel",
        );
        w(
            &mut s,
            "ends (or ssh and sshd) share its cores, so every figure is CPU-bound.",
        );
        w(&mut s, "");
        w(&mut s, "## Single-stream throughput (iperf3, Gbit/s)");
        w(&mut s, "");
        w(
            &mut s,
            "\"up\" is client → device (iperf3 client writes into the local end), \"down\" is `iperf3 -R`.",
        );
        w(&mut s, "");
        w(&mut s, "| path | up | down |\n|---|---|---|");
        for name in [
            "raw TCP",
            "socat",
            "ssh -L (default cipher)",
            "ssh -L aes128-gcm",
            "tunnel",
            "ssh -L (default cipher), 8 streams",
            "tunnel, 8 streams",
            "tunnel via relay",
            "tunnel via relay, client leg over TCP",
        ] {
            s.push_str(&format!(
                "| {name} | {} | {} |\n",
                fmt_stat(&self.gbps(name, false), 2),
                fmt_stat(&self.gbps(name, true), 2)
            ));
        }
        w(&mut s, "");
        w(&mut s, "Tunnel ÷ ssh, computed per round:");
        w(&mut s, "");
        w(&mut s, "| ratio | up | down |\n|---|---|---|");
        for other in ["ssh -L (default cipher)", "ssh -L aes128-gcm"] {
            s.push_str(&format!(
                "| tunnel ÷ {other} | {} | {} |\n",
                fmt_stat(&self.ratios(other, false), 2),
                fmt_stat(&self.ratios(other, true), 2)
            ));
        }
        s.push_str(&format!(
            "| tunnel via relay ÷ tunnel (direct) | {} | {} |\n",
            fmt_stat(&self.ratio_of("tunnel via relay", "tunnel", false), 2),
            fmt_stat(&self.ratio_of("tunnel via relay", "tunnel", true), 2)
        ));
        let tcp = "tunnel via relay, client leg over TCP";
        s.push_str(&format!(
            "| {tcp} ÷ ssh -L (default cipher) | {} | {} |\n",
            fmt_stat(&self.ratio_of(tcp, "ssh -L (default cipher)", false), 2),
            fmt_stat(&self.ratio_of(tcp, "ssh -L (default cipher)", true), 2)
        ));
        w(&mut s, "");
        self.render_relay(&mut s);
        self.render_punch(&mut s);
        w(&mut s, "## CPU per run");
        w(&mut s, "");
        w(
            &mut s,
            "CPU seconds used by each end during one iperf3 run (user + system, from `/proc/PID/stat`,",
        );
        w(
            &mut s,
            "including child processes), and throughput per core of end CPU (Gbit/s ÷ cores busy).",
        );
        w(&mut s, "");
        w(
            &mut s,
            "| path | dir | client end (s) | server end (s) | Gbit/s per core |\n|---|---|---|---|---|",
        );
        self.per_end_rows(&mut s, |v| {
            let eff: Vec<f64> = v
                .iter()
                .filter_map(|x| Some(x.gbps? / ((x.cpu_client + x.cpu_server) / x.secs)))
                .collect();
            [
                fmt_stat(&v.iter().map(|x| x.cpu_client).collect::<Vec<_>>(), 2),
                fmt_stat(&v.iter().map(|x| x.cpu_server).collect::<Vec<_>>(), 2),
                fmt_stat(&eff, 2),
            ]
            .join(" | ")
        });
        w(&mut s, "");
        w(
            &mut s,
            "## New connection through an established tunnel (ms)",
        );
        w(&mut s, "");
        w(
            &mut s,
            "TCP connect to the local end, write one byte, read the echo. The tunnel opens a new QUIC",
        );
        w(
            &mut s,
            "stream on its existing connection; `ssh -L` opens a new channel on its existing session.",
        );
        w(&mut s, "");
        w(
            &mut s,
            "| path | median | p99 | samples |\n|---|---|---|---|",
        );
        for (name, v) in &self.latency {
            s.push_str(&format!(
                "| {name} | {:.3} | {:.3} | {} |\n",
                stats(v).map_or(f64::NAN, |x| x.0),
                percentile(v, 99),
                v.len()
            ));
        }
        if let (Some(a), Some(b)) = (
            self.latency.get("tunnel").and_then(|v| stats(v)),
            self.latency
                .get("ssh -L (default cipher)")
                .and_then(|v| stats(v)),
        ) {
            s.push_str(&format!("\nTunnel ÷ ssh (median): {:.2}.\n", a.0 / b.0));
        }
        w(&mut s, "");
        w(
            &mut s,
            "## Start-up: process start to first echoed byte (ms)",
        );
        w(&mut s, "");
        w(&mut s, "| command | median (min–max) |\n|---|---|");
        for (name, v) in &self.startup {
            s.push_str(&format!("| `{name}` | {} |\n", fmt_stat(v, 1)));
        }
        w(&mut s, "");
        w(&mut s, "## Memory");
        w(&mut s, "");
        if let Some((c, d)) = self.idle {
            s.push_str(&format!(
                "Idle, connected, default configuration: client **{:.1} MiB**, device **{:.1} MiB** RSS.\n\n",
                c as f64 / 1024.0,
                d as f64 / 1024.0
            ));
        }
        w(
            &mut s,
            "Peak RSS during the throughput runs (VmHWM, reset before each run), MiB:",
        );
        w(&mut s, "");
        w(
            &mut s,
            "| path | dir | client end | server end |\n|---|---|---|---|",
        );
        self.per_end_rows(&mut s, |v| {
            let mib = |kib: u64| kib as f64 / 1024.0;
            [
                fmt_stat(
                    &v.iter().map(|x| mib(x.peak_client_kib)).collect::<Vec<_>>(),
                    1,
                ),
                fmt_stat(
                    &v.iter().map(|x| mib(x.peak_server_kib)).collect::<Vec<_>>(),
                    1,
                ),
            ]
            .join(" | ")
        });
        if let Some(m) = &self.idle_many {
            s.push_str(&format!(
                "\nIdle tunnelled connections (each sent and received one byte, then stays open), with\n\
                 `max_streams_per_connection` and `max_streams_per_user` = {} (the defaults, 1024 and 2048, \
                 make connections beyond them wait or be refused):\n\n",
                m.max_streams
            ));
            w(
                &mut s,
                "| connections | errors | client RSS (MiB) | device RSS (MiB) | client per conn (KiB) | device per conn (KiB) |\n|---|---|---|---|---|---|",
            );
            s.push_str(&format!(
                "| 0 | 0 | {:.1} | {:.1} | | |\n",
                m.idle.0 as f64 / 1024.0,
                m.idle.1 as f64 / 1024.0
            ));
            for (n, e, c, d) in &m.rows {
                let per = |x: u64, base: u64| x.saturating_sub(base) as f64 / (*n).max(1) as f64;
                s.push_str(&format!(
                    "| {n} | {e} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
                    *c as f64 / 1024.0,
                    *d as f64 / 1024.0,
                    per(*c, m.idle.0),
                    per(*d, m.idle.1)
                ));
            }
        }
        w(&mut s, "");
        w(
            &mut s,
            "## WAN: one stream through a 25 ms each way delay (50 ms RTT)",
        );
        w(&mut s, "");
        w(
            &mut s,
            "A user-space UDP relay (`tunnel-bench relay`) delays every datagram by 25 ms and drops",
        );
        w(
            &mut s,
            "datagrams above 1472 bytes (an Ethernet path), so MTU discovery settles at 1452. iperf3",
        );
        s.push_str(&format!(
            "runs {} s and omits the first {} s (slow start).\n\n",
            o.wan_secs,
            if o.quick { 1 } else { 2 }
        ));
        w(
            &mut s,
            "| windows | dir | Gbit/s | client peak RSS (MiB) | device peak RSS (MiB) |\n|---|---|---|---|---|",
        );
        for (case, dir, g, c, d) in &self.wan.rows {
            s.push_str(&format!(
                "| {case} | {dir} | {} | {:.1} | {:.1} |\n",
                fmt_stat(g, 3),
                *c as f64 / 1024.0,
                *d as f64 / 1024.0
            ));
        }
        w(&mut s, "");
        if let Some(l) = &self.lossy {
            render_lossy(&mut s, l);
        }
        s.push_str(LIMITS);
        s
    }
}

fn render_lossy(s: &mut String, l: &lossy::Lossy) {
    s.push_str("## Lossy links: across two NATs, against Linux TCP\n\n");
    if let Some(why) = &l.skipped {
        s.push_str(&format!("Not measured: {why}.\n\n"));
        return;
    }
    s.push_str(&format!(
        "A {} MiB file served over HTTP in one home and fetched with curl from another, across two\n\
         home routers (network namespaces with `nft masquerade`; the server's router forwards the\n\
         device's UDP port and, for plain TCP, the HTTP port) and an \"internet\" namespace that\n\
         drops the given share of UDP and TCP packets each way (`nft numgen random`). RTT ≈ 0.\n\
         Seconds: median (min–max) over 3 rounds (1 at 20 % loss and in a quick run); × clean is the median against the\n\
         same path's clean median. A download not done in {} s counts as not done. {} of {}\n\
         downloads were byte-exact (SHA-256).\n\n",
        l.len >> 20,
        l.cap_secs,
        l.verified.0,
        l.verified.1
    ));
    let median = |v: &[Option<f64>]| -> Option<f64> {
        let done: Vec<f64> = v.iter().flatten().copied().collect();
        (done.len() == v.len())
            .then(|| stats(&done).map(|x| x.0))
            .flatten()
    };
    let clean: Vec<Option<f64>> = l
        .rows
        .first()
        .map(|(_, c)| c.iter().map(|v| median(v)).collect())
        .unwrap_or_default();
    s.push_str("| loss each way |");
    for p in lossy::PATHS {
        s.push_str(&format!(" {p} (s) | × clean |"));
    }
    s.push_str("\n|---|");
    for _ in lossy::PATHS {
        s.push_str("---|---|");
    }
    s.push('\n');
    for (loss, cells) in &l.rows {
        s.push_str(&format!("| {loss} % |"));
        for (i, v) in cells.iter().enumerate() {
            match median(v) {
                Some(m) => {
                    let done: Vec<f64> = v.iter().flatten().copied().collect();
                    let ratio = clean
                        .get(i)
                        .copied()
                        .flatten()
                        .map_or_else(|| "-".to_string(), |c| format!("{:.1}", m / c));
                    s.push_str(&format!(" {} | {ratio} |", fmt_stat(&done, 3)));
                }
                None => s.push_str(&format!(" not done in {} s | - |", l.cap_secs)),
            }
        }
        s.push('\n');
    }
    s.push_str(
        "\nWhy the tunnel's default is BBR: CUBIC (like Linux TCP) reads every lost packet as\n\
         congestion and halves its window, so random loss keeps it small; BBR paces at the\n\
         bottleneck bandwidth and round-trip time it measures and does not back off for isolated\n\
         losses. QUIC's loss recovery (RFC 9002: packet-threshold and time-threshold detection,\n\
         no retransmission ambiguity) is the same under both; the controller is the difference.\n\
         `[transport] congestion = \"cubic\"` (or `\"newreno\"`) in device.toml chooses another.\n\n",
    );
}

const LIMITS: &str = "## What limits each figure

- **Throughput** is CPU-bound: on this machine four processes (iperf3 client and server, two
  tunnel ends) share the cores, and the sending end's single thread is saturated (~1 core). The
  tunnel's per-byte work is AES-128-GCM plus QUIC packetization, ACK processing and the UDP
  syscalls; ssh's is its cipher plus TCP. Raw TCP and socat show the ceiling without encryption.
- **Tunnel settings that matter** (see the commit history of `core/src/transport/` (before it,
  `shared/src/transport.rs`) and `shared/src/splice.rs` for each measured effect): a single-threaded runtime per process (no
  cross-thread wake-ups between quinn's connection driver and the splice tasks), path MTU
  discovery up to 6500 bytes (10 datagrams per GSO batch stay below the kernel's 64 KiB limit),
  4 MiB UDP socket buffers, zero-copy chunks both ways (`write_chunk` / `read_chunks` + `writev`).
  AES-128-GCM is preferred; ACK frequency and a larger initial window measured no gain. BBR
  (the default congestion controller) equals CUBIC on loopback and wins under random loss
  (the lossy-links table).
- **New-connection latency** is one QUIC stream open on an existing connection (no handshake) plus
  the device's TCP connect to the service; ssh's is a channel-open round trip plus sshd's connect.
- **Start-up** includes the process start, key loading, the QUIC/TLS 1.3 handshake with both keys
  and the hello exchange (one round trip more than the handshake).
- **Memory per idle connection** is quinn's stream state, two socket buffers' bookkeeping and the
  splice task (which allocates no read buffer while idle). The idle RSS is dominated by the
  runtime, TLS and quinn's endpoint buffers; peak RSS during transfers by the stream window (data
  in flight) and quinn's receive batch buffer.
- **WAN**: one stream can have at most one stream window in flight per round trip: 6 MiB / 50 ms ≈
  1.0 Gbit/s with the tunnel's default (8 MiB before: a lossy, policed path could then leave more
  than quinn's 1,024 gaps in one stream's receive buffer, which closes the connection); quinn's default 1.25 MB caps it near 200 Mbit/s. The
  memory cost is paid only while data is in flight (peak RSS above). The relay itself runs on the
  same cores.
- **Through the relay** every packet is encrypted twice (end to end, then on its leg) and
  decrypted twice, and crosses three processes instead of two, all on these two cores with
  iperf3: a profile (`perf record` of the three processes during a relayed iperf3) shows
  AES-GCM, `memmove` and the kernel's socket copies on top in each. Leg packet size is what
  matters most: legs capped at 1452 bytes of UDP payload gave 0.23× direct; discovering up to
  6500 on loopback (what the legs do now) gives the figure above. On an Internet path legs
  settle at 1452.
- **Relay memory per attached device** is one QUIC connection: quinn's connection state (6.4 KiB
  inline, `-Zprint-type-sizes`), its send buffer (as large as the largest packet sent, a path MTU
  probe of up to 6500 bytes), the TLS session and packet keys, and the hub entry.
";
