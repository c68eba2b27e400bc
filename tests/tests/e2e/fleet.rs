//! A relay fleet on a real `redis-server` (issue 11), with the real binaries on loopback: a
//! device attached to relay B is reached by a client that asks relay A (A looks the device up in
//! Redis, checks the token's proof against the hashes there, and redirects; the client follows
//! only to a relay it knows for the device, and A ignores entries not signed by the relay they
//! name); B killed, the device re-attaches
//! to A and the client's `open` recovers without a restart; Redis stopped, A still serves the
//! device attached to it, and a relay that does not have the device says the registry is down.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tunnel_testkit::servers::TestServer;
use tunnel_testkit::{RelayFixture, RunningOpen, RunningRelay, SOON, World, wait_for};

use crate::stderr;

/// A `redis-server` on a free loopback port, no persistence; killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is required (bash .ci/run installs it)");
        let r = Self { child, port };
        wait_for("redis-server to answer PING", SOON, || {
            (r.command("PING") == "+PONG").then_some(())
        });
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// One inline command; the first line of the answer ("" when unreachable).
    fn command(&self, cmd: &str) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(format!("{cmd}\r\n").as_bytes()).is_err() {
            return String::new();
        }
        let mut line = String::new();
        let _ = BufReader::new(&mut s).read_line(&mut line);
        line.trim_end().to_string()
    }

    /// `GET key`: the value, or `None` (nil or unreachable).
    fn get(&self, key: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        s.write_all(format!("GET {key}\r\n").as_bytes()).ok()?;
        let mut r = BufReader::new(s);
        let mut head = String::new();
        r.read_line(&mut head).ok()?;
        head.strip_prefix('$')?.trim().parse::<usize>().ok()?;
        let mut value = String::new();
        r.read_line(&mut value).ok()?;
        Some(value.trim_end().to_string())
    }

    /// `SET key value EX secs` (RESP, so the value may hold anything).
    fn set(&self, key: &str, value: &str, secs: u64) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let ttl = secs.to_string();
        let mut cmd = String::from("*5\r\n");
        for part in ["SET", key, value, "EX", &ttl] {
            cmd.push_str(&format!("${}\r\n{part}\r\n", part.len()));
        }
        if s.write_all(cmd.as_bytes()).is_err() {
            return String::new();
        }
        let mut line = String::new();
        let _ = BufReader::new(&mut s).read_line(&mut line);
        line.trim_end().to_string()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port free on loopback for both UDP and TCP now.
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn fleet_relay(world: &World, name: &str, redis: &Redis) -> (RelayFixture, String) {
    let home = world.relay(name);
    let addr = format!("127.0.0.1:{}", free_port());
    home.append_config(&format!(
        "[fleet]\nredis = \"{}\"\nadvertise = \"{addr}\"\nttl_secs = 6\n",
        redis.url()
    ));
    (home, addr)
}

fn echo_ok(open: &RunningOpen) -> bool {
    let Ok(mut s) = TcpStream::connect(open.local("echo")) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let payload = [0x5a_u8; 4096];
    if s.write_all(&payload).is_err() {
        return false;
    }
    let mut back = [0u8; 4096];
    s.read_exact(&mut back).is_ok() && back == payload
}

