//! Pairing and access control end to end, with the real binaries: the printed pairing string,
//! an owner inviting a guest, local versus remote (a network namespace on a TEST-NET address),
//! removal cutting a live tunnel, mDNS discovery, and the `pairing` / `iam` commands.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};

use tunnel_shared::client::KnownDevices;
use tunnel_shared::config::HostPort;
use tunnel_testkit::netns::NetNs;
use tunnel_testkit::servers::{Sshd, TestServer};
use tunnel_testkit::{SOON, World, wait_for};

use crate::stderr;

pub(crate) fn pairing_line(stdout: &str) -> String {
    stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("tp1,"))
        .unwrap_or_else(|| panic!("no pairing string in:\n{stdout}"))
        .to_string()
}

fn echo_through(addr: std::net::SocketAddr) -> std::io::Result<()> {
    let mut c = TcpStream::connect(addr)?;
    c.write_all(b"ping")?;
    let mut b = [0u8; 4];
    c.read_exact(&mut b)?;
    assert_eq!(&b, b"ping");
    Ok(())
}

#[test]
fn init_prints_a_pairing_string_that_pairs_and_then_ssh_works() {
    let scratch = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(&scratch.path().join("sshd"))
        .expect("OpenSSH is required (bash .ci/run installs it)");
    let world = World::new();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let home = world.path("dev");
    let out = tunnel_testkit::run_ok(
        "tunnel-device",
        &home,
        &[
            "init",
            "--device-id",
            "cam-1",
            "--listen",
            &listen,
            // Wrong from where the client stands (as behind a port forward): `pair --addr`
            // overrides it below.
            "--addr",
            "192.0.2.1:5592",
            "--service",
            &format!("ssh={}", sshd.addr),
        ],
    );
    assert!(
        out.contains("Invitation for the first user 'owner' (role Owner)"),
        "{out}"
    );
    let string = pairing_line(&out);
    let dev = tunnel_testkit::DeviceFixture::from_path(home, world.root.path());
    let _device = dev.start_with(&[]);

    let client = world.client("laptop");
    // A --fingerprint that contradicts the string's pin is refused before anything is sent.
    let wrong_fp = world.client("other").fingerprint();
    let out = client.cmd(&[
        "pair",
        &string,
        "--addr",
        &listen,
        "--fingerprint",
        &wrong_fp,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("differs from the pairing string"),
        "{}",
        stderr(&out)
    );
    let paired = client.ok(&["pair", &string, "--name", "cam", "--addr", &listen]);
    assert!(
        paired
            .contains("Paired with 'cam' as user 'owner' (role Owner) by password-invite pairing"),
        "{paired}"
    );
    // The pairing pinned the device and stored the user's token.
    let known = KnownDevices::load(&client.home.join("known_devices.toml")).unwrap();
    let cam = known.find("cam").unwrap();
    assert_eq!(cam.user.as_deref(), Some("owner"));
    assert!(cam.sct.is_some());
    assert_eq!(cam.fingerprint.to_string(), dev.fingerprint());
    assert_eq!(
        cam.addresses,
        vec![listen.parse().unwrap()],
        "--addr was not pinned"
    );

    // The invitation worked once: another key with the same string is refused.
    let other = world.client("intruder");
    let out = other.cmd(&["pair", &string, "--addr", &listen]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("wrong password"), "{}", stderr(&out));

    let open = client.open("cam", &["0:ssh"], &[]);
    let out = sshd.exec(open.local("ssh").port(), "echo paired-ssh-ok");
    assert_eq!(out, "paired-ssh-ok\n");
}

#[test]
fn a_guest_tunnels_locally_but_not_remotely_and_removal_cuts_its_tunnel() {
    let echo = TestServer::echo();
    let ns = NetNs::create();
    let world = World::new();
    let dev = world.device_init("dev", &[("echo", echo.addr)], &[]);
    let device = dev.start_with(&["--listen", "0.0.0.0:0"]);
    let local_addr = format!("127.0.0.1:{}", device.addr.port());

    // The owner pairs with the owner invitation.
    let owner = world.client("owner");
    let s = pairing_line(&dev.ok(&["pairing", "string", "owner", "--addr", &local_addr]));
    owner.ok(&["pair", &s, "--name", "dev"]);

    // The owner invites a guest over the channel; the guest pairs with that string.
    let out = owner.ok(&["user", "dev", "invite", "guest", "--role", "Guest"]);
    assert!(out.contains("Invited 'guest' (role Guest)"), "{out}");
    let guest = world.client("guest");
    let paired = guest.ok(&["pair", &pairing_line(&out), "--name", "dev"]);
    assert!(paired.contains("as user 'guest' (role Guest)"), "{paired}");
    let users = owner.ok(&["user", "dev", "list"]);
    assert!(
        users.contains("guest") && users.contains("Guest"),
        "{users}"
    );

    // Locally the guest may tunnel.
    let local_open = guest.open("dev", &["0:echo"], &[]);
    echo_through(local_open.local("echo")).unwrap();

    // From the namespace (a TEST-NET address: remote) it may connect, with its token, but not
    // tunnel.
    let known_path = guest.home.join("known_devices.toml");
    let mut known = KnownDevices::load(&known_path).unwrap();
    let mut remote = known.find("dev").unwrap().clone();
    remote.name = "dev-remote".into();
    remote.addresses = vec![
        format!("{}:{}", ns.host_ip, device.addr.port())
            .parse::<HostPort>()
            .unwrap(),
    ];
    known.devices.push(remote);
    known.save(&known_path).unwrap();
    let remote_open = guest.open_in(
        Some(&ns),
        "dev-remote",
        &[&format!("{}:0:echo", ns.ns_ip)],
        &[],
    );
    let mut c = TcpStream::connect(remote_open.local("echo")).unwrap();
    assert!(
        tunnel_testkit::saw_reset(&mut c, b"ping"),
        "expected a reset"
    );
    let mut b = [0u8; 4];
    wait_for("the refusal in the client log", SOON, || {
        remote_open
            .proc
            .log()
            .contains("refused the tunnel to 'echo': forbidden")
            .then_some(())
    });
    assert!(
        device.proc.log().contains("local=false"),
        "the device should see a remote connection"
    );

    // The owner removes the guest: its live local tunnel is cut, and its `open` stops.
    let mut live = TcpStream::connect(local_open.local("echo")).unwrap();
    live.write_all(b"ping").unwrap();
    live.read_exact(&mut b).unwrap();
    owner.ok(&["user", "dev", "remove", "guest"]);
    let mut rest = [0u8; 16];
    let end = loop {
        match live.read(&mut rest) {
            Ok(0) => break None,
            Ok(_) => {}
            Err(e) => break Some(e.kind()),
        }
    };
    assert_eq!(end, Some(ErrorKind::ConnectionReset));
    let mut local_open = local_open;
    assert_eq!(local_open.proc.wait_exit(SOON).code(), Some(1));
    assert!(
        local_open.proc.log().contains("revoked"),
        "{}",
        local_open.proc.log()
    );
}

#[test]
fn discovery_finds_the_device_and_local_open_pairing_works() {
    let echo = TestServer::echo();
    let ns = NetNs::create();
    let world = World::new();
    let id = format!("disco-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let dev = world.device_init("dev", &[("echo", echo.addr)], &["--no-invite"]);
    // Our namespace link counts as local for this device; only local open pairing is on.
    dev.append_config(&format!(
        "[network]\nlocal_networks = [\"{}/30\"]\n",
        ns.ns_ip
    ));
    let toml = std::fs::read_to_string(dev.home.join("device.toml")).unwrap();
    std::fs::write(
        dev.home.join("device.toml"),
        toml.replace("device_id = \"dev-id\"", &format!("device_id = \"{id}\"")),
    )
    .unwrap();
    dev.ok(&["pairing", "enable", "local-open"]);
    let _device = dev.start_with(&["--listen", "0.0.0.0:0"]);

    let client = world.client("cli");
    let run = |args: &[&str]| {
        ns.command(tunnel_testkit::bin("tunnel-client"))
            .arg("--home")
            .arg(&client.home)
            .args(args)
            .output()
            .unwrap()
    };
    let found = wait_for("the device to answer mDNS", SOON, || {
        let out = run(&["discover", "--json", "--timeout", "2"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?
            .iter()
            .find(|d| d["device_id"] == id.as_str())
            .cloned()
    });
    assert_eq!(found["fingerprint"], dev.fingerprint());

    let out = run(&[
        "pair",
        "--local",
        "--device",
        &id,
        "--username",
        "bob",
        "--name",
        "found",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains("as user 'bob' (role Guest) by local-open pairing"),
        "{text}"
    );
    assert!(text.contains("trusted on first use"), "{text}");
    let known = KnownDevices::load(&client.home.join("known_devices.toml")).unwrap();
    assert_eq!(
        known.find("found").unwrap().fingerprint.to_string(),
        dev.fingerprint()
    );
}

#[test]
fn pairing_and_iam_commands() {
    let echo = TestServer::echo();
    let world = World::new();
    let dev = world.device("dev", &[("echo", echo.addr)]);
    let status = dev.ok(&["pairing", "status"]);
    for mode in [
        "local-initial",
        "local-open",
        "password-invite",
        "password-open",
    ] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(mode) && l.contains("off")),
            "{status}"
        );
    }
    dev.ok(&["pairing", "enable", "password-open"]);
    assert!(
        dev.ok(&["pairing", "status"])
            .lines()
            .any(|l| l.starts_with("password-open") && l.contains("on"))
    );
    let out = dev.cmd(&["pairing", "enable", "teleport"]);
    assert_eq!(out.status.code(), Some(2));

    let g = world.client("g");
    dev.add_user("g", &g.fingerprint(), "Guest");
    let out = dev.ok(&[
        "iam",
        "explain",
        "--user",
        "g",
        "--action",
        "Tunnel:Connect",
        "--service",
        "echo",
    ]);
    assert!(
        out.starts_with(
            "ALLOW: g (role Guest) may Tunnel:Connect on service 'echo' from a local connection"
        ),
        "{out}"
    );
    assert!(out.contains("policy 'TunnelLocalOnly'"), "{out}");
    let out = dev.cmd(&[
        "iam",
        "explain",
        "--user",
        "g",
        "--action",
        "Tunnel:Connect",
        "--service",
        "echo",
        "--remote",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("deny by default"));

    // The defaults round-trip, and a broken iam.toml is refused with its line.
    let defaults = dev.ok(&["iam", "defaults"]);
    assert_eq!(defaults, tunnel_shared::iam::DEFAULT_IAM_TOML);
    std::fs::write(
        dev.home.join("iam.toml"),
        defaults.replace("\"Tunnel:Connect\"]\n\n", "\"Tunnel:Conect\"]\n\n"),
    )
    .unwrap();
    let out = dev.cmd(&["iam", "check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("iam.toml: line 27: unknown action 'Tunnel:Conect'"),
        "{}",
        stderr(&out)
    );
    let out = dev.cmd(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    // A user whose role iam.toml does not define stops the device too.
    std::fs::write(
        dev.home.join("iam.toml"),
        defaults
            .replace("id = \"Guest\"", "id = \"Visitor\"")
            .replace(
                "open_pairing_role = \"Guest\"",
                "open_pairing_role = \"Visitor\"",
            ),
    )
    .unwrap();
    let out = dev.cmd(&["iam", "check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("user 'g' has role 'Guest'"),
        "{}",
        stderr(&out)
    );
}
