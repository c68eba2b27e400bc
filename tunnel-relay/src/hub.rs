//! One device's meeting point on the relay: its current leg, its clients' channels (each with the
//! credential that opened it) and the hashes of the tokens that may reach it; and the forwarding
//! between them.
//!
//! Kind: IO (sends datagrams on QUIC connections).
//!
//! The hot path takes no lock: each leg task keeps its own copy of what it forwards to and
//! refreshes it when the hub's generation number moves (a channel opened or closed, the device
//! re-attached). A datagram that the receiving leg has no room for is dropped and counted, never
//! queued without bound (the inner connection's congestion control sees it as loss).
//!
//! A client's channel carries one end-to-end connection, whose handshake is a handful of QUIC
//! long-header packets; after it, only short headers. So the relay lets each channel send the
//! device [`HANDSHAKE_BURST`] long-header datagrams, then [`HANDSHAKE_PER_SEC`]: a token holder
//! cannot pour ClientHellos into the device through its channels (issue 18: ten channels of one
//! Guest locked the owner out).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc;
use tunnel_core::limits::TokenBucket;
use tunnel_core::relay::{Credential, KeyId, RelayEvent, TokenEntry, TokenHash};

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
    /// Of those, long-header (handshake) datagrams of a client over its channel's budget.
    pub(crate) dropped_handshakes: AtomicU64,
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

/// A client's open channel: its leg and what admitted it.
#[derive(Clone)]
pub(crate) struct ChannelInfo {
    /// The client's leg.
    pub(crate) conn: quinn::Connection,
    /// The credential (token hash, or JWT subject) that admitted it.
    pub(crate) credential: Credential,
    /// Whether that credential is an owner's.
    pub(crate) owner: bool,
    /// Whether it was a JWT (not affected by the device's token updates; it ends at `exp`).
    pub(crate) jwt: bool,
}

/// The caps a new channel is checked against ([`Hub::open`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelCaps {
    /// Channels to the device in all.
    pub(crate) per_device: usize,
    /// Of those, the ones only owners' credentials may take.
    pub(crate) owner_reserved: usize,
    /// Channels one (non-owner) credential may hold.
    pub(crate) per_credential: usize,
}

impl ChannelCaps {
    /// The caps `relay.toml`'s limits set; the owners' reserve is at most half the channels.
    pub(crate) fn from_limits(limits: &crate::config::RelayLimits) -> Self {
        let cap = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
        Self {
            per_device: cap(limits.max_channels_per_device),
            owner_reserved: cap(limits
                .owner_reserved_channels
                .min(limits.max_channels_per_device / 2)),
            per_credential: cap(limits.max_channels_per_token),
        }
    }
}

/// Why [`Hub::open`] refused a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenRefusal {
    /// The channel id is taken.
    InUse,
    /// A cap is reached.
    Busy,
    /// The token was removed while the channel was being opened.
    Revoked,
}

/// The tokens a device accepts, as it uploaded them, indexed by the [`KeyId`] proofs name.
#[derive(Default)]
pub(crate) struct Tokens {
    /// As uploaded (for the registry).
    pub(crate) entries: Vec<TokenEntry>,
    by_key: HashMap<KeyId, Vec<TokenEntry>>,
}

/// The [`Tokens`] of `entries` (e.g. a registry entry's).
pub(crate) fn tokens_of(entries: Vec<TokenEntry>) -> Tokens {
    Tokens::new(entries)
}

impl Tokens {
    fn new(entries: Vec<TokenEntry>) -> Self {
        let mut by_key: HashMap<KeyId, Vec<TokenEntry>> = HashMap::new();
        for e in &entries {
            by_key.entry(e.hash.key_id()).or_default().push(*e);
        }
        Self { entries, by_key }
    }

    /// The token a MAC proof made with `key` over `binding` proves, if any (every candidate
    /// of that key id is checked in constant time).
    pub(crate) fn verify(
        &self,
        key: KeyId,
        binding: &[u8; 32],
        mac: &[u8; 32],
    ) -> Option<TokenEntry> {
        let mut found = None;
        for e in self.by_key.get(&key).into_iter().flatten() {
            if e.hash.verifies(binding, mac) {
                found = Some(*e);
            }
        }
        found
    }

