//! Lossy links: one file downloaded across two NATs (network namespaces, RTT ≈ 0) with `nft
//! numgen` loss on the internet between them, over plain TCP (Linux CUBIC) and through the tunnel
//! with each congestion controller, in the same run. Every download is SHA-256 checked.

use tunnel_testkit::natlab::{self, NatLab};

/// What was measured: per loss rate, seconds per round for each path (`None`: not done in time
/// or not byte-exact).
pub(crate) struct Lossy {
    pub len: u64,
    pub cap_secs: u64,
    pub rows: Vec<(u32, [Vec<Option<f64>>; 3])>,
    /// Downloads that arrived byte-exact, and all downloads.
    pub verified: (u32, u32),
    pub skipped: Option<String>,
}

/// The paths, in column order.
pub(crate) const PATHS: [&str; 3] = [
    "TCP (Linux CUBIC)",
    "tunnel, BBR (default)",
    "tunnel, CUBIC",
];

pub(crate) fn lossy(quick: bool, seed: u64) -> Lossy {
    let len: u64 = if quick { 8 << 20 } else { 64 << 20 };
    let cap_secs = if quick { 30 } else { 300 };
    let mut out = Lossy {
        len,
        cap_secs,
        rows: Vec::new(),
        verified: (0, 0),
        skipped: None,
    };
    if let Some(tool) = natlab::missing_tool() {
        out.skipped = Some(format!("{tool} is missing (bash bench/run.sh installs it)"));
        return out;
    }
    let mut lab = NatLab::new(len, seed, &[5592, 5593]);
    let urls = [
        NatLab::direct_url(),
        lab.add_tunnel("bbr", 5592, ""),
        lab.add_tunnel("cubic", 5593, "[transport]\ncongestion = \"cubic\"\n"),
    ];
    // Warm up the server, the page cache and both connections.
    for url in &urls {
        let _ = lab.fetch(url, cap_secs);
    }
    let losses: &[u32] = if quick { &[0, 5] } else { &[0, 1, 5, 20] };
    for &loss in losses {
        lab.homes.set_loss(loss);
        // 20 % loss is slow (TCP may not finish at all): one round.
        let rounds = if quick || loss >= 20 { 1 } else { 3 };
        let mut cells: [Vec<Option<f64>>; 3] = Default::default();
        for round in 0..rounds {
            eprintln!("[bench] lossy: {loss} % loss, round {}/{rounds}", round + 1);
            for (cell, url) in cells.iter_mut().zip(&urls) {
                let got = lab.fetch(url, cap_secs);
                out.verified.1 += 1;
                if got.error.is_none() {
                    out.verified.0 += 1;
                }
                cell.push(got.error.is_none().then_some(got.secs));
            }
        }
        out.rows.push((loss, cells));
    }
    lab.homes.set_loss(0);
    out
}
