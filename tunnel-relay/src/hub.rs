//! One device's meeting point on the relay: its current leg, its clients' channels and the hashes
//! of the tokens that may reach it; and the forwarding between them.
//!
//! Kind: IO (sends datagrams on QUIC connections).
//!
//! The hot path takes no lock: each leg task keeps its own copy of what it forwards to and
//! refreshes it when the hub's generation number moves (a channel opened or closed, the device
//! re-attached). A datagram that the receiving leg has no room for is dropped and counted, never
//! queued without bound (the inner connection's congestion control sees it as loss).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc;
use tunnel_core::relay::{RelayEvent, TokenHash};

/// The device's current leg.
#[derive(Clone)]
pub(crate) struct DeviceLeg {
    /// Which leg (a device that re-attaches gets a new one).
    pub(crate) id: u64,
    /// The connection.
    pub(crate) conn: quinn::Connection,
    /// Control events for the device (channel closed).
    pub(crate) events: mpsc::Sender<RelayEvent>,
}

/// Forwarding counters of the whole relay.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Datagrams forwarded.
    pub(crate) forwarded: AtomicU64,
    /// Bytes forwarded.
    pub(crate) bytes: AtomicU64,
    /// Datagrams dropped (no room on the receiving leg, no such channel, bad tag).
    pub(crate) dropped: AtomicU64,
}

