//! Resource limits as data: what counts as one source, a token bucket, and the gate every new
//! QUIC handshake passes before the device spends anything on it.
//!
//! Kind: pure (time is an input). The device and the relay hold these behind locks and apply the
//! decisions (`Incoming::accept`, `retry`, `ignore`).
//!
//! # The handshake gate (DESIGN §4, hardening)
//! Anyone can send a device an Initial packet from any (spoofed) address, and each accepted one
//! holds a connection slot until its handshake completes or times out. So:
//! - once more than [`HandshakeLimits::retry_threshold`] handshakes are in flight, a source that
//!   has not proven its address gets a QUIC Retry (stateless: it costs the device nothing, and a
//!   spoofed source never answers it);
//! - handshakes in flight are capped per source (an IPv4 address or an IPv6 /64) and in total;
//!   past either cap new ones are dropped silently (an answer would only help a flood);
//! - only connections past `Hello` count toward the established-connection cap, so a handshake
//!   flood cannot fill it.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The unit limits count per: an IPv4 address, or an IPv6 /64 (one subscriber's prefix, so an
/// attacker cannot rotate through its own addresses). IPv4-mapped IPv6 counts as IPv4.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let mut s = v6.segments();
            s[4..].fill(0);
            IpAddr::V6(s.into())
        }
    }
}

/// A token bucket: `capacity` tokens, refilled at `per_sec`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
    capacity: f64,
    per_sec: f64,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(capacity: f64, per_sec: f64, now: Instant) -> Self {
        Self {
            tokens: capacity,
            at: now,
            capacity,
            per_sec,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.capacity);
        self.at = now;
    }

    /// How long until a token is available (zero: one is).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec)
        }
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.wait(now).is_zero() {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes a token, going no lower than empty.
    pub fn spend(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// Gives a token back (up to the capacity).
    pub fn refund(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + 1.0).min(self.capacity);
    }

    /// Whether it is full (a full bucket is the same as a fresh one and can be forgotten).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }

    /// Tokens now (for choosing what to forget).
    pub fn tokens(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }
}

/// Limits of the [`HandshakeGate`] (`[limits]` in `device.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Handshakes in flight above which unvalidated sources get a Retry.
    pub retry_threshold: usize,
    /// Handshakes in flight from one source.
    pub per_source: usize,
    /// Handshakes in flight in total.
    pub total: usize,
    /// Of `total`, the slots only privileged sources may take (an owner's credential, so that
    /// other credential holders cannot fill the gate); 0 for gates without privileged sources.
    pub reserved: usize,
}

/// What to do with a new handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Start the handshake (take a slot with [`HandshakeGate::begin`]).
    Accept,
    /// Ask the source to prove its address first (QUIC Retry).
    Retry,
    /// Drop it without an answer: a cap is full.
    Ignore,
}

/// Handshakes in flight, per source and in total. A source is whatever the caller counts by:
/// [`source_key`] of the address for direct handshakes, the credential a relay admitted the
/// channel with for relayed ones (a channel's virtual address would make every channel its own
/// source).
#[derive(Debug)]
pub struct HandshakeGate<K = IpAddr> {
    per_source: HashMap<K, usize>,
    total: usize,
    /// Of `total`, those of sources that are not privileged.
    unprivileged: usize,
}

impl<K> Default for HandshakeGate<K> {
    fn default() -> Self {
        Self {
            per_source: HashMap::new(),
            total: 0,
            unprivileged: 0,
        }
    }
}

impl<K: Hash + Eq + Clone> HandshakeGate<K> {
    /// Decides on a new handshake from `source`; `validated` when its address is proven (it
    /// came back with our Retry token), `privileged` when it may use the reserved slots.
    /// `can_retry` is false when a Retry was already used.
    pub fn decide(
        &self,
        source: &K,
        validated: bool,
        privileged: bool,
        can_retry: bool,
        limits: &HandshakeLimits,
    ) -> Gate {
        if !validated && self.total >= limits.retry_threshold {
            return if can_retry { Gate::Retry } else { Gate::Ignore };
        }
        let from_source = self.per_source.get(source).copied().unwrap_or(0);
        let open = limits.total.saturating_sub(limits.reserved);
        if self.total >= limits.total
            || from_source >= limits.per_source
            || (!privileged && self.unprivileged >= open)
        {
            return Gate::Ignore;
        }
        Gate::Accept
    }

    /// Counts a handshake from `source` as in flight.
    pub fn begin(&mut self, source: K, privileged: bool) {
        *self.per_source.entry(source).or_insert(0) += 1;
        self.total += 1;
        if !privileged {
            self.unprivileged += 1;
        }
    }

    /// A handshake from `source` ended (done, failed or timed out); `privileged` as it began.
    pub fn end(&mut self, source: &K, privileged: bool) {
        if let Some(n) = self.per_source.get_mut(source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(source);
            }
        }
        self.total = self.total.saturating_sub(1);
        if !privileged {
            self.unprivileged = self.unprivileged.saturating_sub(1);
        }
    }

    /// Handshakes in flight.
    pub fn in_flight(&self) -> usize {
        self.total
    }
}

/// Slots held per key, each key up to a cap: a [`KeySlot`] is one, given back when dropped
/// (connections per source of the metrics exporter, TLS handshakes per source of TCP legs).
/// Cheap to clone; clones share the counts.
#[derive(Debug)]
pub struct KeySlots<K: Hash + Eq> {
    held: std::sync::Arc<std::sync::Mutex<HashMap<K, usize>>>,
}

