//! `tunnel-client stdio` (issue 12): real OpenSSH with `ProxyCommand` (exec, scp both ways with
//! hashes checked), half-close both ways on a pipe, and refusals with their exit statuses.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tunnel_testkit::bin;
use tunnel_testkit::servers::{HashWriter, Pattern, Sshd, TestServer};

use crate::{setup, stderr};

/// `ssh` through `ProxyCommand='tunnel-client … stdio %h ssh'`, no local port anywhere.
#[test]
fn ssh_and_scp_ride_proxycommand_without_a_local_port() {
    let scratch = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(&scratch.path().join("sshd"))
        .expect("OpenSSH (sshd, ssh, scp) is required (bash .ci/run installs it)");
    let s = setup(&[("ssh", sshd.addr)]);
    let proxy = format!(
        "ProxyCommand={} --home {} stdio %h ssh",
        bin("tunnel-client").display(),
        s.client.home.display()
    );
    let user = sshd.destination();
    let user = user.split('@').next().unwrap();
    // `cam` is the device's name on the client: ssh passes it as %h.
    let ssh = |args: &[&str]| {
        let mut cmd = sshd.ssh_options(22);
        cmd.args(["-o", &proxy])
            .arg(format!("{user}@cam"))
            .args(args);
        cmd
    };

    let out = ssh(&["echo tunnel-ok; uname -s"]).output().unwrap();
    assert!(out.status.success(), "ssh failed: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tunnel-ok\nLinux\n");
    assert!(
        stderr(&out).trim().is_empty(),
        "stdio printed on ssh's terminal: {}",
        stderr(&out)
    );

    // scp (SFTP) both ways, 16 MiB, hashes checked.
    const LEN: u64 = 16 * 1024 * 1024;
    let pattern = Pattern::new(12);
    let local = scratch.path().join("local.bin");
    pattern
        .write_to(&mut std::fs::File::create(&local).unwrap(), LEN)
        .unwrap();
    let remote = scratch.path().join("remote.bin");
    let back = scratch.path().join("back.bin");
    let scp = |from: String, to: String| {
        let key = scratch.path().join("sshd/client_key");
        let out = Command::new("scp")
            .args(["-F", "/dev/null", "-q", "-B", "-i"])
            .arg(&key)
            .args(["-o", &proxy, "-o", "StrictHostKeyChecking=no"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                scratch.path().join("sshd/known_hosts").display()
            ))
            .args([from, to])
            .output()
            .unwrap();
        assert!(out.status.success(), "scp failed: {}", stderr(&out));
    };
    scp(
        local.display().to_string(),
        format!("{user}@cam:{}", remote.display()),
    );
    scp(
        format!("{user}@cam:{}", remote.display()),
        back.display().to_string(),
    );
    for f in [&remote, &back] {
        let mut h = HashWriter::default();
        h.write_all(&std::fs::read(f).unwrap()).unwrap();
        assert_eq!((h.len, h.hex()), (LEN, pattern.sha256(LEN)), "{f:?}");
    }
}

fn stdio(s: &crate::Setup, device: &str, service: &str) -> Command {
    let mut cmd = Command::new(bin("tunnel-client"));
    cmd.arg("--home")
        .arg(&s.client.home)
        .args(["stdio", device, service])
        .env_remove("RUST_LOG");
    cmd
}

/// Our EOF reaches the server (it answers after it), and the server's EOF closes our output.
#[test]
fn half_close_works_both_ways_on_the_pipe() {
    let hasher = TestServer::hasher();
    let source = TestServer::source(3 * 1024 * 1024, 7);
    let s = setup(&[("hash", hasher.addr), ("src", source.addr)]);

    // stdin EOF → the hasher sees EOF, answers, closes → stdout ends, exit 0.
    let pattern = Pattern::new(3);
    let len = 5 * 1024 * 1024 + 17;
    let mut child = stdio(&s, "cam", "hash")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    pattern.write_to(&mut input, len).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "stdio failed: {}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{len} {}\n", pattern.sha256(len))
    );

    // The source sends and closes its side while our stdin stays open: stdout must reach EOF
    // while the process still runs, and closing stdin then ends it cleanly.
    let mut child = stdio(&s, "cam", "src")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = child.stdin.take().unwrap();
    let mut output = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let _ = tx.send(output.read_to_end(&mut got).map(|_| got));
    });
    let got = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("stdout did not reach EOF after the server closed its side")
        .unwrap();
    let mut h = HashWriter::default();
    h.write_all(&got).unwrap();
    assert_eq!(
        (h.len, h.hex()),
        (3 * 1024 * 1024, Pattern::new(7).sha256(3 * 1024 * 1024))
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "stdio exited at the server's EOF although its input was still open"
    );
    drop(input);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "stdio did not exit after its EOF"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit {status}");
}

/// Refusals exit non-zero with a message that says what to do; nothing on stdout.
#[test]
fn refusals_have_messages_and_exit_statuses() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let run = |device: &str, service: &str| {
        stdio(&s, device, service)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run("cam", "nope");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("has no service 'nope'"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());

    let out = run("nosuch", "echo");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no known device matches 'nosuch'"));

    let out = run("cam", "bad service");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // The device's target is down: the message says so.
    drop(echo);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    s.device_home
        .ok(&["service", "add", &format!("gone={dead_addr}")]);
    let refused = tunnel_testkit::wait_for("the device to reload", tunnel_testkit::SOON, || {
        let out = run("cam", "gone");
        (!stderr(&out).contains("has no service")).then_some(out)
    });
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("cannot reach the server behind 'gone'"),
        "{}",
        stderr(&refused)
    );
}
