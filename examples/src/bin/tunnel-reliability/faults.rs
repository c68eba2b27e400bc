//! Process and disk faults (kill -9 of either end at random offsets, restart with state intact;
//! ENOSPC and EIO injected into state writes with strace), and coverage-guided fuzzing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tunnel_testkit::servers::{Pattern, TestServer};
use tunnel_testkit::{Proc, have};

use crate::lab::{Lab, download};
use crate::report::Section;
use crate::{Mode, poll};

fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// kill -9 of the device and of the client at random offsets of a transfer.
pub(crate) fn crash(mode: &Mode) -> Section {
    let mut s = Section::new(
        "kill -9 of either end",
        "the application on the far side sees a reset, never a clean end of truncated data; a \
         restarted device has its state byte for byte and the running client reaches it again",
        &["fault", "trials", "far end saw a reset", "then recovered"],
    );
    let len = mode.transfer();
    let source = TestServer::source(len, mode.seed);
    let endless = TestServer::source(1 << 40, mode.seed);
    let want = Pattern::new(mode.seed).sha256(len);
    let mut lab = Lab::new(&[("src", source.addr), ("endless", endless.addr)], "");
    let state = lab.dev.home.join("state.json");
    let state_before = std::fs::read(&state).expect("state.json");
    let open = lab.open(&["0:src", "0:endless"]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(mode.seed);
    let trials = if mode.quick { 3 } else { 10 };
    let (mut resets, mut recovered) = (0, 0);
    for _ in 0..trials {
        let offset = rng.gen_range(len / 10..len * 9 / 10);
        let pid = lab.device.proc.pid();
        let mut killed = false;
        let got = download(open.local("src"), |n| {
            if n >= offset && !killed {
                killed = true;
                kill9(pid);
            }
        });
        lab.device.proc.kill9();
        let truncated_clean = got.error.is_none() && got.bytes < len;
        let reset = got.error == Some(std::io::ErrorKind::ConnectionReset);
        s.check(
            !truncated_clean,
            format!("a clean end after {} of {len} bytes", got.bytes),
        );
        if reset || (got.error.is_none() && got.sha256 == want) {
            resets += 1;
        }
        lab.restart_device();
        let same = std::fs::read(&state).ok() == Some(state_before.clone());
        s.check(same, "state.json changed across the kill");
        let back = poll(Duration::from_secs(30), || {
            let g = download(open.local("src"), |_| {});
            (g.error.is_none() && g.sha256 == want).then_some(())
        });
        if same && back.is_some() {
            recovered += 1;
        }
    }
    s.row(vec![
        "device killed at a random offset".into(),
        trials.to_string(),
        format!("{resets} of {trials}"),
        format!("{recovered} of {trials}"),
    ]);
    s.check(
        resets == trials && recovered == trials,
        "device kill trials",
    );

    // The client killed while the service is sending: the service sees a reset.
    let mut client_resets = 0;
    for i in 0..trials {
        let mut cli = lab.open(&["0:endless"]);
        let local = cli.local("endless");
        let reader = std::thread::spawn(move || download(local, |_| {}));
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..500)));
        cli.proc.kill9();
        let _ = reader.join();
        let outcomes = endless.record.wait_outcomes(i + 1, Duration::from_secs(30));
        if outcomes.last().is_some_and(Result::is_err) {
            client_resets += 1;
        }
    }
    s.row(vec![
        "client killed while the service sends".into(),
        trials.to_string(),
        format!("{client_resets} of {trials}"),
        "-".into(),
    ]);
    s.check(
        client_resets == trials,
        "the service did not always see a reset",
    );
    s.headline = format!(
        "{} kills; resets {}/{}; state intact and reconnected {recovered}/{trials}",
        2 * trials,
        resets + client_resets,
        2 * trials
    );
    s
}

/// Runs `strace` attached to `pid` injecting `inject` into `syscalls` until dropped.
fn strace_attach(pid: u32, syscalls: &str, inject: &str, log: &Path) -> Proc {
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-o", "/dev/null", "-p", &pid.to_string()])
        .arg(format!("--trace={syscalls}"))
        .arg(format!("--inject={syscalls}:{inject}"));
    let p = Proc::spawn("strace", cmd, log);
    let traced = poll(Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .map(str::trim)
            .filter(|t| *t != "0")
            .map(|_| ())
    });
    assert!(traced.is_some(), "strace did not attach to {pid}");
    p
}

