//! A file download across two NATs: [`Homes`] with an HTTP server holding one file in home A,
//! reached from home B directly over TCP (a port forward on A's router) and through tunnels
//! (devices in home A, each on its own forwarded UDP port; `open` clients in home B). Used by the
//! reliability harness (network faults) and the benchmark (lossy links against TCP).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use crate::netns::{A_HOST, A_PUBLIC, Homes, Namespace, NatKind};
use crate::servers::{Pattern, hash_reader};
use crate::{ClientFixture, Proc, RunningDevice, RunningOpen, World, have};

/// The HTTP port in home A (forwarded on its router for the direct TCP download).
pub const HTTP_PORT: u16 = 8080;

/// The tools a [`NatLab`] needs; the first one missing, if any.
pub fn missing_tool() -> Option<&'static str> {
    ["ip", "nft", "tc", "curl", "python3"]
        .into_iter()
        .find(|t| !have(t))
}

/// Two homes, a file server in A, and the tunnels added so far.
#[derive(Debug)]
pub struct NatLab {
    /// The namespaces (loss, rate and link faults are set here).
    pub homes: Homes,
    /// Homes and logs of the devices and the client.
    pub world: World,
    /// Size of the file.
    pub len: u64,
    /// Its SHA-256.
    pub want: String,
    client: ClientFixture,
    tunnels: Vec<(RunningDevice, RunningOpen)>,
    _http: Proc,
}

/// One download.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetch {
    /// curl's total time, seconds.
    pub secs: f64,
    /// `None` when the file arrived whole and byte-exact; else what went wrong.
    pub error: Option<String>,
}

impl NatLab {
    /// Builds the homes (UDP `tunnel_ports` and TCP [`HTTP_PORT`] forwarded to A's host) and a
    /// file of `len` bytes of the pattern `seed`, served in A.
    pub fn new(len: u64, seed: u64, tunnel_ports: &[u16]) -> Self {
        let mut forwards: Vec<(&str, u16)> = tunnel_ports.iter().map(|p| ("udp", *p)).collect();
        forwards.push(("tcp", HTTP_PORT));
        let homes = Homes::new(NatKind::Cone, NatKind::Cone, &forwards);
        let world = World::new();
        let www = world.path("www");
        std::fs::create_dir_all(&www).expect("www");
        let pattern = Pattern::new(seed);
        let mut f = std::fs::File::create(www.join("file")).expect("file");
        pattern.write_to(&mut f, len).expect("write file");
        let mut http = homes.a.command("python3".as_ref());
        http.args([
            "-m",
            "http.server",
            &HTTP_PORT.to_string(),
            "--bind",
            A_HOST,
        ])
        .arg("--directory")
        .arg(&www);
        let http = Proc::spawn("http.server", http, &world.path("http.log"));
        crate::wait_for("the HTTP server in home A", crate::SOON, || {
            homes
                .a
                .command("curl".as_ref())
                .args(["-s", "-o", "/dev/null"])
                .arg(format!("http://{A_HOST}:{HTTP_PORT}/"))
                .status()
                .ok()
                .filter(std::process::ExitStatus::success)
        });
        let client = world.client("cli");
        Self {
            homes,
            world,
            len,
            want: pattern.sha256(len),
            client,
            tunnels: Vec::new(),
            _http: http,
        }
    }

    /// Starts a device `name` in home A on UDP `port` (one of the forwarded ports) with extra
    /// `device.toml` settings, pins it in the client, starts `open` in home B, and returns the
    /// URL of the file through it. Connections from B count as local (no token needed).
    pub fn add_tunnel(&mut self, name: &str, port: u16, extra_toml: &str) -> String {
        let dev = self.world.device(
            name,
            &[(
                "web",
                format!("{A_HOST}:{HTTP_PORT}").parse().expect("address"),
            )],
        );
        dev.append_config(&format!(
            "listen = [\"0.0.0.0:{port}\"]\n[network]\nmdns = false\nlocal_networks = \
             [\"0.0.0.0/0\"]\n"
        ));
        if !extra_toml.is_empty() {
            dev.append_config(extra_toml);
        }
        dev.add_user("owner", &self.client.fingerprint(), "Owner");
        let device = dev.start_in(Some(&self.homes.a), &[]);
        self.client
            .pin_raw(name, &format!("{A_PUBLIC}:{port}"), &device.fingerprint);
        let open = self
            .client
            .open_in(Some(&self.homes.b), name, &["127.0.0.1:0:web"], &[]);
        let url = format!("http://{}/file", open.local("web"));
        self.tunnels.push((device, open));
        url
    }

    /// The `open` client of the tunnel added `i`-th.
    pub fn open(&self, i: usize) -> &RunningOpen {
        &self.tunnels[i].1
    }

    /// The URL of the file over plain TCP from home B (through both NATs and the port forward).
    pub fn direct_url() -> String {
        format!("http://{A_PUBLIC}:{HTTP_PORT}/file")
    }

    /// Where downloads are written.
    fn out(&self) -> PathBuf {
        self.world.path("download")
    }

    /// Starts a download of `url` in home B, given up after `max_secs`.
    pub fn start_fetch(&self, url: &str, max_secs: u64) -> Child {
        let out = self.out();
        // A failed download must not leave an older, complete file behind.
        let _ = std::fs::remove_file(&out);
        self.homes
            .b
            .command("curl".as_ref())
            .args(["-s", "-m", &max_secs.to_string(), "-o"])
            .arg(&out)
            .args(["-w", "%{time_total}", url])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("curl")
    }

    /// Bytes of the download under way so far.
    pub fn fetched(&self) -> u64 {
        std::fs::metadata(self.out()).map_or(0, |m| m.len())
    }

    /// Waits for a download and checks it against the file.
    pub fn finish_fetch(&self, child: Child) -> Fetch {
        let o = child.wait_with_output().expect("curl");
        let secs = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(f64::NAN);
        let error = if o.status.success() {
            check(&self.out(), self.len, &self.want)
        } else {
            Some(format!("curl failed ({})", o.status))
        };
        Fetch { secs, error }
    }

    /// Downloads `url` from home B.
    pub fn fetch(&self, url: &str, max_secs: u64) -> Fetch {
        self.finish_fetch(self.start_fetch(url, max_secs))
    }
}

fn check(path: &Path, len: u64, want: &str) -> Option<String> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return Some(format!("no file: {e}")),
    };
    match hash_reader(&mut f) {
        Ok((n, sha)) if n == len && sha == want => None,
        Ok((n, _)) if n != len => Some(format!("{n} of {len} bytes")),
        Ok(_) => Some("SHA-256 mismatch".into()),
        Err(e) => Some(format!("unreadable: {e}")),
    }
}
