//! Real peers through the tunnel: OpenSSH and an HTTP server with curl.

use std::io::Write;
use std::process::{Command, Stdio};

use tunnel_testkit::servers::{HashWriter, HttpServer, Pattern, Sshd};

use crate::setup;

#[test]
fn ssh_runs_a_command_and_copies_50_mib_both_ways() {
    let scratch = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(&scratch.path().join("sshd"))
        .expect("OpenSSH (sshd, ssh, ssh-keygen) is required: install openssh-server and openssh-client (bash .ci/run does)");
    let s = setup(&[("ssh", sshd.addr)]);
    let open = s.client.open("cam", &["0:ssh"], &[]);
    let port = open.local("ssh").port();

    let out = sshd.exec(port, "echo tunnel-ok; uname -s");
    assert_eq!(out, "tunnel-ok\nLinux\n");

    const LEN: u64 = 50 * 1024 * 1024;
    let pattern = Pattern::new(50);
    let expected = pattern.sha256(LEN);
    let remote = scratch.path().join("upload.bin");

    // Upload through ssh's stdin.
    let mut child = sshd
        .ssh(port)
        .arg(format!("cat > '{}'", remote.display()))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    pattern.write_to(&mut stdin, LEN).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "upload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut h = HashWriter::default();
    h.write_all(&std::fs::read(&remote).unwrap()).unwrap();
    assert_eq!(
        (h.len, h.hex()),
        (LEN, expected.clone()),
        "uploaded file differs"
    );

    // Download it back.
    let out = sshd
        .ssh(port)
        .arg(format!("cat '{}'", remote.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "download failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut h = HashWriter::default();
    h.write_all(&out.stdout).unwrap();
    assert_eq!((h.len, h.hex()), (LEN, expected), "downloaded file differs");
}

#[test]
fn curl_fetches_a_page_and_a_file() {
    assert!(
        tunnel_testkit::have("curl"),
        "curl is required (bash .ci/run installs it)"
    );
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), "<h1>camera</h1>\n").unwrap();
    const LEN: u64 = 8 * 1024 * 1024;
    let pattern = Pattern::new(8);
    pattern
        .write_to(
            &mut std::fs::File::create(root.join("video.bin")).unwrap(),
            LEN,
        )
        .unwrap();
    let http =
        HttpServer::start(&root, &scratch.path().join("http.log")).expect("python3 is required");
    let s = setup(&[("web", http.addr)]);
    let open = s.client.open("cam", &["0:web"], &[]);
    let base = format!("http://{}", open.local("web"));

    let out = Command::new("curl")
        .args(["-sS", "--fail", &format!("{base}/index.html")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "<h1>camera</h1>\n");

    let out = Command::new("curl")
        .args(["-sS", "--fail", &format!("{base}/video.bin")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut h = HashWriter::default();
    h.write_all(&out.stdout).unwrap();
    assert_eq!((h.len, h.hex()), (LEN, pattern.sha256(LEN)));

    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{base}/missing"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
}
