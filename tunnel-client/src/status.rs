//! Log output and the live status of `open`.
//!
//! On a terminal, `open` draws one line for the connection (state, address, RTT) and one per
//! forward (local address, connections open/total, bytes and current rate each way) with
//! indicatif, redrawn every second; log lines are printed above the bars. Otherwise it logs a
//! summary line every 30 s while data moves.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnel_shared::client::open::{LinkState, Status};

/// Set while bars are drawn; log lines then go through [`MultiProgress::suspend`].
static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Writes one log event to stderr, above the bars if there are any.
struct LogWriter(Vec<u8>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        let emit = || {
            let _ = std::io::stderr().write_all(&self.0);
        };
        match BARS.get() {
            Some(mp) => mp.suspend(emit),
            None => emit(),
        }
    }
}

/// Logs to stderr at `level` for this program (RUST_LOG overrides).
pub(crate) fn init_tracing(level: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| {
        format!("warn,tunnel_core={level},tunnel_shared={level},tunnel_client={level}")
    });
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| {
        eprintln!("warning: invalid log level '{level}', using info");
        tracing_subscriber::EnvFilter::new(
            "warn,tunnel_core=info,tunnel_shared=info,tunnel_client=info",
        )
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter(Vec::new()))
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Removes the bars (before a final error message).
pub(crate) fn clear() {
    if let Some(mp) = BARS.get() {
        let _ = mp.clear();
    }
}

/// Starts the display task; it ends when `stop` is cancelled.
pub(crate) fn spawn(
    status: Arc<Status>,
    terminal: bool,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if terminal {
            bars(status, stop).await;
        } else {
            plain(status, stop).await;
        }
    })
}

struct Sample {
    at: Instant,
    up: Vec<u64>,
    down: Vec<u64>,
}

impl Sample {
    fn take(status: &Status) -> Self {
        Self {
            at: Instant::now(),
            up: status
                .services
                .iter()
                .map(|s| s.bytes.tcp_to_quic.load(Ordering::Relaxed))
                .collect(),
            down: status
                .services
                .iter()
                .map(|s| s.bytes.quic_to_tcp.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

fn rate(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        now.saturating_sub(before) as f64 / secs
    }
}

async fn bars(status: Arc<Status>, stop: CancellationToken) {
    let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
    let style =
        ProgressStyle::with_template("{wide_msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
    let head = mp.add(ProgressBar::new_spinner().with_style(style.clone()));
    let lines: Vec<ProgressBar> = status
        .services
        .iter()
        .map(|_| mp.add(ProgressBar::new_spinner().with_style(style.clone())))
        .collect();
    let _ = BARS.set(mp.clone());
    let mut prev = Sample::take(&status);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let now = Sample::take(&status);
        let secs = now.at.duration_since(prev.at).as_secs_f64();
        head.set_message(link_line(&status));
        for (i, (svc, bar)) in status.services.iter().zip(&lines).enumerate() {
            bar.set_message(format!(
                "  {:<10} {:<21} conns {}/{}  ↑ {} {}/s  ↓ {} {}/s",
                svc.service,
                svc.local.to_string(),
                svc.open.load(Ordering::Relaxed),
                svc.total.load(Ordering::Relaxed),
                bytes(now.up[i] as f64),
                bytes(rate(now.up[i], prev.up[i], secs)),
                bytes(now.down[i] as f64),
                bytes(rate(now.down[i], prev.down[i], secs)),
            ));
        }
        prev = now;
    }
    let _ = mp.clear();
}

fn link_line(status: &Status) -> String {
    let link = status.link.borrow().clone();
    match link {
        LinkState::Connecting => format!("device {}: connecting…", status.device),
        LinkState::Connected { conn, addr, path } if path == "direct" => format!(
            "device {}: connected to {addr} (direct), rtt {:.1} ms",
            status.device,
            conn.rtt().as_secs_f64() * 1000.0
        ),
        LinkState::Connected { conn, path, .. } => format!(
            "device {}: connected, {path}, rtt {:.1} ms",
            status.device,
            conn.rtt().as_secs_f64() * 1000.0
        ),
        LinkState::Down { error, retry_at } => {
            let left = retry_at.saturating_duration_since(tokio::time::Instant::now());
            format!(
                "device {}: down, retrying in {:.1} s ({error})",
                status.device,
                left.as_secs_f64()
            )
        }
        LinkState::Stopped(reason) => format!("device {}: stopped ({reason})", status.device),
    }
}

async fn plain(status: Arc<Status>, stop: CancellationToken) {
    let mut prev = Sample::take(&status);
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = Sample::take(&status);
        let secs = now.at.duration_since(prev.at).as_secs_f64();
        for (i, svc) in status.services.iter().enumerate() {
            if now.up[i] == prev.up[i] && now.down[i] == prev.down[i] {
                continue;
            }
            tracing::info!(
                service = %svc.service,
                local = %svc.local,
                open = svc.open.load(Ordering::Relaxed),
                total = svc.total.load(Ordering::Relaxed),
                sent = now.up[i],
                received = now.down[i],
                "{} up, {} down in the last {:.0} s",
                bytes(rate(now.up[i], prev.up[i], 1.0)),
                bytes(rate(now.down[i], prev.down[i], 1.0)),
                secs
            );
        }
        prev = now;
    }
}

/// Human-readable bytes: `12.3 MiB`.
fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_bytes() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1023.0), "1023 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(rate(200, 100, 2.0), 50.0);
        assert_eq!(rate(100, 200, 2.0), 0.0);
    }
}
