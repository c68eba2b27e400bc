//! The real binaries as child processes: finding them, running them to completion, and
//! long-running ones whose output goes to a log and which are killed when dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, SystemTime};

use crate::{SOON, wait_for};

/// Path of a workspace binary built next to this test executable.
///
/// # Panics
/// When the binary is missing or older than the sources (build with `cargo build --workspace
/// --bins`, which `.ci/run` does before testing).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Tests live in target/<profile>/deps, programs (the reliability harness) in
    // target/<profile>; `TUNNEL_BIN_DIR` overrides both.
    let dir = std::env::var_os("TUNNEL_BIN_DIR").map_or_else(
        || {
            let parent = exe.parent().expect("the executable is in a directory");
            if parent.file_name().is_some_and(|n| n == "deps") {
                parent.parent().expect("target/<profile>").to_owned()
            } else {
                parent.to_owned()
            }
        },
        PathBuf::from,
    );
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first with `cargo build --workspace --bins` (bash .ci/run does)",
        path.display()
    );
    let built = fs::metadata(&path)
        .and_then(|m| m.modified())
        .expect("mtime");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let mut newest = SystemTime::UNIX_EPOCH;
    // The sources each binary is built from (cargo relinks it only when one of them changes).
    let dirs: &[&str] = match name {
        "tunnel-relay" => &["core/src", "tunnel-relay/src"],
        "tunnel-device" => &["core/src", "shared/src", "tunnel-device/src"],
        "tunnel-client" => &["core/src", "shared/src", "tunnel-client/src"],
        _ => &[],
    };
    for dir in dirs {
        newest = newest.max(newest_mtime(&root.join(dir)));
    }
    assert!(
        newest <= built,
        "{} is older than its sources: rebuild with `cargo build --workspace --bins`",
        path.display()
    );
    path
}

fn newest_mtime(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let t = if p.is_dir() {
                newest_mtime(&p)
            } else {
                e.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            };
            newest = newest.max(t);
        }
    }
    newest
}

/// Reads a ready file once it exists and holds a complete JSON object.
pub fn read_ready(path: &Path, proc: &mut Proc) -> serde_json::Value {
    wait_for(&format!("ready file {}", path.display()), SOON, || {
        if let Some(status) = proc.try_status() {
            panic!(
                "{} exited with {status} before it was ready:\n{}",
                proc.name,
                proc.log()
            );
        }
        let text = fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    })
}

/// A child process whose output goes to a log file; killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// Name for messages.
    pub name: String,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            child,
            name: name.to_string(),
            log: log.to_owned(),
            status: None,
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `INT`, …).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {} failed", self.pid());
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }

    /// The exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for exit up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let name = self.name.clone();
        wait_for(&format!("{name} to exit"), timeout, || self.try_status())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a binary to completion.
pub fn run(bin_name: &str, home: &Path, args: &[&str]) -> Output {
    Command::new(bin(bin_name))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin_name}: {e}"))
}

/// Runs a binary and asserts success; returns stdout.
pub fn run_ok(bin_name: &str, home: &Path, args: &[&str]) -> String {
    let out = run(bin_name, home, args);
    assert!(
        out.status.success(),
        "{bin_name} {args:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident memory now, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:").unwrap_or(0)
}

/// Peak resident memory since start or the last [`reset_peak`], KiB.
pub fn peak_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:").unwrap_or(0)
}

/// Resets the peak-RSS counter (Linux `clear_refs` 5).
pub fn reset_peak(pid: u32) {
    let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}
