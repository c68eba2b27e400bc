//! Regression tests of issue 9 that need the real binaries: files another local user could
//! change (StrictModes), secrets kept off the command line, and escape sequences from a lying
//! device.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use tunnel_testkit::hostile;
use tunnel_testkit::servers::TestServer;
use tunnel_testkit::{SOON, World, bin, wait_for};

use crate::{setup, stderr};

fn chmod(p: &std::path::Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Defect 7: a world-writable home, device.toml or iam.toml, or a symlinked one, was trusted; a
/// permissive iam.toml dropped by another user was reloaded within half a second.
#[test]
fn files_others_could_change_are_refused_at_start_and_on_reload() {
    let world = World::new();
    let dev = world.device("dev", &[]);
    let expect_refused = |what: &str| {
        let out = dev.cmd(&["run", "--listen", "127.0.0.1:0"]);
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        stderr(&out)
    };
    chmod(&dev.home, 0o777);
    assert!(expect_refused("home 0777").contains("writable by group or others"));
    chmod(&dev.home, 0o700);
    let cfg = dev.home.join("device.toml");
    chmod(&cfg, 0o666);
    assert!(expect_refused("device.toml 0666").contains("device.toml"));
    chmod(&cfg, 0o600);
    let iam = dev.home.join("iam.toml");
    std::fs::write(&iam, tunnel_shared::iam::DEFAULT_IAM_TOML).unwrap();
    chmod(&iam, 0o666);
    assert!(expect_refused("iam.toml 0666").contains("iam.toml"));
    std::fs::remove_file(&iam).unwrap();
    let real = world.path("elsewhere.toml");
    std::fs::rename(&cfg, &real).unwrap();
    std::os::unix::fs::symlink(&real, &cfg).unwrap();
    assert!(expect_refused("symlinked device.toml").contains("symbolic link"));
    std::fs::remove_file(&cfg).unwrap();
    std::fs::rename(&real, &cfg).unwrap();

    // While it runs: an iam.toml that gives the unpaired role everything, dropped world-writable
    // by "another user", is not loaded, and an unknown key stays unknown.
    let running = dev.start();
    let evil = tunnel_shared::iam::DEFAULT_IAM_TOML.replace(
        "policies = [\"Pairing\"]",
        "policies = [\"Pairing\", \"ManageAll\", \"Tunnel\"]",
    );
    std::fs::write(&iam, evil).unwrap();
    chmod(&iam, 0o666);
    wait_for("the loose iam.toml to be refused", SOON, || {
        running
            .proc
            .log()
            .contains("iam.toml changed but cannot be used")
            .then_some(())
    });
    assert!(running.proc.log().contains("writable by group or others"));
    let stranger = world.client("stranger");
    stranger.pin("dev", &running);
    let out = stranger.cmd(&["services", "dev"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not know your key"),
        "{}",
        stderr(&out)
    );
}

fn run_with_stdin(home: &std::path::Path, args: &[&str], input: &str) -> std::process::Output {
    let mut child = Command::new(bin("tunnel-client"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("TUNNEL_PAIRING_STRING")
        .env_remove("TUNNEL_SCT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Defect 8: the pairing string and tokens could only be given as arguments, readable by every
/// local user in /proc/PID/cmdline.
#[test]
fn secrets_can_come_from_stdin_files_and_the_environment() {
    let echo = TestServer::echo();
    let s = setup(&[("echo", echo.addr)]);
    let fp = s.device.fingerprint.clone();
    let addr = s.device.addr.to_string();
    let token = "abcdefghijkmnopq";
    let out = run_with_stdin(
        &s.client.home,
        &[
            "device",
            "add",
            "viastdin",
            "--addr",
            &addr,
            "--fingerprint",
            &fp,
            "--sct",
            "-",
        ],
        &format!("{token}\n"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    let file = s.world.path("token");
    std::fs::write(&file, token).unwrap();
    let out = s.client.cmd(&[
        "device",
        "add",
        "viafile",
        "--addr",
        &addr,
        "--fingerprint",
        &fp,
        "--sct-file",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The argument form still works, and says why it is a bad idea.
    let out = s.client.cmd(&[
        "device",
        "add",
        "viaarg",
        "--addr",
        &addr,
        "--fingerprint",
        &fp,
        "--sct",
        token,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("can be read by every local user"),
        "{}",
        stderr(&out)
    );
    let known = std::fs::read_to_string(s.client.home.join("known_devices.toml")).unwrap();
    assert_eq!(known.matches(token).count(), 3, "{known}");

    // A pairing string on stdin.
    let string = s
        .device_home
        .ok(&["user", "invite", "bob", "--addr", &addr])
        .lines()
        .find_map(|l| l.trim().strip_prefix("tp1,").map(|r| format!("tp1,{r}")))
        .expect("a pairing string");
    s.device_home.ok(&["pairing", "enable", "password-invite"]);
    let bob = s.world.client("bob");
    // The running device picks the switch up within half a second.
    let out = wait_for("the device to offer password invite pairing", SOON, || {
        let out = run_with_stdin(&bob.home, &["pair", "-", "--name", "cam"], &string);
        (out.status.success() || !stderr(&out).contains("does not know your key")).then_some(out)
    });
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("as user 'bob'"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Defect 9: a device's id, name and error texts reached the terminal raw, so a fake device could
/// clear the screen and forge "verified" text after the fingerprint line.
#[test]
fn a_lying_device_cannot_reach_the_terminal() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (addr, fp) = rt.block_on(hostile::escape_device());
    let world = World::new();
    let client = world.client("victim");
    let mut shown = String::new();
    for args in [
        vec!["pair", "--addr", &addr.to_string(), "--username", "bob"],
        vec![
            "pair",
            "--addr",
            &addr.to_string(),
            "--fingerprint",
            &fp,
            "--name",
            "fake",
        ],
    ] {
        let out = client.cmd(&args.iter().map(|s| &**s).collect::<Vec<_>>());
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{all}");
        assert!(
            !all.contains('\x1b') && !all.contains('\x07') && !all.contains('\r'),
            "{all:?}"
        );
        assert!(!all.contains('\u{202e}'), "{all:?}");
        shown.push_str(&all);
    }
    assert!(
        shown.contains("\\u{1b}"),
        "the device's text is shown, escaped: {shown:?}"
    );
    client.pin_raw("fake", &addr.to_string(), &fp);
    for args in [&["services", "fake"][..], &["services", "fake", "--json"]] {
        let out = client.cmd(args);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains('\x1b'), "{all:?}");
    }
    drop(rt);
}
