//! `tunnel-client up` and `forward add|remove|list` (issue 12): one process for the forwards of
//! several devices, reloaded in place by `forward add`, `reload` and SIGHUP without touching the
//! forwards that stay; a bad file changes nothing; one `up` per home; SIGTERM ends it cleanly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tunnel_testkit::servers::TestServer;
use tunnel_testkit::{ClientFixture, Proc, SOON, World, bin, wait_for};

use crate::stderr;

/// A running `up` and its ready file.
struct RunningUp {
    proc: Proc,
    ready: PathBuf,
}

impl RunningUp {
    fn start(world: &World, client: &ClientFixture) -> Self {
        let ready = world.path("up.ready");
        let mut cmd = Command::new(bin("tunnel-client"));
        cmd.arg("--home")
            .arg(&client.home)
            .args(["--log-level", "debug", "up", "--ready-file"])
            .arg(&ready)
            .env_remove("RUST_LOG");
        let mut proc = Proc::spawn("tunnel-client up", cmd, &world.path("up.log"));
        tunnel_testkit::read_ready(&ready, &mut proc);
        Self { proc, ready }
    }

    fn json(&mut self) -> serde_json::Value {
        if let Some(st) = self.proc.try_status() {
            panic!("up exited with {st}: {}", self.proc.log());
        }
        std::fs::read_to_string(&self.ready)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// Waits until the ready file lists exactly `want` as (device, service) forwards, every
    /// device connected; returns each one's local address.
    fn wait_forwards(&mut self, want: &[(&str, &str)]) -> Vec<SocketAddr> {
        wait_for(&format!("up to forward {want:?}"), SOON, || {
            let v = self.json();
            let devices = v["devices"].as_array()?;
            let mut got = Vec::new();
            for d in devices {
                if d["state"] != "connected" {
                    return None;
                }
                for s in d["services"].as_array()? {
                    got.push((
                        d["device"].as_str()?.to_string(),
                        s["service"].as_str()?.to_string(),
                        s["local"].as_str()?.parse::<SocketAddr>().ok()?,
                    ));
                }
            }
            let names: Vec<(&str, &str)> = got
                .iter()
                .map(|(d, s, _)| (d.as_str(), s.as_str()))
                .collect();
            (names == want).then(|| got.iter().map(|g| g.2).collect())
        })
    }
}

fn round_trip(conn: &mut TcpStream, payload: &[u8]) {
    conn.write_all(payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(back, payload);
}

#[test]
fn up_serves_two_devices_and_reloads_only_what_changed() {
    let world = World::new();
    let echo = TestServer::echo();
    let hasher = TestServer::hasher();
    let client = world.client("cli");
    let fp = client.fingerprint();
    let cam = world.device("cam", &[("echo", echo.addr), ("hash", hasher.addr)]);
    let nas = world.device("nas", &[("web", echo.addr)]);
    cam.add_user("alice", &fp, "Owner");
    nas.add_user("alice", &fp, "Owner");
    let cam_run = cam.start();
    let nas_run = nas.start();
    client.pin("cam", &cam_run);
    client.pin("nas", &nas_run);

    // No up yet: forward add edits the file and says how to start one.
    let out = client.ok(&["forward", "add", "cam", "0:echo"]);
    assert!(
        out.contains("Added forward 0:echo to device 'cam'"),
        "{out}"
    );
    assert!(out.contains("`tunnel-client up`"), "{out}");
    // A device reference is stored under the device's name.
    client.ok(&["forward", "add", &cam_run.fingerprint[..16], "0:hash"]);
    let out = client.cmd(&["forward", "add", "tv", "0:echo"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no known device matches 'tv'"));
    let list: serde_json::Value =
        serde_json::from_str(&client.ok(&["forward", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[1]["device"], "cam");
    assert_eq!(list[1]["service"], "hash");

    let mut up = RunningUp::start(&world, &client);
    let locals = up.wait_forwards(&[("cam", "echo"), ("cam", "hash")]);
    let (cam_echo, cam_hash) = (locals[0], locals[1]);
    let mut held = TcpStream::connect(cam_echo).unwrap();
    round_trip(&mut held, b"before any reload");

    // A second `up` for the same home is refused.
    let out = client.cmd(&["up"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));

    // forward add reloads the running up: nas appears, cam's forwards are untouched.
    let out = client.ok(&["forward", "add", "nas", "0:web"]);
    assert!(
        out.contains("Reloaded the running `tunnel-client up`"),
        "{out}"
    );
    let locals = up.wait_forwards(&[("cam", "echo"), ("cam", "hash"), ("nas", "web")]);
    assert_eq!(
        (locals[0], locals[1]),
        (cam_echo, cam_hash),
        "cam's ports moved"
    );
    round_trip(&mut held, b"after nas was added");
    let mut web = TcpStream::connect(locals[2]).unwrap();
    round_trip(&mut web, b"through nas");

    // Removing cam's hash forward closes its port; the held echo connection goes on.
    let out = client.ok(&["forward", "remove", "cam", "0:hash", "--no-reload"]);
    assert!(
        out.contains("Removed forward 0:hash of device 'cam'"),
        "{out}"
    );
    let out = client.ok(&["reload"]);
    assert!(out.contains("re-read forwards.toml"), "{out}");
    up.wait_forwards(&[("cam", "echo"), ("nas", "web")]);
    assert!(
        TcpStream::connect(cam_hash).is_err(),
        "the removed forward still listens"
    );
    round_trip(&mut held, b"after hash was removed");

    // A broken file changes nothing and says why.
    let forwards = client.home.join("forwards.toml");
    let good = std::fs::read_to_string(&forwards).unwrap();
    std::fs::write(&forwards, "[device.cam\nforward = oops\n").unwrap();
    client.ok(&["reload"]);
    wait_for("the reload error in the log", SOON, || {
        up.proc
            .log()
            .contains("forwards.toml not reloaded, the current forwards stay")
            .then_some(())
    });
    up.wait_forwards(&[("cam", "echo"), ("nas", "web")]);
    round_trip(&mut held, b"after a bad reload");

    // SIGHUP applies a fixed file: nas's forward goes, cam's stays.
    std::fs::write(&forwards, good.replace("\"0:web\"", "")).unwrap();
    up.proc.signal("HUP");
    up.wait_forwards(&[("cam", "echo")]);
    assert!(TcpStream::connect(locals[2]).is_err());
    round_trip(&mut held, b"after SIGHUP");
    drop(web);

    // SIGTERM: a clean exit, ready and pid files removed.
    drop(held);
    up.proc.signal("TERM");
    let status = up.proc.wait_exit(SOON);
    assert!(
        status.success(),
        "up exited with {status}: {}",
        up.proc.log()
    );
    assert!(!up.ready.exists(), "the ready file was left behind");
    assert!(!client.home.join("up.pid").exists());
    let out = client.cmd(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no `tunnel-client up` is running"));
}

/// A forward whose port is taken is reported (ready file, exit-free) and retried on reload.
#[test]
fn a_busy_port_is_reported_and_retried_at_the_next_reload() {
    let world = World::new();
    let echo = TestServer::echo();
    let client = world.client("cli");
    let cam = world.device("cam", &[("echo", echo.addr)]);
    cam.add_user("alice", &client.fingerprint(), "Owner");
    let cam_run = cam.start();
    client.pin("cam", &cam_run);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    client.ok(&["forward", "add", "cam", &format!("{port}:echo")]);

    let mut up = RunningUp::start(&world, &client);
    let failed = wait_for("the failed forward in the ready file", SOON, || {
        let v = up.json();
        let f = &v["devices"][0]["failed"][0];
        f["error"].as_str().map(ToString::to_string)
    });
    assert!(failed.contains("cannot listen"), "{failed}");
    drop(busy);
    up.proc.signal("HUP");
    let locals = up.wait_forwards(&[("cam", "echo")]);
    assert_eq!(locals[0].port(), port);
    let mut c = TcpStream::connect(locals[0]).unwrap();
    round_trip(&mut c, b"retried");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
}
