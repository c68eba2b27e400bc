//! The relay's metrics (`[metrics] listen` in `relay.toml`): legs, attached devices and open
//! channels, datagrams and bytes forwarded and dropped, refusals by code, handshake failures by
//! reason, redirects within a fleet, RTT and congestion-window histograms of the legs.
//!
//! Kind: IO (counters updated by the leg tasks, read at scrape time). Labels are fixed code and
//! reason names only: no device id, key or address.

use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};

use tunnel_core::metrics::{ConnSampler, Counts, Sample, Source};

use crate::server::Relay;

/// What the relay counts besides [`crate::hub`]'s forwarding counters.
#[derive(Debug, Default)]
pub(crate) struct RelayMetrics {
    /// Legs refused or closed with a code, by code.
    pub(crate) refusals: Counts,
    /// Legs that did not complete their handshake, by reason.
    pub(crate) handshake_failures: Counts,
    /// Clients sent to the relay of the fleet that has their device.
    pub(crate) redirects: AtomicU64,
    /// RTT and congestion window of the legs.
    pub(crate) sampler: ConnSampler,
}

/// What a scrape reads: the running relay.
pub(crate) struct Exported(pub(crate) Weak<Relay>);

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
        let Some(relay) = self.0.upgrade() else {
            return Vec::new();
        };
        let hubs = relay.hubs_now();
        let attached = hubs.iter().filter(|h| h.device().is_some()).count();
        let channels: usize = hubs.iter().map(|h| h.channel_count()).sum();
        let c = &relay.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let m = &relay.metrics;
        vec![
            Sample::gauge("relay_legs", "Legs (device and client connections) open")
                .row(Vec::new(), relay.legs.load(Ordering::Relaxed) as f64),
            Sample::gauge("relay_devices_attached", "Devices attached to this relay")
                .row(Vec::new(), attached as f64),
            Sample::gauge("relay_channels", "Client channels open to attached devices")
                .row(Vec::new(), channels as f64),
            Sample::counter(
                "relay_forwarded_datagrams",
                "Datagrams forwarded between legs",
            )
            .row(Vec::new(), load(&c.forwarded)),
            Sample::counter("relay_forwarded_bytes", "Bytes forwarded between legs")
                .row(Vec::new(), load(&c.bytes)),
            Sample::counter(
                "relay_dropped_datagrams",
                "Datagrams dropped (no room on the receiving leg, no such channel)",
            )
            .row(Vec::new(), load(&c.dropped)),
            Sample::counter(
                "relay_dropped_handshake_datagrams",
                "Of those, clients' handshake (long-header) datagrams over their channel's budget",
            )
            .row(Vec::new(), load(&c.dropped_handshakes)),
            Sample::counter(
                "relay_redirects",
                "Clients redirected to the relay of the fleet that has their device",
            )
            .row(Vec::new(), load(&m.redirects)),
            m.refusals.sample(
                "relay_refusals",
                "Attaches and connects refused, by code (token_rejected, unknown_device, …)",
                "code",
            ),
            m.handshake_failures.sample(
                "relay_handshake_failures",
                "Legs that did not complete their handshake, by reason",
                "reason",
            ),
        ]
    }
}

/// Every device leg and client channel of the relay.
pub(crate) fn legs(relay: &Relay) -> Vec<quinn::Connection> {
    let mut out = Vec::new();
    for hub in relay.hubs_now() {
        if let Some(d) = hub.device() {
            out.push(d.conn);
        }
        out.extend(hub.client_conns());
    }
    out
}