/// ENOSPC on write and EIO on fsync and rename, injected into state writes.
pub(crate) fn disk(_mode: &Mode) -> Section {
    let mut s = Section::new(
        "Disk faults on state writes",
        "a failed write leaves state.json byte for byte as it was, the command says why, and the \
         device keeps serving; the same change succeeds once the fault is gone",
        &["fault", "by", "error shown", "state.json", "device serves"],
    );
    if !have("strace") {
        s.check(
            false,
            "strace is missing (bash bench/reliability.sh installs it)",
        );
        return s;
    }
    let echo = TestServer::echo();
    let lab = Lab::new(&[("echo", echo.addr)], "");
    let state = lab.dev.home.join("state.json");
    let serves = || lab.client.cmd(&["services", "dev"]).status.success();
    let record =
        |s: &mut Section, fault: &str, by: &str, out: &std::process::Output, before: &[u8]| {
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            let first = err.lines().last().unwrap_or("").trim().to_string();
            let same = std::fs::read(&state).ok().as_deref() == Some(before);
            let ok = serves();
            s.row(vec![
                fault.into(),
                by.into(),
                format!("`{}`", first.replace('|', "/")),
                if same {
                    "unchanged".into()
                } else {
                    "CHANGED".into()
                },
                if ok { "yes".into() } else { "NO".into() },
            ]);
            s.check(
                !out.status.success(),
                format!("{fault}: the command succeeded"),
            );
            s.check(same, format!("{fault}: state.json changed"));
            s.check(ok, format!("{fault}: the device stopped serving"));
        };

    // ENOSPC on the first write of an offline command: the state's temp file.
    let before = std::fs::read(&state).expect("state");
    let out = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "--trace=write",
            "--inject=write:error=ENOSPC:when=1",
        ])
        .arg(tunnel_testkit::bin("tunnel-device"))
        .arg("--home")
        .arg(&lab.dev.home)
        .args(["user", "invite", "eve"])
        .stdin(Stdio::null())
        .output()
        .expect("strace");
    record(
        &mut s,
        "ENOSPC on write",
        "tunnel-device user invite",
        &out,
        &before,
    );
    s.check(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "the ENOSPC error was not shown",
    );

    // EIO on fsync and on rename, in the running device, for a change a client asks for.
    let pid = lab.device.proc.pid();
    for (syscalls, what) in [
        ("fsync,fdatasync", "EIO on fsync"),
        ("rename,renameat,renameat2", "EIO on rename"),
    ] {
        let before = std::fs::read(&state).expect("state");
        let tracer = strace_attach(pid, syscalls, "error=EIO", &lab.world.path("strace.log"));
        let out = lab.client.cmd(&["user", "dev", "invite", "mallory"]);
        drop(tracer);
        record(
            &mut s,
            what,
            "the device (tunnel-client user invite)",
            &out,
            &before,
        );
        s.check(
            String::from_utf8_lossy(&out.stderr).contains("could not save the change"),
            format!("{what}: the client was not told"),
        );
    }
    let ok = lab
        .client
        .cmd(&["user", "dev", "invite", "mallory"])
        .status
        .success();
    s.check(ok, "the change failed after the faults were gone");
    s.note(format!(
        "After the faults: the same invitation {}.",
        if ok { "succeeded" } else { "FAILED" }
    ));
    s.headline = "ENOSPC, EIO on fsync and rename: state unchanged, device serving".into();
    s
}

/// Coverage-guided fuzzing of every parser (`fuzz/run.sh`), when nightly is installed.
pub(crate) fn fuzz(mode: &Mode) -> Section {
    let mut s = Section::new(
        "Fuzzing",
        "no target crashes, runs out of memory or times out; every crash input is kept as a \
         regression test that runs on stable",
        &["target", "runs", "seconds", "corpus", "crashes"],
    );
    if mode.fuzz_secs == 0 {
        s.note("SKIP: --fuzz-secs 0.");
        s.headline = "skipped (--fuzz-secs 0)".into();
        return s;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let summary = root.join("target/fuzz-summary.tsv");
    let out = Command::new("bash")
        .arg(root.join("fuzz/run.sh"))
        .arg(mode.fuzz_secs.to_string())
        .arg(&summary)
        .output()
        .expect("bash");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if text.contains("SKIP:") {
        s.note(format!("SKIP (loudly): {}", text.trim()));
        s.headline = "SKIPPED: no nightly toolchain".into();
        return s;
    }
    s.check(
        out.status.success(),
        format!("fuzz/run.sh failed: {}", text.trim()),
    );
    let mut runs = 0u64;
    for line in std::fs::read_to_string(&summary)
        .unwrap_or_default()
        .lines()
    {
        let cells: Vec<String> = line.split('\t').map(ToString::to_string).collect();
        runs += cells
            .get(1)
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0);
        s.check(
            cells.get(4).is_some_and(|c| c == "0"),
            format!("{} crashed", cells[0]),
        );
        s.row(cells);
    }
    s.check(s.table.len() > 1, "no fuzz target ran");
    s.headline = format!(
        "{} targets, {} M executions, 0 crashes",
        s.table.len() - 1,
        runs / 1_000_000
    );
    s
}
