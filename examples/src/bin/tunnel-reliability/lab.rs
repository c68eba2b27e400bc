//! A device and a paired client on loopback, run from the real binaries in temporary homes.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tunnel_testkit::{ClientFixture, DeviceFixture, RunningDevice, RunningOpen, World};

/// A running device with services, and a client that is its owner, pinned as `dev`.
pub(crate) struct Lab {
    pub world: World,
    pub dev: DeviceFixture,
    pub device: RunningDevice,
    pub client: ClientFixture,
}

impl Lab {
    /// A device with `services` and `extra` device.toml settings, and its owner.
    pub(crate) fn new(services: &[(&str, SocketAddr)], extra: &str) -> Self {
        let world = World::new();
        let dev = world.device("dev", services);
        dev.append_config("[network]\nmdns = false\n");
        if !extra.is_empty() {
            dev.append_config(extra);
        }
        let client = world.client("cli");
        dev.add_user("owner", &client.fingerprint(), "Owner");
        let device = dev.start();
        client.pin("dev", &device);
        Self {
            world,
            dev,
            device,
            client,
        }
    }

    /// `tunnel-client open dev -L …`.
    pub(crate) fn open(&self, forwards: &[&str]) -> RunningOpen {
        self.client.open("dev", forwards, &[])
    }

    /// Starts the device again on the same address (after it died).
    pub(crate) fn restart_device(&mut self) {
        let addr = self.device.addr.to_string();
        self.device = self.dev.start_with(&["--listen", &addr]);
    }
}

/// What a download through a tunnel got.
#[derive(Debug)]
pub(crate) struct Got {
    pub bytes: u64,
    pub sha256: String,
    pub took: Duration,
    /// How the stream ended: `None` for a clean end of data, else the error kind.
    pub error: Option<std::io::ErrorKind>,
}

/// Reads everything `local` sends (the tunnel's local end of a `TestServer::source`), hashing
/// it; `on_bytes` sees the running count after each read.
pub(crate) fn download(local: SocketAddr, mut on_bytes: impl FnMut(u64)) -> Got {
    let t0 = Instant::now();
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut error = None;
    match TcpStream::connect(local) {
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        hasher.update(&buf[..n]);
                        bytes += n as u64;
                        on_bytes(bytes);
                    }
                    Err(e) => {
                        error = Some(e.kind());
                        break;
                    }
                }
            }
        }
        Err(e) => error = Some(e.kind()),
    }
    Got {
        bytes,
        sha256: hex::encode(hasher.finalize()),
        took: t0.elapsed(),
        error,
    }
}