impl Counters {
    fn sent(&self, len: usize) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(u64::try_from(len).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub(crate) fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// A device's hub.
pub(crate) struct Hub {
    pub(crate) id: String,
    generation: AtomicU64,
    device: RwLock<Option<DeviceLeg>>,
    channels: RwLock<HashMap<u64, quinn::Connection>>,
    tokens: RwLock<Arc<Vec<TokenHash>>>,
    candidates: RwLock<Vec<SocketAddr>>,
}

impl Hub {
    pub(crate) fn new(id: String) -> Self {
        Self {
            id,
            generation: AtomicU64::new(0),
            device: RwLock::new(None),
            channels: RwLock::new(HashMap::new()),
            tokens: RwLock::new(Arc::new(Vec::new())),
            candidates: RwLock::new(Vec::new()),
        }
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Makes `leg` the device's leg; returns the one it replaces.
    pub(crate) fn attach(
        &self,
        leg: DeviceLeg,
        tokens: Vec<TokenHash>,
        candidates: Vec<SocketAddr>,
    ) -> Option<DeviceLeg> {
        self.set_tokens(tokens);
        self.set_candidates(candidates);
        let old = self.device.write().ok().and_then(|mut d| d.replace(leg));
        self.bump();
        old
    }

    /// Forgets leg `id` if it is still the device's leg.
    pub(crate) fn detach(&self, id: u64) {
        if let Ok(mut d) = self.device.write()
            && d.as_ref().is_some_and(|l| l.id == id)
        {
            *d = None;
        }
        self.bump();
    }

    pub(crate) fn device(&self) -> Option<DeviceLeg> {
        self.device.read().ok().and_then(|d| d.clone())
    }

    pub(crate) fn set_tokens(&self, tokens: Vec<TokenHash>) {
        if let Ok(mut t) = self.tokens.write() {
            *t = Arc::new(tokens);
        }
    }

    /// The device's candidate addresses (what it announced; the relay does not check them).
    pub(crate) fn set_candidates(&self, candidates: Vec<SocketAddr>) {
        if let Ok(mut c) = self.candidates.write() {
            *c = candidates;
        }
    }

    pub(crate) fn candidates(&self) -> Vec<SocketAddr> {
        self.candidates
            .read()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Tells the device that `channel` opened, with the client's candidates.
    pub(crate) fn opened(&self, channel: u64, peer: Vec<SocketAddr>) {
        if let Some(d) = self.device() {
            let _ = d
                .events
                .try_send(RelayEvent::ChannelOpened { channel, peer });
        }
    }

    pub(crate) fn tokens(&self) -> Arc<Vec<TokenHash>> {
        self.tokens
            .read()
            .map_or_else(|_| Arc::new(Vec::new()), |t| t.clone())
    }

    /// Opens `channel` to `client`; `false` when the id is taken.
    pub(crate) fn open(&self, channel: u64, client: &quinn::Connection) -> bool {
        let Ok(mut c) = self.channels.write() else {
            return false;
        };
        if c.contains_key(&channel) {
            return false;
        }
        c.insert(channel, client.clone());
        drop(c);
        self.bump();
        true
    }

    /// Closes `channel` and tells the device.
    pub(crate) fn close(&self, channel: u64) {
        if let Ok(mut c) = self.channels.write() {
            c.remove(&channel);
        }
        self.bump();
        if let Some(d) = self.device() {
            let _ = d.events.try_send(RelayEvent::ChannelClosed { channel });
        }
    }

    /// The client legs of the open channels.
    pub(crate) fn client_conns(&self) -> Vec<quinn::Connection> {
        self.channels
            .read()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn channel_count(&self) -> usize {
        self.channels.read().map_or(0, |c| c.len())
    }

    /// Whether nothing uses the hub any more (it can be forgotten).
    pub(crate) fn is_idle(&self) -> bool {
        self.device().is_none() && self.channel_count() == 0
    }

    /// Closes every channel's leg (the device is gone for good: removed from the relay).
    pub(crate) fn close_all(&self, code: quinn::VarInt, reason: &[u8]) {
        if let Some(d) = self.device() {
            d.conn.close(code, reason);
        }
        if let Ok(c) = self.channels.read() {
            for conn in c.values() {
                conn.close(code, reason);
            }
        }
    }
}

fn is_probe(datagram: &[u8]) -> bool {
    tunnel_core::relay::split_tag(datagram).map(|(ch, _)| ch)
        == Some(tunnel_core::relay::PROBE_CHANNEL)
}

/// Sends `datagram` on `to` if its queue has room; counts it either way.
fn send(to: &quinn::Connection, datagram: Bytes, counters: &Counters) {
    let len = datagram.len();
    if to.datagram_send_buffer_space() >= len && to.send_datagram(datagram).is_ok() {
        counters.sent(len);
    } else {
        counters.drop_one();
    }
}

/// What a device leg's task forwards to: its channels, refreshed on a generation change.
pub(crate) struct DeviceRoutes {
    generation: u64,
    channels: HashMap<u64, quinn::Connection>,
}

impl DeviceRoutes {
    pub(crate) fn new() -> Self {
        Self {
            generation: u64::MAX,
            channels: HashMap::new(),
        }
    }

    /// Forwards a datagram the device sent (on `from`) to the client of its tag; a path probe
    /// goes back to `from`.
    pub(crate) fn forward(
        &mut self,
        hub: &Hub,
        from: &quinn::Connection,
        datagram: Bytes,
        counters: &Counters,
    ) {
        if is_probe(&datagram) {
            return send(from, datagram, counters);
        }
        let g = hub.generation();
        if g != self.generation {
            self.channels = hub.channels.read().map(|c| c.clone()).unwrap_or_default();
            self.generation = g;
        }
        match tunnel_core::relay::split_tag(&datagram).and_then(|(ch, _)| self.channels.get(&ch)) {
            Some(client) => send(client, datagram, counters),
            None => counters.drop_one(),
        }
    }
}

/// What a client leg's task forwards to: the device's current leg.
pub(crate) struct ClientRoute {
    channel: u64,
    generation: u64,
    device: Option<quinn::Connection>,
}

impl ClientRoute {
    pub(crate) fn new(channel: u64) -> Self {
        Self {
            channel,
            generation: u64::MAX,
            device: None,
        }
    }

    /// Forwards a datagram the client sent to the device, if it carries the client's own
    /// channel tag (a client cannot inject into another client's channel).
    pub(crate) fn forward(
        &mut self,
        hub: &Hub,
        from: &quinn::Connection,
        datagram: Bytes,
        counters: &Counters,
    ) {
        if is_probe(&datagram) {
            return send(from, datagram, counters);
        }
        if tunnel_core::relay::split_tag(&datagram).map(|(ch, _)| ch) != Some(self.channel) {
            counters.drop_one();
            return;
        }
        let g = hub.generation();
        if g != self.generation {
            self.device = hub.device().map(|d| d.conn);
            self.generation = g;
        }
        match &self.device {
            // The device is between legs (re-attaching): as loss.
            None => counters.drop_one(),
            Some(d) => send(d, datagram, counters),
        }
    }
}
