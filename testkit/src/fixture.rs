//! Fixtures for the end-to-end tests: a temporary world of device and client homes, driven
//! through the real `tunnel-device` and `tunnel-client` binaries, with readiness from their
//! `--ready-file`s. The names (`DeviceFixture`, `ClientFixture`) are this kit's own, so they cannot
//! be mistaken for the library's `DeviceFixture` and `ClientFixture`.

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};

use tempfile::TempDir;

use crate::SOON;
use crate::netns;
use crate::process::{Proc, bin, read_ready, run, run_ok};

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
    pub fn device(&self, name: &str, services: &[(&str, SocketAddr)]) -> DeviceFixture {
        self.device_init(name, services, &["--no-invite"])
    }

    /// As [`Self::device`], with extra `init` arguments (e.g. none, for the owner invitation).
    pub fn device_init(
        &self,
        name: &str,
        services: &[(&str, SocketAddr)],
        extra: &[&str],
    ) -> DeviceFixture {
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
        DeviceFixture {
            home,
            logs: self.root.path().to_owned(),
        }
    }

    /// A client home `name` (its key is created on first use).
    pub fn client(&self, name: &str) -> ClientFixture {
        ClientFixture {
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
pub struct DeviceFixture {
    /// Its directory.
    pub home: PathBuf,
    logs: PathBuf,
}

impl DeviceFixture {
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
        self.start_in(None, extra)
    }

    /// Starts `tunnel-device run` with extra arguments, inside `ns` when given.
    pub fn start_in(&self, ns: Option<&dyn netns::Namespace>, extra: &[&str]) -> RunningDevice {
        let name = self
            .home
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let ready = self.logs.join(format!("{name}.ready"));
        let _ = fs::remove_file(&ready);
        let mut cmd = match ns {
            Some(ns) => ns.command(bin("tunnel-device").as_os_str()),
            None => Command::new(bin("tunnel-device")),
        };
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
pub struct ClientFixture {
    /// Its directory.
    pub home: PathBuf,
    logs: PathBuf,
}

impl ClientFixture {
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
        ns: Option<&dyn netns::Namespace>,
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
            Some(ns) => ns.command(bin("tunnel-client").as_os_str()),
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
        RunningOpen {
            proc,
            locals,
            ready,
        }
    }
}

impl ClientFixture {
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
    ready: PathBuf,
}

impl RunningOpen {
    /// Waits until it is connected and returns its path (`direct` or `relayed via RELAY`), from
    /// its ready file.
    pub fn wait_path(&mut self) -> String {
        let ready = self.ready.clone();
        crate::wait_for("open to connect", SOON, || {
            if let Some(st) = self.proc.try_status() {
                panic!("tunnel-client open exited with {st}: {}", self.proc.log());
            }
            let v: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(&ready).ok()?).ok()?;
            v["path"].as_str().map(ToString::to_string)
        })
    }

    /// Waits until the ready file's path starts with `want` (e.g. `direct (punched)`, `relayed
    /// via`), within `within`.
    pub fn wait_path_is(&mut self, want: &str, within: std::time::Duration) {
        let ready = self.ready.clone();
        let mut last = String::new();
        let found = crate::try_wait_for(within, || {
            if let Some(st) = self.proc.try_status() {
                panic!("tunnel-client open exited with {st}: {}", self.proc.log());
            }
            let v: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(&ready).ok()?).ok()?;
            last = v["path"].as_str().unwrap_or_default().to_string();
            last.starts_with(want).then_some(())
        });
        assert!(
            found.is_some(),
            "the path stayed '{last}', not '{want}…', for {within:?}: {}",
            self.proc.log()
        );
    }

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

impl ClientFixture {
    /// Runs `tunnel-client` inside namespace `ns` (by name).
    pub fn cmd_in(&self, ns: &str, args: &[&str]) -> Output {
        let (home, args) = (self.home.clone(), owned(args));
        netns::in_ns(ns, move || run("tunnel-client", &home, &borrowed(&args)))
    }

    /// Pins a device reached only through `relay` (and optionally `addrs`), with its id and the
    /// user's token.
    pub fn pin_relayed(
        &self,
        name: &str,
        device: &RunningDevice,
        device_id: &str,
        relay: (&str, &str),
        addrs: &[&str],
        token: Option<&str>,
    ) {
        let mut args = vec![
            "device",
            "add",
            name,
            "--fingerprint",
            &device.fingerprint,
            "--device-id",
            device_id,
            "--relay",
            relay.0,
            "--relay-fingerprint",
            relay.1,
        ];
        for a in addrs {
            args.extend(["--addr", a]);
        }
        if let Some(t) = token {
            args.extend(["--sct", t]);
        }
        self.ok(&args);
    }
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(ToString::to_string).collect()
}

fn borrowed(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

impl World {
    /// Initialises a relay home `name` (it listens on `0.0.0.0:0` unless started otherwise).
    pub fn relay(&self, name: &str) -> RelayFixture {
        let home = self.root.path().join(name);
        run_ok("tunnel-relay", &home, &["init", "--listen", "127.0.0.1:0"]);
        RelayFixture {
            home,
            logs: self.root.path().to_owned(),
        }
    }
}

/// A relay home.
#[derive(Debug, Clone)]
pub struct RelayFixture {
    /// Its directory.
    pub home: PathBuf,
    logs: PathBuf,
}

impl RelayFixture {
    /// Runs `tunnel-relay` with this home.
    pub fn cmd(&self, args: &[&str]) -> Output {
        run("tunnel-relay", &self.home, args)
    }

    /// Runs `tunnel-relay` and asserts success.
    pub fn ok(&self, args: &[&str]) -> String {
        run_ok("tunnel-relay", &self.home, args)
    }

    /// The relay's fingerprint.
    pub fn fingerprint(&self) -> String {
        self.ok(&["fingerprint"]).trim().to_string()
    }

    /// Appends `toml` to `relay.toml`.
    pub fn append_config(&self, toml: &str) {
        let path = self.home.join("relay.toml");
        let mut text = fs::read_to_string(&path).expect("relay.toml");
        text.push('\n');
        text.push_str(toml);
        fs::write(&path, text).expect("relay.toml");
    }

    /// Serves the device of `dev` (its id and key) and adds this running relay to its
    /// `[[relay]]`; returns the device id.
    pub fn attach(&self, dev: &DeviceFixture, relay: &RunningRelay) -> String {
        let device_id = dev.device_id();
        self.serve(&device_id, &dev.fingerprint());
        dev.ok(&[
            "relay",
            "add",
            &relay.addr.to_string(),
            "--fingerprint",
            &relay.fingerprint,
        ]);
        device_id
    }

    /// Serves `device_id` with the key `fingerprint`.
    pub fn serve(&self, device_id: &str, fingerprint: &str) {
        self.ok(&["device", "add", device_id, "--fingerprint", fingerprint]);
    }

    /// Starts `tunnel-relay run --listen LISTEN` (inside `ns` when given) and waits until it
    /// listens.
    pub fn start_in(&self, ns: Option<&dyn netns::Namespace>, listen: &str) -> RunningRelay {
        let name = self
            .home
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let ready = self.logs.join(format!("{name}.ready"));
        let _ = fs::remove_file(&ready);
        let mut cmd = match ns {
            Some(ns) => ns.command(bin("tunnel-relay").as_os_str()),
            None => Command::new(bin("tunnel-relay")),
        };
        cmd.arg("--home")
            .arg(&self.home)
            .args([
                "--log-level",
                "debug",
                "run",
                "--listen",
                listen,
                "--ready-file",
            ])
            .arg(&ready)
            .env_remove("RUST_LOG");
        let mut proc = Proc::spawn(
            &format!("tunnel-relay {name}"),
            cmd,
            &self.logs.join(format!("{name}.log")),
        );
        let json = read_ready(&ready, &mut proc);
        RunningRelay {
            proc,
            addr: json["listen"][0]
                .as_str()
                .expect("listen")
                .parse()
                .expect("addr"),
            tcp: json["tcp"][0].as_str().and_then(|a| a.parse().ok()),
            fingerprint: json["fingerprint"]
                .as_str()
                .expect("fingerprint")
                .to_string(),
        }
    }
}

/// A running relay.
#[derive(Debug)]
pub struct RunningRelay {
    /// The process.
    pub proc: Proc,
    /// Its first UDP address.
    pub addr: SocketAddr,
    /// Its first TCP address (legs from UDP-blocked networks), if it listens on TCP.
    pub tcp: Option<SocketAddr>,
    /// Its fingerprint.
    pub fingerprint: String,
}

impl DeviceFixture {
    /// Removes the top-level key or table `key` from `device.toml`.
    pub fn remove_config(&self, key: &str) {
        let path = self.home.join("device.toml");
        let mut doc: toml_edit::DocumentMut = fs::read_to_string(&path)
            .expect("device.toml")
            .parse()
            .expect("device.toml");
        doc.remove(key);
        fs::write(&path, doc.to_string()).expect("write device.toml");
    }

    /// The device's id (from `device.toml`).
    pub fn device_id(&self) -> String {
        let text = fs::read_to_string(self.home.join("device.toml")).expect("device.toml");
        let doc: toml_edit::DocumentMut = text.parse().expect("device.toml");
        doc["device_id"].as_str().expect("device_id").to_string()
    }

    /// The server-connect token of `user` (from `state.json`).
    pub fn token(&self, user: &str) -> String {
        let text = fs::read_to_string(self.home.join("state.json")).expect("state.json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("state.json");
        v["users"]
            .as_array()
            .expect("users")
            .iter()
            .find(|u| u["username"] == user)
            .and_then(|u| u["sct"].as_str())
            .expect("the user's token")
            .to_string()
    }

    /// The relays' `(addr, state)` in the device's ready file (empty before it is written).
    pub fn relay_states(&self) -> Vec<(String, String)> {
        let name = self
            .home
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let ready = self.logs.join(format!("{name}.ready"));
        let Some(v) = fs::read_to_string(&ready)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        else {
            return Vec::new();
        };
        v["relays"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        (
                            r["addr"].as_str().unwrap_or_default().to_string(),
                            r["state"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the device's relays, as its ready file lists them, satisfy `done`.
    fn wait_relays(
        &self,
        device: &mut RunningDevice,
        what: &str,
        done: impl Fn(&[(String, String)]) -> bool,
    ) {
        crate::wait_for(what, SOON, || {
            if let Some(st) = device.proc.try_status() {
                panic!("tunnel-device exited with {st}: {}", device.proc.log());
            }
            done(&self.relay_states()).then_some(())
        });
    }

    /// Waits until the device is attached to the relay at `addr` (as its ready file says).
    pub fn wait_attached_to(&self, device: &mut RunningDevice, addr: &str) {
        self.wait_relays(device, &format!("the device to attach to {addr}"), |r| {
            r.iter()
                .any(|(a, s)| a == addr && s.starts_with("attached"))
        });
    }

    /// Waits until the running device's ready file says every relay is attached.
    pub fn wait_attached(&self, device: &mut RunningDevice) {
        self.wait_relays(device, "the device to attach to its relays", |r| {
            !r.is_empty() && r.iter().all(|(_, s)| s.starts_with("attached"))
        });
    }
}

/// A relay, a device attached to it and a client (`alice`, an Owner) pinned through it as
/// `cam`, all on loopback.
#[derive(Debug)]
pub struct RelayLab {
    /// The temporary world.
    pub world: World,
    /// The relay's home.
    pub relay_home: RelayFixture,
    /// The running relay.
    pub relay: RunningRelay,
    /// The device's home.
    pub dev: DeviceFixture,
    /// The running device.
    pub device: RunningDevice,
    /// The owner's client.
    pub client: ClientFixture,
    /// The device's id.
    pub device_id: String,
}

impl RelayLab {
    /// Starts the relay and the device (with `services` and `extra` device.toml text), waits
    /// until it is attached, and pins it for the client.
    pub fn new(services: &[(&str, SocketAddr)], extra: &str) -> Self {
        let world = World::new();
        let relay_home = world.relay("relay");
        let relay = relay_home.start_in(None, "127.0.0.1:0");
        let dev = world.device("dev", services);
        dev.append_config(&format!("[network]\nmdns = false\n{extra}"));
        let device_id = relay_home.attach(&dev, &relay);
        let client = world.client("cli");
        dev.add_user("alice", &client.fingerprint(), "Owner");
        let mut device = dev.start();
        dev.wait_attached(&mut device);
        let lab = Self {
            world,
            relay_home,
            relay,
            dev,
            device,
            client,
            device_id,
        };
        lab.pin(
            "cam",
            &lab.relay.addr.to_string(),
            Some(&lab.dev.token("alice")),
        );
        lab
    }

    /// Pins the device as `name`, reached only through the relay at `relay_addr`.
    pub fn pin(&self, name: &str, relay_addr: &str, token: Option<&str>) {
        self.client.pin_relayed(
            name,
            &self.device,
            &self.device_id,
            (relay_addr, &self.relay.fingerprint),
            &[],
            token,
        );
    }

    fn uploads(&self) -> usize {
        self.device
            .proc
            .log()
            .matches("uploading the new token hashes")
            .count()
    }

    /// Runs `change` (a change of the device's users), then waits until the device uploaded
    /// its new token hashes to the relay.
    pub fn change_tokens(&self, change: impl FnOnce()) {
        let before = self.uploads();
        change();
        crate::wait_for("the device to upload its token hashes", SOON, || {
            (self.uploads() > before).then_some(())
        });
    }

    /// `client connected` lines in the device's log so far.
    pub fn connects(&self) -> usize {
        self.device.proc.log().matches("client connected").count()
    }
}