impl<K: Hash + Eq> Default for KeySlots<K> {
    fn default() -> Self {
        Self {
            held: std::sync::Arc::default(),
        }
    }
}

impl<K: Hash + Eq> Clone for KeySlots<K> {
    fn clone(&self) -> Self {
        Self {
            held: self.held.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone> KeySlots<K> {
    /// One of `key`'s slots, if it holds fewer than `cap`.
    pub fn take(&self, key: K, cap: usize) -> Option<KeySlot<K>> {
        let mut held = self.held.lock().ok()?;
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(KeySlot {
            slots: self.clone(),
            key,
        })
    }

    /// Slots `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.held
            .lock()
            .map_or(0, |h| h.get(key).copied().unwrap_or(0))
    }
}

/// A slot of a [`KeySlots`]; given back when dropped.
#[derive(Debug)]
pub struct KeySlot<K: Hash + Eq> {
    slots: KeySlots<K>,
    key: K,
}

impl<K: Hash + Eq> Drop for KeySlot<K> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.slots.held.lock()
            && let Some(n) = held.get_mut(&self.key)
        {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HandshakeLimits = HandshakeLimits {
        retry_threshold: 4,
        per_source: 3,
        total: 6,
        reserved: 0,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_are_addresses_or_slash_64s() {
        assert_eq!(source_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(source_key(ip("192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn gate_table() {
        let mut g = HandshakeGate::default();
        let flood = ip("203.0.113.9");
        let owner = ip("198.51.100.7");
        // Below the threshold everyone starts at once, up to the per-source cap.
        for _ in 0..3 {
            assert_eq!(g.decide(&flood, false, false, true, &LIMITS), Gate::Accept);
            g.begin(flood, false);
        }
        assert_eq!(g.decide(&flood, false, false, true, &LIMITS), Gate::Ignore);
        assert_eq!(g.decide(&owner, false, false, true, &LIMITS), Gate::Accept);
        g.begin(owner, false);
        // Past the threshold, unproven sources are asked to prove their address...
        assert_eq!(g.decide(&owner, false, false, true, &LIMITS), Gate::Retry);
        assert_eq!(g.decide(&owner, false, false, false, &LIMITS), Gate::Ignore);
        // ...and proven ones still come in, within the caps.
        assert_eq!(g.decide(&owner, true, false, false, &LIMITS), Gate::Accept);
        assert_eq!(g.decide(&flood, true, false, false, &LIMITS), Gate::Ignore);
        g.begin(owner, false);
        g.begin(owner, false);
        assert_eq!(g.in_flight(), 6);
        assert_eq!(
            g.decide(&ip("192.0.2.1"), true, false, false, &LIMITS),
            Gate::Ignore
        );
        // Slots come back as handshakes end.
        for _ in 0..3 {
            g.end(&flood, false);
        }
        assert_eq!(g.in_flight(), 3);
        assert_eq!(g.decide(&flood, false, false, true, &LIMITS), Gate::Accept);
        assert!(!g.per_source.contains_key(&flood));
    }

    /// Issue 18, defect 1: relayed handshakes of many credentials filled the one gate, so an
    /// owner could not start one. The reserved slots are the owner's.
    #[test]
    fn reserved_slots_are_kept_for_privileged_sources() {
        let limits = HandshakeLimits {
            retry_threshold: 100,
            per_source: 2,
            total: 6,
            reserved: 2,
        };
        let mut g: HandshakeGate<u32> = HandshakeGate::default();
        // Guests 1 and 2 take 2 each; guest 3 gets nothing: 4 = total - reserved.
        for guest in [1, 1, 2, 2] {
            assert_eq!(g.decide(&guest, true, false, true, &limits), Gate::Accept);
            g.begin(guest, false);
        }
        assert_eq!(g.decide(&3, true, false, true, &limits), Gate::Ignore);
        // The owner still gets in, up to its own per-source cap.
        assert_eq!(g.decide(&9, true, true, true, &limits), Gate::Accept);
        g.begin(9, true);
        assert_eq!(g.decide(&9, true, true, true, &limits), Gate::Accept);
        g.begin(9, true);
        assert_eq!(g.decide(&8, true, true, true, &limits), Gate::Ignore);
        g.end(&9, true);
        assert_eq!(g.decide(&3, true, false, true, &limits), Gate::Ignore);
        g.end(&1, false);
        assert_eq!(g.decide(&3, true, false, true, &limits), Gate::Accept);
    }

    #[test]
    fn key_slots_cap_each_key_and_come_back() {
        let slots: KeySlots<u8> = KeySlots::default();
        let a: Vec<_> = (0..3).filter_map(|_| slots.take(1, 2)).collect();
        assert_eq!(a.len(), 2);
        let b = slots.take(2, 2);
        assert!(b.is_some());
        assert_eq!(slots.held(&1), 2);
        drop(a);
        assert_eq!(slots.held(&1), 0);
        assert!(slots.take(1, 2).is_some());
    }

    #[test]
    fn token_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 1.0, t0);
        assert!(b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0));
        assert_eq!(b.wait(t0), Duration::from_secs(1));
        assert!(b.try_take(t0 + Duration::from_secs(1)));
        b.refund(t0 + Duration::from_secs(1));
        assert!(b.try_take(t0 + Duration::from_secs(1)));
        assert!(!b.is_full(t0 + Duration::from_secs(1)));
        assert!(b.is_full(t0 + Duration::from_secs(10)));
    }
}
