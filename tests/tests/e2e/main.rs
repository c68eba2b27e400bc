//! End-to-end tests of the real binaries. The harness is `tunnel_testkit`.
//!
//! Build the binaries first (`cargo build --workspace --bins`; `bash .ci/run` does it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc,
    reason = "tests: a panic is a failure with a message"
)]

mod attacks;
mod basic;
mod cli;
mod fallback;
mod fleet;
mod hardening;
mod metrics;
mod negative;
mod ops;
mod pairing;
mod peers;
mod punch;
mod raw;
mod relay;
mod resilience;
mod stdio;
mod transfer;
mod up;

use std::net::SocketAddr;

use tunnel_testkit::{ClientFixture, DeviceFixture, RunningDevice, World};

/// A device with `services`, a client paired as `alice` (Owner) and pinned as `cam`.
#[derive(Debug)]
pub struct Setup {
    pub world: World,
    pub device_home: DeviceFixture,
    pub device: RunningDevice,
    pub client: ClientFixture,
}

pub fn setup(services: &[(&str, SocketAddr)]) -> Setup {
    setup_with(services, "")
}

/// As [`setup`], with extra `device.toml` text appended before the device starts.
pub fn setup_with(services: &[(&str, SocketAddr)], extra_config: &str) -> Setup {
    let world = World::new();
    let device_home = world.device("dev", services);
    if !extra_config.is_empty() {
        device_home.append_config(extra_config);
    }
    let client = world.client("cli");
    device_home.add_user("alice", &client.fingerprint(), "Owner");
    let device = device_home.start();
    client.pin("cam", &device);
    Setup {
        world,
        device_home,
        device,
        client,
    }
}

/// Short idle timeout so dead peers are noticed quickly in tests.
pub const FAST_IDLE: &str = "[transport]\nidle_timeout_secs = 5\nkeep_alive_secs = 1\n";

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
