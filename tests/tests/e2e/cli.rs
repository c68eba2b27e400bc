//! The command-line contract: exit codes, messages, file modes, self-test.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use tunnel_testkit::servers::TestServer;
use tunnel_testkit::{World, bin};

use crate::stderr;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn usage_and_config_errors_exit_2_with_a_message() {
    let world = World::new();
    let dev_home = world.path("nodev");
    let out = tunnel_testkit::run("tunnel-device", &dev_home, &["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not initialised"), "{}", stderr(&out));

    let out = tunnel_testkit::run("tunnel-device", &dev_home, &["bogus"]);
    assert_eq!(out.status.code(), Some(2));
    let out = tunnel_testkit::run(
        "tunnel-device",
        &dev_home,
        &["user", "add", "bob", "--fingerprint", "abc"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("expected 64 hex characters"),
        "{}",
        stderr(&out)
    );

    let client = world.client("cli");
    let out = client.cmd(&["open", "nosuch", "-L", "0:ssh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no known device matches 'nosuch'"),
        "{}",
        stderr(&out)
    );
    let out = client.cmd(&["open", "nosuch", "-L", "ssh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("[BIND:]PORT:SERVICE"),
        "{}",
        stderr(&out)
    );
    let out = client.cmd(&[
        "device",
        "add",
        "cam",
        "--addr",
        "10.0.0.1",
        "--fingerprint",
        &"a".repeat(64),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("HOST:PORT"), "{}", stderr(&out));

    // A device config with a typo names the file and the line.
    let dev = world.device("dev", &[]);
    dev.append_config("lisen = [\"127.0.0.1:1\"]\n");
    let out = dev.cmd(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("device.toml") && err.contains("unknown field") && err.contains("line"),
        "{err}"
    );
}

/// One cause, one exit status, whichever command meets it (issue 8: a missing key file exited 2
/// from `run` and 1 from the file commands).
#[test]
fn the_same_cause_exits_with_the_same_status_from_every_command() {
    let world = World::new();
    let dev = world.device("dev", &[]);
    std::fs::remove_file(dev.home.join("device.key")).unwrap();
    for args in [
        &["run"][..],
        &["fingerprint"],
        &["pairing", "string", "--addr", "127.0.0.1:5592"],
    ] {
        let out = dev.cmd(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("device.key"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // A state file others can read: refused the same way by the daemon and the file commands.
    let dev = world.device("dev2", &[]);
    let state = dev.home.join("state.json");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).unwrap();
    for args in [&["run"][..], &["user", "list"]] {
        let out = dev.cmd(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("too open"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn unprotected_key_and_corrupt_state_are_refused() {
    let world = World::new();
    let client = world.client("cli");
    client.fingerprint();
    let key = client.home.join("client.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = client.cmd(&["fingerprint"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("UNPROTECTED PRIVATE KEY FILE"),
        "{}",
        stderr(&out)
    );

    let dev = world.device("dev", &[]);
    let state = dev.home.join("state.json");
    let text = std::fs::read(&state).unwrap();
    std::fs::write(&state, &text[..text.len() / 2]).unwrap();
    let out = dev.cmd(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("corrupt"), "{}", stderr(&out));
    // Management commands refuse it too, and leave it as it was.
    let out = dev.cmd(&["user", "add", "eve", "--fingerprint", &"b".repeat(64)]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read(&state).unwrap(), &text[..text.len() / 2]);
}

#[test]
fn homes_are_private_whatever_the_umask() {
    let world = World::new();
    let home = world.path("dev");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000 && exec '{}' --home '{}' init --listen 127.0.0.1:0",
            bin("tunnel-device").display(),
            home.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(mode(&home), 0o700);
    assert_eq!(mode(&home.join("device.key")), 0o600);
    assert_eq!(mode(&home.join("state.json")), 0o600);

    let chome = world.path("cli");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000 && exec '{}' --home '{}' fingerprint",
            bin("tunnel-client").display(),
            chome.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(mode(&chome), 0o700);
    assert_eq!(mode(&chome.join("client.key")), 0o600);
}

#[test]
fn self_test_reports_each_service() {
    let echo = TestServer::echo();
    // Below 1024: no test (nor an ephemeral port) takes it.
    let closed: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let world = World::new();
    let dev = world.device("dev", &[("up", echo.addr), ("down", closed)]);
    let out = dev.cmd(&["run", "--self-test"]);
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8_lossy(&out.stdout);
    let up = table.lines().find(|l| l.starts_with("up ")).unwrap();
    let down = table.lines().find(|l| l.starts_with("down ")).unwrap();
    assert!(up.contains("yes"), "{table}");
    assert!(down.contains("NO"), "{table}");

    dev.ok(&["service", "remove", "down"]);
    let out = dev.cmd(&["run", "--self-test"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn every_subcommand_has_help() {
    for (b, cmds) in [
        (
            "tunnel-device",
            &["init", "run", "fingerprint", "service", "user"][..],
        ),
        (
            "tunnel-client",
            &[
                "fingerprint",
                "device",
                "devices",
                "forget",
                "services",
                "open",
            ][..],
        ),
    ] {
        for c in cmds {
            let out = Command::new(bin(b)).args([c, "--help"]).output().unwrap();
            assert!(out.status.success(), "{b} {c} --help");
            assert!(out.stdout.len() > 100, "{b} {c} --help is too short");
        }
    }
}

/// Completions and man pages come from each binary's own clap definition (issue 12).
#[test]
fn completions_and_man_pages_follow_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    for (name, sub) in [
        ("tunnel-device", "rotate-token"),
        ("tunnel-client", "stdio"),
        ("tunnel-relay", "fingerprint"),
    ] {
        for shell in ["bash", "zsh", "fish"] {
            let out = Command::new(bin(name))
                .args(["completions", shell])
                .output()
                .unwrap();
            assert!(out.status.success(), "{name} completions {shell}");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(sub), "{name} {shell} completions lack {sub}");
        }
        let out = Command::new(bin(name))
            .args(["man", "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} man: {}", stderr(&out));
        let page = std::fs::read_to_string(dir.path().join(format!("{name}.1"))).unwrap();
        assert!(page.contains(&format!(".TH {name} 1")), "{page}");
    }
    let up = std::fs::read_to_string(dir.path().join("tunnel-client-up.1")).unwrap();
    assert!(up.contains("forwards.toml"), "{up}");
    let out = Command::new(bin("tunnel-client"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
