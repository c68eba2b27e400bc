//! The device's metrics (`[metrics] listen` in `device.toml`): connections by locality and path,
//! tunnels and bytes per service and user, handshake, token and pairing failures by reason,
//! stream resets by code, RTT and congestion-window histograms.
//!
//! Kind: IO (counters updated by the connection and stream tasks; read at scrape time). The
//! counting is always on (a few atomic adds per tunnel and per 64 KiB); only the exporter and
//! the RTT sampling task are opt-in. Labels: user names and service ids (names the operator
//! chose), fixed reason and code names; never a fingerprint, a token or a client's own name.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::live::Live;
use crate::metrics::{ConnSampler, Counts, Sample, Source};
use crate::proto::StreamCode;
use crate::splice::Counters;

/// Counters of the tunnels of one (service, user).
#[derive(Debug, Default)]
pub(crate) struct TunnelStats {
    opened: AtomicU64,
    open: AtomicI64,
    /// `tcp_to_quic`: from the service to the client; `quic_to_tcp`: to the service.
    pub(crate) bytes: Counters,
}

/// Holds one open tunnel in the count.
pub(crate) struct OpenTunnel(pub(crate) Arc<TunnelStats>);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything the device counts.
#[derive(Debug, Default)]
pub(crate) struct DeviceMetrics {
    /// Connections that did not get past the handshake, `Hello` or admission.
    pub(crate) handshake_failures: Counts,
    /// Remote connections refused for their token (or JWT).
    pub(crate) token_failures: Counts,
    /// Pairing requests answered with an error.
    pub(crate) pairing_failures: Counts,
    /// Tunnel streams reset by this device, by code.
    resets_sent: Counts,
    /// Tunnel streams reset by clients, by code.
    resets_received: Counts,
    tunnels: Mutex<HashMap<(String, String), Arc<TunnelStats>>>,
    /// RTT and congestion window of live connections.
    pub(crate) sampler: ConnSampler,
}

impl DeviceMetrics {
    /// A tunnel of `user` to `service` opens: counted until the guard drops.
    pub(crate) fn tunnel_opened(&self, service: &str, user: &str) -> OpenTunnel {
        let stats = match self.tunnels.lock() {
            Ok(mut m) => m
                .entry((service.to_string(), user.to_string()))
                .or_default()
                .clone(),
            Err(_) => Arc::default(),
        };
        stats.opened.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        OpenTunnel(stats)
    }

    /// This device reset a tunnel stream with `code`.
    pub(crate) fn reset_sent(&self, code: StreamCode) {
        self.resets_sent.inc(code.label());
    }

    /// A client reset (or stopped) a tunnel stream with `code`.
    pub(crate) fn reset_received(&self, code: StreamCode) {
        self.resets_received.inc(code.label());
    }

    fn tunnel_samples(&self) -> [Sample; 3] {
        let mut opened = Sample::counter("device_tunnels", "Tunnels opened, per service and user");
        let mut open = Sample::gauge(
            "device_tunnels_open",
            "Tunnels open now, per service and user",
        );
        let mut bytes = Sample::counter(
            "device_tunnel_bytes",
            "Bytes carried by tunnels, per service, user and direction",
        );
        if let Ok(m) = self.tunnels.lock() {
            for ((service, user), s) in m.iter() {
                let labels = || vec![("service", service.clone()), ("user", user.clone())];
                let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
                opened.push(labels(), load(&s.opened));
                open.push(labels(), s.open.load(Ordering::Relaxed) as f64);
                let mut to_service = labels();
                to_service.push(("direction", "to_service".into()));
                bytes.push(to_service, load(&s.bytes.quic_to_tcp));
                let mut to_client = labels();
                to_client.push(("direction", "to_client".into()));
                bytes.push(to_client, load(&s.bytes.tcp_to_quic));
            }
        }
        [opened, open, bytes]
    }
}

/// What a scrape reads: the counters, and the live connections of the running device.
pub(crate) struct Exported {
    pub(crate) live: Weak<Live>,
}

impl std::fmt::Debug for Exported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exported")
    }
}

impl Source for Exported {
    #[expect(
        clippy::cast_precision_loss,
        reason = "counts and byte totals stay far below 2^53"
    )]
    fn collect(&self) -> Vec<Sample> {
        let Some(live) = self.live.upgrade() else {
            return Vec::new();
        };
        let m = &live.metrics;
        let mut conns: HashMap<(&'static str, &'static str), u64> = HashMap::new();
        for conn in live.conns() {
            let locality = if conn.is_local() { "local" } else { "remote" };
            *conns.entry((locality, conn.path_label())).or_default() += 1;
        }
        let mut connections = Sample::gauge(
            "device_connections",
            "Client connections past hello, by locality and path",
        );
        for ((locality, path), n) in conns {
            connections.push(
                vec![("locality", locality.into()), ("path", path.into())],
                n as f64,
            );
        }
        let mut resets = Sample::counter(
            "device_stream_resets",
            "Tunnel streams reset, by code and by which end reset them",
        );
        for (side, counts) in [("device", &m.resets_sent), ("client", &m.resets_received)] {
            for (mut labels, n) in counts.rows("code") {
                labels.push(("by", side.into()));
                resets.push(labels, n);
            }
        }
        let mut out = vec![
            connections,
            m.handshake_failures.sample(
                "device_handshake_failures",
                "Connections refused or failed before they were admitted, by reason",
                "reason",
            ),
            m.token_failures.sample(
                "device_token_failures",
                "Remote connections refused for their server-connect token or JWT, by reason",
                "reason",
            ),
            m.pairing_failures.sample(
                "device_pairing_failures",
                "Pairing requests refused, by reason",
                "reason",
            ),
            resets,
        ];
        out.extend(m.tunnel_samples());
        out
    }
}