    fn contains(&self, hash: &TokenHash) -> bool {
        self.by_key
            .get(&hash.key_id())
            .is_some_and(|v| v.iter().any(|e| e.hash == *hash))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A device's hub.
pub(crate) struct Hub {
    pub(crate) id: String,
    generation: AtomicU64,
    device: RwLock<Option<DeviceLeg>>,
    channels: RwLock<HashMap<u64, ChannelInfo>>,
    tokens: RwLock<Arc<Tokens>>,
}

impl Hub {
    pub(crate) fn new(id: String) -> Self {
        Self {
            id,
            generation: AtomicU64::new(0),
            device: RwLock::new(None),
            channels: RwLock::new(HashMap::new()),
            tokens: RwLock::new(Arc::new(Tokens::default())),
        }
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Makes `leg` the device's leg, with its tokens; returns the leg it replaces and the
    /// channels the new tokens no longer admit.
    pub(crate) fn attach(
        &self,
        leg: DeviceLeg,
        tokens: Vec<TokenEntry>,
    ) -> (Option<DeviceLeg>, Vec<quinn::Connection>) {
        let revoked = self.set_tokens(tokens);
        let old = self.device.write().ok().and_then(|mut d| d.replace(leg));
        self.bump();
        (old, revoked)
    }

    /// Forgets leg `id` if it is still the device's leg (its tokens stay known: a client's proof
    /// can still be checked while the device is away).
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

    /// Replaces the device's tokens; returns the client legs of the channels a token no longer
    /// in the set opened (the caller closes them).
    pub(crate) fn set_tokens(&self, tokens: Vec<TokenEntry>) -> Vec<quinn::Connection> {
        let tokens = Arc::new(Tokens::new(tokens));
        // The new set first, then the channels: a channel [`Self::open`] adds meanwhile either
        // is seen here or sees the new set (it checks it under the channels' lock).
        if let Ok(mut t) = self.tokens.write() {
            *t = tokens.clone();
        }
        self.channels
            .read()
            .map(|c| {
                c.values()
                    .filter(|ch| !ch.jwt && !tokens.contains(&TokenHash(ch.credential.0)))
                    .map(|ch| ch.conn.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Tells the device that `channel` opened with `credential`.
    pub(crate) fn opened(&self, channel: u64, credential: Credential) {
        if let Some(d) = self.device() {
            let _ = d.events.try_send(RelayEvent::ChannelOpened {
                channel,
                credential,
            });
        }
    }

    pub(crate) fn tokens(&self) -> Arc<Tokens> {
        self.tokens
            .read()
            .map_or_else(|_| Arc::new(Tokens::default()), |t| t.clone())
    }

    /// Opens `channel` for `info` within `caps`: the device's cap (the last
    /// `owner_reserved` slots for owners only), and for a non-owner credential its own cap;
    /// its token must still be one the device accepts.
    pub(crate) fn open(
        &self,
        channel: u64,
        info: ChannelInfo,
        caps: ChannelCaps,
    ) -> Result<(), OpenRefusal> {
        let Ok(mut c) = self.channels.write() else {
            return Err(OpenRefusal::Busy);
        };
        if c.contains_key(&channel) {
            return Err(OpenRefusal::InUse);
        }
        if !info.jwt && !self.tokens().contains(&TokenHash(info.credential.0)) {
            return Err(OpenRefusal::Revoked);
        }
        let others = c.values().filter(|ch| !ch.owner).count();
        let same = c
            .values()
            .filter(|ch| ch.credential == info.credential)
            .count();
        let open_to_all = caps.per_device.saturating_sub(caps.owner_reserved);
        if c.len() >= caps.per_device
            || (!info.owner && (others >= open_to_all || same >= caps.per_credential))
        {
            return Err(OpenRefusal::Busy);
        }
        c.insert(channel, info);
        drop(c);
        self.bump();
        Ok(())
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
            .map(|c| c.values().map(|ch| ch.conn.clone()).collect())
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
        for conn in self.client_conns() {
            conn.close(code, reason);
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
            self.channels = hub
                .channels
                .read()
                .map(|c| c.iter().map(|(k, v)| (*k, v.conn.clone())).collect())
                .unwrap_or_default();
            self.generation = g;
        }
        match tunnel_core::relay::split_tag(&datagram).and_then(|(ch, _)| self.channels.get(&ch)) {
            Some(client) => send(client, datagram, counters),
            None => counters.drop_one(),
        }
    }
}

/// Long-header (handshake) datagrams a client's channel may send the device at once, and then
/// per second: a handshake takes a handful; a flood of ClientHellos is cut to a trickle.
pub(crate) const HANDSHAKE_BURST: f64 = 32.0;
/// See [`HANDSHAKE_BURST`].
pub(crate) const HANDSHAKE_PER_SEC: f64 = 1.0;

/// Whether `inner` (a relayed packet, tag removed) starts with a QUIC long header: Initial,
/// 0-RTT, Handshake or Retry, i.e. part of a handshake.
fn is_long_header(inner: &[u8]) -> bool {
    inner.first().is_some_and(|b| b & 0x80 != 0)
}

/// What a client leg's task forwards to: the device's current leg.
pub(crate) struct ClientRoute {
    channel: u64,
    generation: u64,
    device: Option<quinn::Connection>,
    handshakes: TokenBucket,
}

impl ClientRoute {
    pub(crate) fn new(channel: u64, now: std::time::Instant) -> Self {
        Self {
            channel,
            generation: u64::MAX,
            device: None,
            handshakes: TokenBucket::new(HANDSHAKE_BURST, HANDSHAKE_PER_SEC, now),
        }
    }

    /// Forwards a datagram the client sent to the device, if it carries the client's own
    /// channel tag (a client cannot inject into another client's channel) and, for a handshake
    /// packet, the channel's budget allows it.
    pub(crate) fn forward(
        &mut self,
        hub: &Hub,
        from: &quinn::Connection,
        datagram: Bytes,
        counters: &Counters,
        now: std::time::Instant,
    ) {
        if is_probe(&datagram) {
            return send(from, datagram, counters);
        }
        let Some((channel, inner)) = tunnel_core::relay::split_tag(&datagram) else {
            counters.drop_one();
            return;
        };
        if channel != self.channel {
            counters.drop_one();
            return;
        }
        if is_long_header(inner) && !self.handshakes.try_take(now) {
            counters.drop_one();
            counters.dropped_handshakes.fetch_add(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_headers_are_told_from_short_ones() {
        assert!(is_long_header(&[0xc0, 0, 0, 0, 1]));
        assert!(is_long_header(&[0xe0]));
        assert!(!is_long_header(&[0x40, 1, 2]));
        assert!(!is_long_header(&[]));
    }
}
