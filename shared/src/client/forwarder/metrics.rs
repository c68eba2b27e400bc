//! The client's metrics (`open`/`up --metrics ADDR`): per device its connection and path, how
//! often it connected, per forward the tunnels and bytes, stream resets by code, RTT and
//! congestion-window histograms.
//!
//! Kind: IO (counters updated by the forwarding tasks, the rest read from the live status at
//! scrape time). Labels: the device's and service's names as configured here, fixed code names.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::{LinkState, Status};
use crate::metrics::{ConnSampler, Counts, Sample, Source};
use crate::proto::StreamCode;

/// What the forwarding tasks count.
#[derive(Debug, Default)]
pub(crate) struct ClientMetrics {
    /// Successful connections per device.
    connects: Mutex<HashMap<String, u64>>,
    /// Tunnel streams reset by this client, by code.
    resets_sent: Counts,
    /// Tunnel streams reset or refused by devices, by code.
    resets_received: Counts,
    /// RTT and congestion window of the device connections.
    pub(crate) sampler: ConnSampler,
}

impl ClientMetrics {
    /// `device` is connected (again).
    pub(crate) fn connected(&self, device: &str, conn: &quinn::Connection) {
        if let Ok(mut m) = self.connects.lock() {
            *m.entry(device.to_string()).or_default() += 1;
        }
        self.sampler.observe(conn);
    }

    /// A tunnel ended in a reset: by the device (`peer`) or by us.
    pub(crate) fn reset(&self, code: StreamCode, peer: bool) {
        if peer {
            self.resets_received.inc(code.label());
        } else {
            self.resets_sent.inc(code.label());
        }
    }
}

/// The path of a connection as a fixed label.
fn path_label(path: &str) -> &'static str {
    if path.starts_with("direct (punched)") {
        "punched"
    } else if path.starts_with("direct") {
        "direct"
    } else if path.ends_with("over TCP") {
        "relayed_tcp"
    } else {
        "relayed"
    }
}

/// What a scrape reads.
#[derive(Debug)]
pub(crate) struct Exported {
    pub(crate) metrics: Arc<ClientMetrics>,
    pub(crate) statuses: watch::Receiver<Vec<Arc<Status>>>,
}

impl Source for Exported {
    #[expect(
        clippy::cast_precision_loss,
        reason = "counts and byte totals stay far below 2^53"
    )]
    fn collect(&self) -> Vec<Sample> {
        let list = self.statuses.borrow().clone();
        let mut connected = Sample::gauge(
            "client_connected",
            "1 when the device is connected, by device and path (direct, relayed, relayed_tcp, punched)",
        );
        let mut tunnels =
            Sample::counter("client_tunnels", "Local connections accepted, per forward");
        let mut open = Sample::gauge(
            "client_tunnels_open",
            "Local connections open now, per forward",
        );
        let mut bytes = Sample::counter(
            "client_tunnel_bytes",
            "Bytes carried, per forward and direction (up: to the device)",
        );
        for dev in &list {
            let path = match &*dev.link.borrow() {
                LinkState::Connected { path, .. } => Some(path_label(path)),
                _ => None,
            };
            connected.push(
                vec![
                    ("device", dev.device.clone()),
                    ("path", path.unwrap_or("none").into()),
                ],
                if path.is_some() { 1.0 } else { 0.0 },
            );
            for s in &dev.services {
                let labels = || {
                    vec![
                        ("device", dev.device.clone()),
                        ("service", s.service.clone()),
                        ("local", s.local.to_string()),
                    ]
                };
                tunnels.push(labels(), s.total.load(Ordering::Relaxed) as f64);
                open.push(labels(), s.open.load(Ordering::Relaxed) as f64);
                for (dir, n) in [("up", &s.bytes.tcp_to_quic), ("down", &s.bytes.quic_to_tcp)] {
                    let mut l = labels();
                    l.push(("direction", dir.into()));
                    bytes.push(l, n.load(Ordering::Relaxed) as f64);
                }
            }
        }
        let mut connects = Sample::counter(
            "client_connects",
            "Connections made to each device (more than one: it reconnected)",
        );
        if let Ok(m) = self.metrics.connects.lock() {
            for (device, n) in m.iter() {
                connects.push(vec![("device", device.clone())], *n as f64);
            }
        }
        let mut resets = Sample::counter(
            "client_stream_resets",
            "Tunnels that ended in a reset, by code and by which end reset them",
        );
        for (side, counts) in [
            ("client", &self.metrics.resets_sent),
            ("device", &self.metrics.resets_received),
        ] {
            for (mut labels, n) in counts.rows("code") {
                labels.push(("by", side.into()));
                resets.push(labels, n);
            }
        }
        vec![connected, tunnels, open, bytes, connects, resets]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_have_fixed_labels() {
        assert_eq!(path_label("direct"), "direct");
        assert_eq!(path_label("direct (punched)"), "punched");
        assert_eq!(path_label("relayed via r.example.net:5593"), "relayed");
        assert_eq!(
            path_label("relayed via r.example.net:5593 over TCP"),
            "relayed_tcp"
        );
    }
}
