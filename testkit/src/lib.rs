//! The test toolkit every test and the benchmark share: fixtures for device and client homes
//! ([`fixture`], the real binaries as [`process`]es), devices and clients in this process
//! ([`inproc`]), target servers ([`servers`]: echo, hash responder, data source, a private `sshd`,
//! an HTTP server), hostile peers ([`hostile`]: handshake floods, garbage, a lying device),
//! network namespaces ([`netns`], and [`natlab`]: a download across two NATs) and a UDP impairment relay ([`impair`]).
//!
//! Nothing here uses fixed ports or sleeps for synchronization: readiness comes from ready files
//! and listener sockets; waits poll a condition until a deadline. Every child process is killed
//! when its handle drops, so a failing test leaves nothing behind.

#![allow(
    clippy::missing_panics_doc,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test toolkit: a panic is a test failure with a message"
)]

pub mod fixture;
pub mod hostile;
pub mod impair;
pub mod inproc;
pub mod jwt;
pub mod natlab;
pub mod netns;
pub mod process;
pub mod servers;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use fixture::{
    ClientFixture, DeviceFixture, RelayFixture, RelayLab, RunningDevice, RunningOpen, RunningRelay,
    World, saw_reset,
};
pub use process::{Proc, bin, read_ready, run, run_ok};

/// Generous bound for anything that should happen "soon" (a debug build on 2 loaded cores).
pub const SOON: Duration = Duration::from_secs(30);

/// Polls `cond` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// As [`wait_for`], but `None` at the deadline instead of a panic.
pub fn try_wait_for<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a command is available on this machine.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
