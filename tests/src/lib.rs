//! Harness for the end-to-end tests: runs the real `tunnel-device` and `tunnel-client` binaries
//! in temporary homes on `127.0.0.1:0`, waits for their `--ready-file`s, and provides small target
//! servers (echo, hash responder, data source) plus a private `sshd` and an HTTP server.
//!
//! Nothing here uses fixed ports or sleeps for synchronization: readiness comes from ready files
//! and listener sockets; waits poll a condition until a deadline. Every child process is killed
//! when its handle drops, so a failing test leaves nothing behind.

#![allow(
    clippy::missing_panics_doc,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: a panic is a test failure with a message"
)]

pub mod netns;
pub mod servers;

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tempfile::TempDir;

/// Generous bound for anything that should happen "soon" (a debug build on 2 loaded cores).
pub const SOON: Duration = Duration::from_secs(30);

/// Path of a workspace binary built next to this test executable.
///
/// # Panics
/// When the binary is missing or older than the sources (build with `cargo build --workspace
/// --bins`, which `.ci/run` does before testing).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
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
    for dir in ["shared/src", "tunnel-device/src", "tunnel-client/src"] {
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

/// A temporary world: device and client homes under one directory.
#[derive(Debug)]
pub struct World {
    /// Root of all files of this test.
    pub root: TempDir,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    /// A fresh world.
    pub fn new() -> Self {
        Self {
            root: tempfile::Builder::new()
                .prefix("tunnel-e2e-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    /// Initialises a device home `name` with `services` (`id` → target), with no invitation and
    /// every pairing mode off (keys are added with `user add`).
    pub fn device(&self, name: &str, services: &[(&str, SocketAddr)]) -> DeviceHome {
        self.device_init(name, services, &["--no-invite"])
    }

    /// As [`Self::device`], with extra `init` arguments (e.g. none, for the owner invitation).
    pub fn device_init(
        &self,
        name: &str,
        services: &[(&str, SocketAddr)],
        extra: &[&str],
    ) -> DeviceHome {
        let home = self.root.path().join(name);
        let mut args = vec![
            "init".to_string(),
            "--device-id".into(),
            format!("{name}-id"),
            "--name".into(),
            format!("Test {name}"),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ];
        for (id, addr) in services {
            args.push("--service".into());
            args.push(format!("{id}={addr}"));
        }
        args.extend(extra.iter().map(ToString::to_string));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok("tunnel-device", &home, &args);
        DeviceHome {
            home,
            logs: self.root.path().to_owned(),
        }
    }

    /// A client home `name` (its key is created on first use).
    pub fn client(&self, name: &str) -> ClientHome {
        ClientHome {
            home: self.root.path().join(name),
            logs: self.root.path().to_owned(),
        }
    }

    /// A path inside the world.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }
}

/// A device home.
#[derive(Debug, Clone)]
pub struct DeviceHome {
    /// Its directory.
    pub home: PathBuf,
    logs: PathBuf,
}

impl DeviceHome {
    /// A home initialised by hand at `home`, with logs under `logs`.
    pub fn from_path(home: PathBuf, logs: &Path) -> Self {
        Self {
            home,
            logs: logs.to_owned(),
        }
    }

    /// Runs `tunnel-device` with this home.
    pub fn cmd(&self, args: &[&str]) -> Output {
        run("tunnel-device", &self.home, args)
    }

    /// Runs `tunnel-device` and asserts success.
    pub fn ok(&self, args: &[&str]) -> String {
        run_ok("tunnel-device", &self.home, args)
    }

    /// The device fingerprint.
    pub fn fingerprint(&self) -> String {
        self.ok(&["fingerprint"]).trim().to_string()
    }

    /// Authorizes a client key.
    pub fn add_user(&self, name: &str, fingerprint: &str, role: &str) {
        self.ok(&[
            "user",
            "add",
            name,
            "--fingerprint",
            fingerprint,
            "--role",
            role,
        ]);
    }

    /// Merges TOML into `device.toml`: every key of every table in `toml` is set (e.g.
    /// `[transport]\nidle_timeout_secs = 5`), the rest of the file is kept.
    pub fn append_config(&self, toml: &str) {
        let path = self.home.join("device.toml");
        let mut doc: toml_edit::DocumentMut = fs::read_to_string(&path)
            .expect("device.toml")
            .parse()
            .expect("device.toml parses");
        let extra: toml_edit::DocumentMut = toml.parse().expect("the snippet parses");
        for (key, item) in extra.iter() {
            match item.as_table() {
                Some(table) => {
                    for (k, v) in table.iter() {
                        doc[key][k] = v.clone();
                    }
                }
                None => doc[key] = item.clone(),
            }
        }
        fs::write(&path, doc.to_string()).expect("write device.toml");
    }

    /// Starts `tunnel-device run` and waits until it listens.
    pub fn start(&self) -> RunningDevice {
        self.start_with(&["--listen", "127.0.0.1:0"])
    }

    /// Starts `tunnel-device run` with extra arguments.
    pub fn start_with(&self, extra: &[&str]) -> RunningDevice {
        let name = self
            .home
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let ready = self.logs.join(format!("{name}.ready"));
        let _ = fs::remove_file(&ready);
        let mut cmd = Command::new(bin("tunnel-device"));
        cmd.arg("--home")
            .arg(&self.home)
            .args(["--log-level", "debug", "run", "--ready-file"])
            .arg(&ready)
            .args(extra)
            .env_remove("RUST_LOG");
        let mut proc = Proc::spawn(
            &format!("tunnel-device {name}"),
            cmd,
            &self.logs.join(format!("{name}.log")),
        );
        let json = read_ready(&ready, &mut proc);
        let addr = json["listen"][0]
            .as_str()
            .expect("listen")
            .parse()
            .expect("addr");
        RunningDevice {
            proc,
            addr,
            fingerprint: json["fingerprint"]
                .as_str()
                .expect("fingerprint")
                .to_string(),
        }
    }
}

/// A running device.
#[derive(Debug)]
pub struct RunningDevice {
    /// The process.
    pub proc: Proc,
    /// Its first UDP address.
    pub addr: SocketAddr,
    /// Its fingerprint.
    pub fingerprint: String,
}

/// A client home.
#[derive(Debug, Clone)]
pub struct ClientHome {
    /// Its directory.
    pub home: PathBuf,
    logs: PathBuf,
}

impl ClientHome {
    /// Runs `tunnel-client` with this home.
    pub fn cmd(&self, args: &[&str]) -> Output {
        run("tunnel-client", &self.home, args)
    }

    /// Runs `tunnel-client` and asserts success.
    pub fn ok(&self, args: &[&str]) -> String {
        run_ok("tunnel-client", &self.home, args)
    }

    /// The client fingerprint.
    pub fn fingerprint(&self) -> String {
        self.ok(&["fingerprint"]).trim().to_string()
    }

    /// Pins `device` as `name`.
    pub fn pin(&self, name: &str, device: &RunningDevice) {
        self.pin_raw(name, &device.addr.to_string(), &device.fingerprint);
    }

    /// Pins an address and fingerprint as `name`.
    pub fn pin_raw(&self, name: &str, addr: &str, fingerprint: &str) {
        self.ok(&[
            "device",
            "add",
            name,
            "--addr",
            addr,
            "--fingerprint",
            fingerprint,
        ]);
    }

    /// Starts `tunnel-client open DEVICE -L …` and waits until it listens.
    pub fn open(&self, device: &str, forwards: &[&str], extra: &[&str]) -> RunningOpen {
        self.open_in(None, device, forwards, extra)
    }

    /// As [`Self::open`], inside a network namespace when `ns` is given.
    pub fn open_in(
        &self,
        ns: Option<&netns::NetNs>,
        device: &str,
        forwards: &[&str],
        extra: &[&str],
    ) -> RunningOpen {
        let name = self
            .home
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let tag = format!("{name}-open-{}", rand::random::<u32>());
        let ready = self.logs.join(format!("{tag}.ready"));
        let mut cmd = match ns {
            Some(ns) => ns.command(bin("tunnel-client")),
            None => Command::new(bin("tunnel-client")),
        };
        cmd.arg("--home")
            .arg(&self.home)
            .args(["--log-level", "debug", "open", device, "--ready-file"])
            .arg(&ready)
            .args(extra)
            .env_remove("RUST_LOG");
        for f in forwards {
            cmd.arg("-L").arg(f);
        }
        let mut proc = Proc::spawn(
            &format!("tunnel-client open {device}"),
            cmd,
            &self.logs.join(format!("{tag}.log")),
        );
        let json = read_ready(&ready, &mut proc);
        let mut locals = HashMap::new();
        for s in json["services"].as_array().expect("services") {
            locals.insert(
                s["service"].as_str().expect("service").to_string(),
                s["local"].as_str().expect("local").parse().expect("addr"),
            );
        }
        RunningOpen { proc, locals }
    }
}

impl ClientHome {
    /// Runs `tunnel-client open` expecting it to exit on its own; returns its status and output.
    pub fn open_until_exit(&self, device: &str, forwards: &[&str]) -> (ExitStatus, String) {
        let name = self
            .home
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let tag = format!("{name}-open-{}", rand::random::<u32>());
        let mut cmd = Command::new(bin("tunnel-client"));
        cmd.arg("--home")
            .arg(&self.home)
            .args(["open", device])
            .env_remove("RUST_LOG");
        for f in forwards {
            cmd.arg("-L").arg(f);
        }
        let mut proc = Proc::spawn(
            &format!("tunnel-client open {device}"),
            cmd,
            &self.logs.join(format!("{tag}.log")),
        );
        let status = proc.wait_exit(SOON);
        (status, proc.log())
    }
}

/// A running `tunnel-client open`.
#[derive(Debug)]
pub struct RunningOpen {
    /// The process.
    pub proc: Proc,
    locals: HashMap<String, SocketAddr>,
}

impl RunningOpen {
    /// The local address forwarding to `service`.
    pub fn local(&self, service: &str) -> SocketAddr {
        *self
            .locals
            .get(service)
            .unwrap_or_else(|| panic!("no forward for {service}"))
    }
}

/// Writes `payload`, then reads to the end: whether either call saw the connection reset. Linux
/// reports a received RST once, to whichever call comes first, so both must be looked at.
pub fn saw_reset(conn: &mut std::net::TcpStream, payload: &[u8]) -> bool {
    use std::io::{ErrorKind, Read, Write};
    if let Err(e) = conn.write_all(payload)
        && matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)
    {
        return true;
    }
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) => return e.kind() == ErrorKind::ConnectionReset,
        }
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
