//! Fitting a service manager (issue 12): `sd_notify` readiness, watchdog, reload and stopping
//! from `tunnel-device run`, `tunnel-relay run` and `tunnel-client up`, read off a real
//! `NOTIFY_SOCKET`; `--log-format json` lines.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tunnel_testkit::servers::TestServer;
use tunnel_testkit::{Proc, SOON, World, bin, read_ready};

/// A `NOTIFY_SOCKET` the test reads.
struct Notify {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl Notify {
    fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Self { socket, path }
    }

    /// Gives `cmd` the socket and a 400 ms watchdog.
    fn attach(&self, cmd: &mut Command) {
        cmd.env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", "400000")
            .env_remove("WATCHDOG_PID");
    }

    /// Collects messages until one starts with `want`; returns everything seen up to it.
    fn until(&self, want: &str, proc: &mut Proc) -> Vec<String> {
        let deadline = Instant::now() + SOON;
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while Instant::now() < deadline {
            // Messages first: a process may send its last one and exit at once.
            let Ok(n) = self.socket.recv(&mut buf) else {
                if let Some(st) = proc.try_status() {
                    panic!("{} exited with {st}: {}", proc.name, proc.log());
                }
                continue;
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.starts_with(want);
            seen.push(msg);
            if done {
                return seen;
            }
        }
        panic!(
            "no '{want}' from {} within {SOON:?}; saw {seen:?}",
            proc.name
        );
    }
}

/// READY=1 once serving, WATCHDOG=1 at half the interval, STOPPING=1 on SIGTERM.
fn check_lifecycle(notify: &Notify, proc: &mut Proc, ready_says: &str) {
    let seen = notify.until("READY=1", proc);
    let ready = seen.last().unwrap();
    assert!(ready.contains(ready_says), "{ready}");
    let start = Instant::now();
    notify.until("WATCHDOG=1", proc);
    notify.until("WATCHDOG=1", proc);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "watchdog pings are too slow"
    );
    proc.signal("TERM");
    notify.until("STOPPING=1", proc);
    assert!(proc.wait_exit(SOON).success(), "{}", proc.log());
}

#[test]
fn device_relay_and_up_speak_sd_notify() {
    let world = World::new();
    let echo = TestServer::echo();

    // tunnel-device run
    let dev = world.device("dev", &[("echo", echo.addr)]);
    let notify = Notify::new(world.root.path());
    let mut cmd = Command::new(bin("tunnel-device"));
    cmd.arg("--home")
        .arg(&dev.home)
        .args(["run", "--listen", "127.0.0.1:0"]);
    notify.attach(&mut cmd);
    let mut proc = Proc::spawn("tunnel-device", cmd, &world.path("dev-notify.log"));
    check_lifecycle(&notify, &mut proc, "STATUS=serving dev-id on 127.0.0.1:");

    // tunnel-relay run
    let relay = world.relay("relay");
    let mut cmd = Command::new(bin("tunnel-relay"));
    cmd.arg("--home")
        .arg(&relay.home)
        .args(["run", "--listen", "127.0.0.1:0"]);
    notify.attach(&mut cmd);
    let mut proc = Proc::spawn("tunnel-relay", cmd, &world.path("relay-notify.log"));
    check_lifecycle(&notify, &mut proc, "STATUS=relaying for 0 devices");

    // tunnel-client up, with a reload in between
    let running = dev.start();
    let client = world.client("cli");
    dev.add_user("alice", &client.fingerprint(), "Owner");
    client.pin("cam", &running);
    client.ok(&["forward", "add", "cam", "0:echo"]);
    let ready = world.path("up.ready");
    let mut cmd = Command::new(bin("tunnel-client"));
    cmd.arg("--home")
        .arg(&client.home)
        .args(["up", "--ready-file"])
        .arg(&ready);
    notify.attach(&mut cmd);
    let mut proc = Proc::spawn("tunnel-client up", cmd, &world.path("up-notify.log"));
    read_ready(&ready, &mut proc);
    let seen = notify.until("READY=1", &mut proc);
    assert!(
        seen.last()
            .unwrap()
            .contains("STATUS=1 forwards to 1 devices"),
        "{seen:?}"
    );
    client.ok(&["forward", "add", "cam", "0:echo2", "--no-reload"]);
    client.ok(&["reload"]);
    notify.until("RELOADING=1\nMONOTONIC_USEC=", &mut proc);
    let seen = notify.until("READY=1", &mut proc);
    assert!(
        seen.last()
            .unwrap()
            .contains("STATUS=2 forwards to 1 devices"),
        "{seen:?}"
    );
    check_lifecycle_end(&notify, &mut proc);
}

fn check_lifecycle_end(notify: &Notify, proc: &mut Proc) {
    notify.until("WATCHDOG=1", proc);
    proc.signal("TERM");
    notify.until("STOPPING=1", proc);
    assert!(proc.wait_exit(SOON).success(), "{}", proc.log());
}

/// `--log-format json`: every stderr line is one JSON object with a level and a message.
#[test]
fn json_logs_are_one_object_per_line() {
    let world = World::new();
    let echo = TestServer::echo();
    let dev = world.device("dev", &[("echo", echo.addr)]);
    let ready = world.path("dev.ready");
    let mut cmd = Command::new(bin("tunnel-device"));
    cmd.arg("--home")
        .arg(&dev.home)
        .args(["--log-format", "json", "run", "--listen", "127.0.0.1:0"])
        .arg("--ready-file")
        .arg(&ready)
        .env_remove("RUST_LOG");
    let log = world.path("json.log");
    let mut proc = Proc::spawn("tunnel-device", cmd, &log);
    read_ready(&ready, &mut proc);
    proc.signal("TERM");
    assert!(proc.wait_exit(SOON).success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 2, "{text}");
    for l in &lines {
        assert!(l["level"].is_string() && l["timestamp"].is_string(), "{l}");
    }
    let listening = lines
        .iter()
        .find(|l| l["message"] == "tunnel-device is listening")
        .unwrap_or_else(|| panic!("no listening line: {text}"));
    assert_eq!(listening["device_id"], "dev-id");

    // The same flag on the client and the relay, and a wrong value is a usage error.
    let out = Command::new(bin("tunnel-client"))
        .args(["--log-format", "xml", "devices"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