#[test]
fn a_fleet_redirects_to_the_relay_that_has_the_device_and_survives_a_relay_and_redis() {
    let world = World::new();
    let mut redis = Redis::start(&world.path("redis"));
    let echo = TestServer::echo();
    let (home_a, addr_a) = fleet_relay(&world, "relay-a", &redis);
    let (home_b, addr_b) = fleet_relay(&world, "relay-b", &redis);
    let dev = world.device("dev", &[("echo", echo.addr)]);
    dev.append_config(
        "[network]\nmdns = false\nrelay_attach = \"one\"\n[transport]\nhole_punching = false\n",
    );
    let device_id = dev.device_id();
    // Both relays serve the device from their start.
    home_a.serve(&device_id, &dev.fingerprint());
    home_b.serve(&device_id, &dev.fingerprint());
    let relay_a = home_a.start_in(None, &addr_a);
    let relay_b: RunningRelay = home_b.start_in(None, &addr_b);
    // B first: the device attaches there, A is its standby.
    for (addr, relay) in [(&addr_b, &relay_b), (&addr_a, &relay_a)] {
        dev.ok(&["relay", "add", addr, "--fingerprint", &relay.fingerprint]);
    }
    let client = world.client("cli");
    dev.add_user("alice", &client.fingerprint(), "Owner");
    let mut device = dev.start();
    dev.wait_attached_to(&mut device, &addr_b);
    // B recorded it in the registry, under B's key, with the token's hash (never the token).
    let key = format!("tunnel-relay:device:{device_id}");
    let entry = wait_for("B's registry entry", SOON, || redis.get(&key));
    assert!(
        entry.contains(&relay_b.fingerprint) && entry.contains(&addr_b),
        "{entry}"
    );
    assert!(
        !entry.contains(&dev.token("alice")),
        "a token in the registry: {entry}"
    );

    // Issue 18, defect 7: a client that knows only relay A is redirected to B, which it does
    // not know for the device: it refuses, and sends B nothing.
    client.pin_relayed(
        "only-a",
        &device,
        &device_id,
        (&addr_a, &relay_a.fingerprint),
        &[],
        Some(&dev.token("alice")),
    );
    let out = client.cmd(&["services", "only-a"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not one of this device's relays"),
        "{}",
        stderr(&out)
    );
    assert!(
        !relay_b.proc.log().contains("client connected"),
        "the client reached B"
    );
    // A forged entry (B's, with an attacker's address and key, as a Redis writer can make it)
    // is ignored by A: nothing reaches the attacker.
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    attacker.set_nonblocking(true).unwrap();
    let attacker_addr = attacker.local_addr().unwrap().to_string();
    let forged = entry
        .replace(&addr_b, &attacker_addr)
        .replace(&relay_b.fingerprint, &"ab".repeat(32));
    wait_for("A to ignore the forged entry", SOON, || {
        assert_eq!(redis.set(&key, &forged, 6), "+OK");
        let out = client.cmd(&["services", "only-a"]);
        assert!(!out.status.success(), "connected through a forged entry");
        relay_a.proc.log().contains("is ignored").then_some(())
    });
    let mut buf = [0u8; 2048];
    assert!(
        attacker.recv_from(&mut buf).is_err(),
        "the attacker's address got a datagram"
    );
    // B's next refresh puts its signed entry back.
    wait_for("B to rewrite its entry", SOON, || {
        redis.get(&key).filter(|e| e.contains(&addr_b))
    });

    // A paired client knows all of the device's relays (the device names them): A's redirect to
    // B is followed.
    client.ok(&[
        "device",
        "add",
        "cam",
        "--fingerprint",
        &device.fingerprint,
        "--device-id",
        &device_id,
        "--relay",
        &addr_a,
        "--relay-fingerprint",
        &relay_a.fingerprint,
        "--relay",
        &addr_b,
        "--relay-fingerprint",
        &relay_b.fingerprint,
        "--sct",
        &dev.token("alice"),
    ]);
    let mut open = client.open("cam", &["0:echo"], &[]);
    let path = open.wait_path();
    assert_eq!(path, format!("relayed via {addr_b}"), "redirected to B");
    assert!(echo_ok(&open), "no echo through the redirect");
    assert!(
        relay_a.proc.log().contains("client redirected"),
        "{}",
        relay_a.proc.log()
    );

    // A wrong token learns nothing: refused at A, against the registry's hashes.
    client.pin_relayed(
        "cam-bad",
        &device,
        &device_id,
        (&addr_a, &relay_a.fingerprint),
        &[],
        Some("not-the-token"),
    );
    let out = client.cmd(&["services", "cam-bad"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refused the token"),
        "{}",
        stderr(&out)
    );

    // B dies: the device moves to A, and the same `open` carries data again.
    drop(relay_b);
    dev.wait_attached_to(&mut device, &addr_a);
    wait_for("A's registry entry", SOON, || {
        redis.get(&key).filter(|e| e.contains(&relay_a.fingerprint))
    });
    wait_for("the open to recover after B died", SOON, || {
        echo_ok(&open).then_some(())
    });

    // Redis stops: A keeps serving the device attached to it, to a new `open` too.
    redis.stop();
    assert!(echo_ok(&open), "the live tunnel broke when Redis stopped");
    let mut second = client.open("cam", &["0:echo"], &[]);
    assert_eq!(second.wait_path(), format!("relayed via {addr_a}"));
    assert!(echo_ok(&second), "a new open failed with Redis down");

    // B again, with nothing attached and no registry: it says why it cannot help.
    let _relay_b = home_b.start_in(None, &addr_b);
    client.pin_relayed(
        "via-b",
        &device,
        &device_id,
        (&addr_b, &home_b.fingerprint()),
        &[],
        Some(&dev.token("alice")),
    );
    let out = client.cmd(&["services", "via-b"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("registry"), "{err}");
}
