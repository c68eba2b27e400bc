//! Log output and the live status of `open`.
//!
//! On a terminal, `open` and `up` draw, per device, one line for the connection (state,
//! address, RTT) and one per forward (local address, connections open/total, bytes and current
//! rate each way) with indicatif, redrawn every second and following reloads; log lines are
//! printed above the bars. Otherwise they log a summary line per busy forward every 30 s.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnel_shared::client::forwarder::{LinkState, ServiceStatus, Status};

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

/// Logs to stderr (above the bars, if any) as `log` says, at `default` unless it names a level.
pub(crate) fn init_tracing(log: &tunnel_cli::LogArgs, default: &str) {
    log.init(default, "tunnel_client", || LogWriter(Vec::new()));
}

/// Removes the bars (before a final error message).
pub(crate) fn clear() {
    if let Some(mp) = BARS.get() {
        let _ = mp.clear();
    }
}

/// Starts the display task; it ends when `stop` is cancelled.
pub(crate) fn spawn(
    statuses: watch::Receiver<Vec<Arc<Status>>>,
    terminal: bool,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if terminal {
            bars(statuses, stop).await;
        } else {
            plain(statuses, stop).await;
        }
    })
}

/// Bytes each way of every forward at one instant, keyed by the forward's counters.
struct Sample {
    at: Instant,
    bytes: HashMap<usize, (u64, u64)>,
}

impl Sample {
    fn take(list: &[Arc<Status>]) -> Self {
        let bytes = list
            .iter()
            .flat_map(|d| d.services.iter())
            .map(|s| {
                (
                    Arc::as_ptr(s).addr(),
                    (
                        s.bytes.tcp_to_quic.load(Ordering::Relaxed),
                        s.bytes.quic_to_tcp.load(Ordering::Relaxed),
                    ),
                )
            })
            .collect();
        Self {
            at: Instant::now(),
            bytes,
        }
    }

    /// (up, down, up rate, down rate) of `svc` since `prev`.
    fn delta(&self, prev: &Self, svc: &Arc<ServiceStatus>) -> (u64, u64, f64, f64) {
        let key = Arc::as_ptr(svc).addr();
        let (up, down) = self.bytes.get(&key).copied().unwrap_or_default();
        let (up0, down0) = prev.bytes.get(&key).copied().unwrap_or((up, down));
        let secs = self.at.duration_since(prev.at).as_secs_f64();
        (up, down, rate(up, up0, secs), rate(down, down0, secs))
    }
}

fn rate(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        now.saturating_sub(before) as f64 / secs
    }
}

/// The lines of one redraw: per device its link, then a line per forward.
fn lines(list: &[Arc<Status>], now: &Sample, prev: &Sample) -> Vec<String> {
    let mut out = Vec::new();
    for dev in list {
        out.push(link_line(dev));
        for svc in &dev.services {
            let (up, down, up_rate, down_rate) = now.delta(prev, svc);
            out.push(format!(
                "  {:<10} {:<21} conns {}/{}  ↑ {} {}/s  ↓ {} {}/s",
                svc.service,
                svc.local.to_string(),
                svc.open.load(Ordering::Relaxed),
                svc.total.load(Ordering::Relaxed),
                bytes(up as f64),
                bytes(up_rate),
                bytes(down as f64),
                bytes(down_rate),
            ));
        }
        for (spec, error) in &dev.failed {
            out.push(format!("  {spec:<32} NOT FORWARDED: {error}"));
        }
    }
    if out.is_empty() {
        out.push("no forwards (tunnel-client forward add DEVICE [BIND:]PORT:SERVICE)".into());
    }
    out
}

async fn bars(statuses: watch::Receiver<Vec<Arc<Status>>>, stop: CancellationToken) {
    let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
    let style =
        ProgressStyle::with_template("{wide_msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut shown: Vec<ProgressBar> = Vec::new();
    let _ = BARS.set(mp.clone());
    let mut prev = Sample::take(&statuses.borrow());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let list = statuses.borrow().clone();
        let now = Sample::take(&list);
        let text = lines(&list, &now, &prev);
        while shown.len() < text.len() {
            shown.push(mp.add(ProgressBar::new_spinner().with_style(style.clone())));
        }
        for bar in shown.drain(text.len()..) {
            bar.finish_and_clear();
            mp.remove(&bar);
        }
        for (bar, line) in shown.iter().zip(text) {
            bar.set_message(line);
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

async fn plain(statuses: watch::Receiver<Vec<Arc<Status>>>, stop: CancellationToken) {
    let mut prev = Sample::take(&statuses.borrow());
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let list = statuses.borrow().clone();
        let now = Sample::take(&list);
        let secs = now.at.duration_since(prev.at).as_secs_f64();
        for dev in &list {
            for svc in &dev.services {
                let (up, down, up_rate, down_rate) = now.delta(&prev, svc);
                if up_rate == 0.0 && down_rate == 0.0 {
                    continue;
                }
                tracing::info!(
                    device = %dev.device,
                    service = %svc.service,
                    local = %svc.local,
                    open = svc.open.load(Ordering::Relaxed),
                    total = svc.total.load(Ordering::Relaxed),
                    sent = up,
                    received = down,
                    "{}/s up, {}/s down in the last {:.0} s",
                    bytes(up_rate),
                    bytes(down_rate),
                    secs
                );
            }
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
