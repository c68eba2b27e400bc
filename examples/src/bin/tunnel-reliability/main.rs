//! `tunnel-reliability`: runs the reliability test classes of `reference/reliability-tests.md`
//! §2 against the real binaries, checks each pass criterion, and writes a report with the figures
//! (docs/RELIABILITY.md for a full run). Exit status 1 when any check fails.
//!
//! `bash bench/reliability.sh` installs what it needs and runs it on release binaries; CI runs
//! `tunnel-reliability --quick` on the debug build.
//!
//! Classes: network faults in namespaces behind NAT (loss, rate, link down, NAT timeout),
//! delay/reorder/duplicate and a source-port change through the impairment relay, tampering on
//! the wire, a pre-authentication flood, a flood through the relay by token holders,
//! slowloris, a soak, kill -9 of either end, disk faults (strace), and coverage-guided fuzzing.

// A test harness, like the test kit: a setup step that fails panics, and the class is reported as
// not finished (caught in `main`), so `expect` states what was being set up.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod faults;
mod hostile;
mod lab;
mod net;
mod relayed;
mod report;
mod soak;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use report::Section;

/// How hard to push.
#[derive(Debug, Clone)]
pub(crate) struct Mode {
    /// CI size: a few minutes in all.
    pub quick: bool,
    /// Soak for this long instead of a fixed number of cycles.
    pub hours: Option<f64>,
    /// Seconds of fuzzing per target (0: no fuzzing).
    pub fuzz_secs: u64,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Mode {
    /// Size of a transfer, in bytes.
    pub(crate) fn transfer(&self) -> u64 {
        if self.quick { 16 << 20 } else { 64 << 20 }
    }
}

fn usage() -> &'static str {
    "usage: tunnel-reliability [--quick] [--hours H] [--fuzz-secs S] [--seed N] [--only CLASS]... \
     [--out FILE]\n\
     \n  --quick      CI size (a few minutes), report to target/reliability-quick.md\n\
     \x20 --hours H    soak for H hours\n\
     \x20 --fuzz-secs  seconds per fuzz target (default 60; 0 skips fuzzing)\n\
     \x20 --only       run only these classes: net, impaired, tamper, flood, relayed-flood,\n\
     \x20              slowloris, soak, crash, disk, fuzz\n\
     \x20 --out        report path (default docs/RELIABILITY.md)\n\
     \n  Binaries are taken next to this program (or from $TUNNEL_BIN_DIR)."
}

type Class = (&'static str, fn(&Mode) -> Section);

const CLASSES: [Class; 10] = [
    ("net", net::faults),
    ("impaired", net::impaired),
    ("tamper", net::tamper),
    ("flood", hostile::flood),
    ("relayed-flood", relayed::relayed_flood),
    ("slowloris", hostile::slowloris),
    ("soak", soak::soak),
    ("crash", faults::crash),
    ("disk", faults::disk),
    ("fuzz", faults::fuzz),
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut mode = Mode {
        quick: false,
        hours: None,
        fuzz_secs: 60,
        seed: 0x5eed,
    };
    let mut only = Vec::new();
    let mut out = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().context(usage());
        match a.as_str() {
            "--quick" => mode.quick = true,
            "--hours" => mode.hours = Some(value()?.parse()?),
            "--fuzz-secs" => mode.fuzz_secs = value()?.parse()?,
            "--seed" => mode.seed = value()?.parse()?,
            "--only" => only.push(value()?.clone()),
            "--out" => out = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument {other}\n{}", usage()),
        }
    }
    for o in &only {
        if !CLASSES.iter().any(|(n, _)| n == o) {
            bail!("no class '{o}'\n{}", usage());
        }
    }
    let out = out.unwrap_or_else(|| {
        PathBuf::from(if mode.quick {
            "target/reliability-quick.md"
        } else {
            "docs/RELIABILITY.md"
        })
    });
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let started = Instant::now();
    let mut sections = Vec::new();
    for (name, class) in CLASSES {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("[reliability] {name}");
        let t0 = Instant::now();
        let mut section = match std::panic::catch_unwind(|| class(&mode)) {
            Ok(s) => s,
            Err(panic) => Section::crashed(name, &panic),
        };
        section.elapsed = t0.elapsed();
        eprintln!(
            "[reliability] {name}: {} in {:.0?}",
            if section.passed { "pass" } else { "FAIL" },
            section.elapsed
        );
        sections.push(section);
    }
    let md = report::render(&mode, &sections, started.elapsed());
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, md)?;
    eprintln!("[reliability] wrote {}", out.display());
    let failed: Vec<&str> = sections
        .iter()
        .filter(|s| !s.passed)
        .map(|s| s.title)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("failed: {}", failed.join(", "))
    }
}

/// Waits for `cond` up to `timeout`, polling.
pub(crate) fn poll<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
