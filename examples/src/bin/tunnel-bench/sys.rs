//! Process helpers: children killed on drop, free ports, /proc readings (CPU, RSS).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A child process, killed (with its process group's children left to exit) on drop.
pub(crate) struct Child {
    inner: std::process::Child,
}

impl Child {
    pub(crate) fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let inner = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self { inner })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.inner.id()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        for pid in descendants(self.pid()) {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        let _ = self.inner.kill();
        let _ = self.inner.wait();
    }
}

/// A port that was free a moment ago (for tools that cannot bind port 0 themselves).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `port`.
pub(crate) fn wait_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port} after {timeout:?}")
}

/// Waits for a file to hold parseable content.
pub(crate) fn wait_file<T>(
    path: &Path,
    timeout: Duration,
    parse: impl Fn(&str) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(v) = std::fs::read_to_string(path).ok().and_then(|s| parse(&s)) {
            return Ok(v);
        }
        // Fine-grained so that the startup figures are not rounded up to the poll period.
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("{} not ready after {timeout:?}", path.display())
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// Direct and indirect children of `pid`.
pub(crate) fn descendants(pid: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
                && let Some(ppid) = stat_fields(p).and_then(|f| f.get(1)?.parse().ok())
            {
                all.push((p, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &all {
            if pp == p {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

pub(crate) use tunnel_testkit::process::{peak_kib, reset_peak, rss_kib};

/// CPU seconds (user + system) used so far by `pid` and its live descendants.
pub(crate) fn cpu_seconds_tree(pid: u32) -> f64 {
    let ticks: u64 = std::iter::once(pid)
        .chain(descendants(pid))
        .filter_map(|p| {
            let f = stat_fields(p)?;
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

pub(crate) fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
