//! The socket behind every endpoint: the real UDP socket for direct paths, plus relayed channels,
//! each behind a stable *virtual* peer address, carried as QUIC datagrams of a relay leg
//! (DESIGN §13).
//!
//! Kind: IO.
//!
//! quinn sees one [`quinn::AsyncUdpSocket`]. A datagram for a virtual address goes to its relay
//! leg with the channel's 8-byte tag in front ([`crate::relay::tag`]); everything else goes to
//! the UDP socket. Relayed datagrams come in through [`Paths::deliver`] (the leg's task calls it)
//! and quinn reads them as if they came from the virtual address. Protocol code never knows which
//! path a packet took; the device only asks [`is_virtual`] (a relayed connection is remote).
//!
//! Contract with quinn: [`quinn::AsyncUdpSocket::try_send`] on a relayed route never fails
//! (quinn would fail the connection): a datagram the leg cannot take (too large, leg lost, queue
//! full) is dropped and counted, like UDP loss. quinn's batches (GSO) are split per segment on a
//! relayed route. Virtual addresses are in the UDP socket's family: `240.0.0.0/4` (reserved,
//! never routed) for IPv4 sockets and `100::/64` (RFC 6666, discard-only) for IPv6 ones.
//!
//! A relayed route can also go *direct* ([`super::punch`]): once a probe round trip to the peer
//! succeeded, its datagrams leave the UDP socket for the punched address (batches kept whole),
//! and datagrams from that address are handed to quinn as coming from the virtual address. The
//! socket also takes in what is not QUIC: probes ([`super::punch::is_probe`]) and STUN binding
//! responses ([`Paths::reflexive`]), which quinn never sees.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::{mpsc, oneshot};

use super::punch::{self, Kind, Probe, PunchKey};
use crate::identity::Fingerprint;
use crate::limits::TokenBucket;
use crate::relay::TAG_LEN;
use crate::stun;

/// Relayed datagrams queued for quinn at most; more are dropped (and counted).
const INBOX: usize = 4096;

/// Relayed channels one socket holds at most.
pub const MAX_ROUTES: usize = 65_536;

/// Whether `addr` is a virtual (relayed) address of this module.
pub fn is_virtual(addr: SocketAddr) -> bool {
    match addr.ip().to_canonical() {
        IpAddr::V4(v4) => v4.octets()[0] & 0xf0 == 240,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0
        }
    }
}

fn virtual_addr(v6: bool, n: u32) -> SocketAddr {
    if v6 {
        let mut s = [0u16; 8];
        s[0] = 0x0100;
        s[6] = u16::try_from(n >> 16).unwrap_or(0);
        s[7] = u16::try_from(n & 0xffff).unwrap_or(0);
        SocketAddr::from((Ipv6Addr::from(s), 1))
    } else {
        // 240.0.0.0/4 leaves 28 bits; routes are capped far below that.
        SocketAddr::from((Ipv4Addr::from(0xf000_0000 | (n & 0x0fff_ffff)), 1))
    }
}

/// Which relayed channel: the relay (by its key) and the channel id it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteKey {
    /// The relay's fingerprint.
    pub relay: Fingerprint,
    /// The channel on that relay.
    pub channel: u64,
}

struct Route {
    leg: quinn::Connection,
    tag: [u8; TAG_LEN],
    key: RouteKey,
    /// The punched address, while the route is direct.
    direct: Option<SocketAddr>,
}

/// A route's hole-punching state: its connection's probe keys, the pings in flight, the peer's
/// pings already answered, the real addresses accepted as the peer's, the probe budgets, the
/// last pong.
struct Punch {
    key: PunchKey,
    /// Pings in flight: the transaction and where the ping went. A pong counts only once and
    /// only from that address (issue 18: a replayed pong from anywhere moved the path).
    pending: VecDeque<(u64, SocketAddr)>,
    /// Transactions of the peer's pings answered already: a replayed ping gets no pong.
    answered: VecDeque<u64>,
    /// Real addresses whose datagrams are this route's, oldest first.
    aliases: VecDeque<SocketAddr>,
    /// Pings this route may still send, and pongs.
    pings: TokenBucket,
    pongs: TokenBucket,
    last_pong: Option<Instant>,
}

impl Punch {
    fn new(key: PunchKey, now: Instant) -> Self {
        Self {
            key,
            pending: VecDeque::new(),
            answered: VecDeque::new(),
            aliases: VecDeque::new(),
            pings: TokenBucket::new(PINGS_BURST, PINGS_PER_SEC, now),
            pongs: TokenBucket::new(PONGS_BURST, PONGS_PER_SEC, now),
            last_pong: None,
        }
    }
}

/// Pings remembered per route (older pongs are ignored).
const MAX_PENDING: usize = 64;

/// The peer's ping transactions remembered per route (a replay of one of them is not answered).
const MAX_ANSWERED: usize = 1024;

/// Real addresses one route accepts as the peer's at most (a NAT's mapping, its LAN address, a
/// few more as mappings move); the oldest is forgotten first, never the punched one.
pub const MAX_ALIASES: usize = 8;

/// Pings one route may send: a full attempt (25 rounds × 8 candidates) at once, then about one
/// attempt a minute (keepalives of a direct path included).
const PINGS_BURST: f64 = 200.0;
const PINGS_PER_SEC: f64 = 200.0 / 60.0;

/// Pongs one route answers with: the peer's attempt is 25 rounds of at most 8 pings.
const PONGS_BURST: f64 = 64.0;
const PONGS_PER_SEC: f64 = 20.0;

/// Pings the whole socket may send, over all routes.
const SOCKET_PINGS_BURST: f64 = 800.0;
const SOCKET_PINGS_PER_SEC: f64 = 400.0;

/// Which path a route takes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// Through its relay leg.
    Relayed,
    /// Straight to the punched address.
    Direct(SocketAddr),
}

/// Counters of the relayed routes (for status and tests).
#[derive(Debug, Default)]
pub struct PathStats {
    /// Datagrams sent on relayed routes.
    pub relayed_sent: AtomicU64,
    /// Datagrams received on relayed routes.
    pub relayed_received: AtomicU64,
    /// Datagrams dropped: too large for the leg, leg lost, queue full, no route.
    pub relayed_dropped: AtomicU64,
    /// Probes sent (pings and pongs).
    pub probes_sent: AtomicU64,
    /// Probes received that did not verify (wrong key, unknown channel, a pong from elsewhere
    /// than its ping went or used already, a replayed ping): ignored.
    pub probes_rejected: AtomicU64,
    /// Probes not sent or not answered because a budget was spent (per route, per socket).
    pub probes_capped: AtomicU64,
    /// Datagrams sent straight to punched addresses.
    pub direct_sent: AtomicU64,
    /// Datagrams for a punched address dropped because their route's leg could not carry them
    /// (path MTU probes above what the relay path holds): the connection's packet size stays
    /// one the relay can carry, so falling back to it loses nothing.
    pub direct_oversized: AtomicU64,
}

#[derive(Default)]
struct Table {
    routes: HashMap<SocketAddr, Route>,
    addrs: HashMap<RouteKey, SocketAddr>,
    by_channel: HashMap<u64, SocketAddr>,
    punches: HashMap<SocketAddr, Punch>,
    /// Real peer address (canonical) → the virtual address its datagrams belong to.
    aliases: HashMap<SocketAddr, SocketAddr>,
    /// The peer's candidates per route, and a generation that moves when they change.
    candidates: HashMap<RouteKey, (Vec<SocketAddr>, u64)>,
}

struct Shared {
    v6: bool,
    udp: Arc<dyn AsyncUdpSocket>,
    table: RwLock<Table>,
    /// Addresses no peer may name as a candidate (the device's services).
    forbidden: RwLock<Vec<SocketAddr>>,
    /// Pings of every route together.
    pings: Mutex<TokenBucket>,
    next: AtomicU32,
    aliases: AtomicUsize,
    inbox: mpsc::Sender<(SocketAddr, Bytes)>,
    stun: Mutex<HashMap<stun::TxId, oneshot::Sender<SocketAddr>>>,
    stats: PathStats,
}

/// The relayed half of a [`PathSocket`]: add and remove routes, deliver what legs receive.
/// Cheap to clone.
#[derive(Clone)]
pub struct Paths(Arc<Shared>);

impl fmt::Debug for Paths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Paths")
            .field("routes", &self.route_count())
            .finish_non_exhaustive()
    }
}

impl Paths {
    /// The virtual address of `key`, routed over `leg` from now on. The same key always gets the
    /// same address (so a leg that reconnects keeps the connections it carried); `None` when the
    /// socket holds [`MAX_ROUTES`] routes already.
    pub fn bind(&self, key: RouteKey, leg: &quinn::Connection) -> Option<SocketAddr> {
        let mut t = self.0.table.write().ok()?;
        let addr = match t.addrs.get(&key) {
            Some(a) => *a,
            None => {
                if t.addrs.len() >= MAX_ROUTES {
                    return None;
                }
                let n = self.0.next.fetch_add(1, Ordering::Relaxed);
                let a = virtual_addr(self.0.v6, n);
                t.addrs.insert(key, a);
                a
            }
        };
        match t.routes.get_mut(&addr) {
            // A leg that came back: a direct route stays direct.
            Some(r) => r.leg = leg.clone(),
            None => {
                t.routes.insert(
                    addr,
                    Route {
                        leg: leg.clone(),
                        tag: crate::relay::tag(key.channel),
                        key,
                        direct: None,
                    },
                );
            }
        }
        t.by_channel.insert(key.channel, addr);
        Some(addr)
    }

    /// Forgets `key` (its address is not reused).
    pub fn unbind(&self, key: RouteKey) {
        if let Ok(mut t) = self.0.table.write() {
            t.candidates.remove(&key);
            if let Some(addr) = t.addrs.remove(&key) {
                t.routes.remove(&addr);
                t.punches.remove(&addr);
                if t.by_channel.get(&key.channel) == Some(&addr) {
                    t.by_channel.remove(&key.channel);
                }
                t.aliases.retain(|_, v| *v != addr);
                self.0.aliases.store(t.aliases.len(), Ordering::Relaxed);
            }
        }
    }

    /// Records the peer's candidate addresses for `key` (what it said over the end-to-end
    /// connection), cut to the acceptable ones ([`punch::acceptable_candidate`]: no loopback
    /// unless the relay is on loopback too, none of the [forbidden](Self::set_forbidden)
    /// addresses), at most [`punch::MAX_CANDIDATES`]. Nothing for a route that is not bound.
    pub fn set_candidates(&self, key: RouteKey, candidates: &[SocketAddr]) {
        let Ok(mut t) = self.0.table.write() else {
            return;
        };
        let Some(relay) = t
            .addrs
            .get(&key)
            .and_then(|a| t.routes.get(a))
            .map(|r| r.leg.remote_address())
        else {
            return;
        };
        let forbidden = self
            .0
            .forbidden
            .read()
            .map(|f| f.clone())
            .unwrap_or_default();
        let mut list: Vec<SocketAddr> = Vec::new();
        for c in candidates
            .iter()
            .copied()
            .filter(|c| punch::acceptable_candidate(*c, relay, &forbidden))
        {
            let c = self.fit(c);
            if !list.contains(&c) && list.len() < punch::MAX_CANDIDATES {
                list.push(c);
            }
        }
        let e = t.candidates.entry(key).or_insert_with(|| (Vec::new(), 0));
        if e.0 != list {
            e.0 = list;
            e.1 += 1;
        }
    }

    /// Addresses no peer may name as a candidate: the device's own services (a peer must not
    /// make the device probe them).
    pub fn set_forbidden(&self, addrs: Vec<SocketAddr>) {
        if let Ok(mut f) = self.0.forbidden.write() {
            *f = addrs;
        }
    }

    /// Which relayed channel the virtual address `vaddr` is.
    pub fn key_of(&self, vaddr: SocketAddr) -> Option<RouteKey> {
        Some(self.0.table.read().ok()?.routes.get(&vaddr)?.key)
    }

    /// The peer's candidates of the route at `vaddr` and their generation; `None` once the route
    /// is gone.
    pub fn candidates(&self, vaddr: SocketAddr) -> Option<(Vec<SocketAddr>, u64)> {
        let t = self.0.table.read().ok()?;
        let key = t.routes.get(&vaddr)?.key;
        Some(t.candidates.get(&key).cloned().unwrap_or_default())
    }

    /// Gives the route at `vaddr` its connection's probe key (hole punching starts); `false`
    /// when there is no such route.
    pub fn arm(&self, vaddr: SocketAddr, key: PunchKey) -> bool {
        let Ok(mut t) = self.0.table.write() else {
            return false;
        };
        if !t.routes.contains_key(&vaddr) {
            return false;
        }
        t.punches.insert(vaddr, Punch::new(key, Instant::now()));
        true
    }

    /// Ends hole punching for `vaddr`: relayed again, the peer's real addresses forgotten.
    pub fn disarm(&self, vaddr: SocketAddr) {
        if let Ok(mut t) = self.0.table.write() {
            t.punches.remove(&vaddr);
            if let Some(r) = t.routes.get_mut(&vaddr) {
                r.direct = None;
            }
            t.aliases.retain(|_, v| *v != vaddr);
            self.0.aliases.store(t.aliases.len(), Ordering::Relaxed);
        }
    }

    /// The path the route at `vaddr` takes now; `None` when it is not a route.
    pub fn state(&self, vaddr: SocketAddr) -> Option<PathState> {
        let t = self.0.table.read().ok()?;
        Some(
            t.routes
                .get(&vaddr)?
                .direct
                .map_or(PathState::Relayed, PathState::Direct),
        )
    }

    /// Time since the last pong on the route at `vaddr`.
    pub fn since_pong(&self, vaddr: SocketAddr) -> Option<Duration> {
        let t = self.0.table.read().ok()?;
        t.punches.get(&vaddr)?.last_pong.map(|p| p.elapsed())
    }

    /// Sends the route at `vaddr` through its relay again.
    pub fn fall_back(&self, vaddr: SocketAddr) {
        if let Ok(mut t) = self.0.table.write() {
            if let Some(r) = t.routes.get_mut(&vaddr) {
                r.direct = None;
            }
            if let Some(p) = t.punches.get_mut(&vaddr) {
                p.last_pong = None;
            }
        }
    }

    /// Sends a ping for the route at `vaddr` to `to` (if it is armed and neither the route's nor
    /// the socket's ping budget is spent).
    pub fn ping(&self, vaddr: SocketAddr, to: SocketAddr) {
        let to = canonical(to);
        let now = Instant::now();
        let sealed = {
            let Ok(mut t) = self.0.table.write() else {
                return;
            };
            let Some(channel) = t.routes.get(&vaddr).map(|r| r.key.channel) else {
                return;
            };
            let Some(p) = t.punches.get_mut(&vaddr) else {
                return;
            };
            let socket_ok = self.0.pings.lock().is_ok_and(|mut b| b.wait(now).is_zero());
            if !socket_ok || !p.pings.try_take(now) {
                self.0.stats.probes_capped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if let Ok(mut b) = self.0.pings.lock() {
                b.try_take(now);
            }
            let tx = rand::random::<u64>();
            if p.pending.len() >= MAX_PENDING {
                p.pending.pop_front();
            }
            p.pending.push_back((tx, to));
            p.key.seal(&Probe {
                kind: Kind::Ping,
                channel,
                tx,
            })
        };
        self.send_raw(to, &sealed);
        self.0.stats.probes_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// A probe from `from`: a ping is answered (and `from` accepted as the peer's), a pong for a
    /// ping in flight makes the route direct. Anything that does not verify is counted and
    /// ignored.
    fn on_probe(&self, from: SocketAddr, packet: &[u8]) {
        if let Some(pong) = self.check_probe(from, packet) {
            self.send_raw(from, &pong);
            self.0.stats.probes_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Verifies a probe and applies it; returns the pong to send for a valid, new ping.
    ///
    /// - A ping must open under the peer's key and carry a transaction not answered before (a
    ///   replay gets nothing), within the route's pong budget; its source becomes one of the
    ///   route's aliases (at most [`MAX_ALIASES`]).
    /// - A pong must answer a ping in flight *from the address that ping went to*, and is used
    ///   up: a captured pong replayed (from anywhere) moves nothing.
    fn check_probe(&self, from: SocketAddr, packet: &[u8]) -> Option<[u8; punch::PROBE_LEN]> {
        let reject = || {
            self.0.stats.probes_rejected.fetch_add(1, Ordering::Relaxed);
            None
        };
        let Some(probe) = punch::peek(packet) else {
            return reject();
        };
        let from = canonical(from);
        let now = Instant::now();
        let Ok(mut guard) = self.0.table.write() else {
            return None;
        };
        let t = &mut *guard;
        let Some(vaddr) = t.by_channel.get(&probe.channel).copied() else {
            return reject();
        };
        let Some(p) = t.punches.get_mut(&vaddr) else {
            return reject();
        };
        if p.key.open(packet).is_none() {
            return reject();
        }
        match probe.kind {
            Kind::Ping => {
                if p.answered.contains(&probe.tx) {
                    return reject();
                }
                if !p.pongs.try_take(now) {
                    self.0.stats.probes_capped.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                if p.answered.len() >= MAX_ANSWERED {
                    p.answered.pop_front();
                }
                p.answered.push_back(probe.tx);
                let pong = p.key.seal(&Probe {
                    kind: Kind::Pong,
                    ..probe
                });
                let direct = t.routes.get(&vaddr).and_then(|r| r.direct).map(canonical);
                add_alias(t, vaddr, from, direct);
                self.0.aliases.store(t.aliases.len(), Ordering::Relaxed);
                Some(pong)
            }
            Kind::Pong => {
                let Some(i) = p
                    .pending
                    .iter()
                    .position(|(tx, to)| *tx == probe.tx && *to == from)
                else {
                    return reject();
                };
                p.pending.remove(i);
                p.last_pong = Some(now);
                let direct = t.routes.get(&vaddr).and_then(|r| r.direct).map(canonical);
                add_alias(t, vaddr, from, direct);
                self.0.aliases.store(t.aliases.len(), Ordering::Relaxed);
                if let Some(r) = t.routes.get_mut(&vaddr) {
                    r.direct = Some(self.fit(from));
                }
                None
            }
        }
    }

    /// This socket's address as `server` (a relay, or any STUN server) sees it: a STUN binding
    /// request sent from the socket itself, tried three times; `None` without an answer.
    pub async fn reflexive(&self, server: SocketAddr) -> Option<SocketAddr> {
        let tx: stun::TxId = rand::random();
        let (send, mut recv) = oneshot::channel();
        {
            let mut pending = self.0.stun.lock().ok()?;
            if pending.len() >= 256 {
                pending.retain(|_, s| !s.is_closed());
            }
            pending.insert(tx, send);
        }
        let request = stun::request(&tx);
        let mut seen = None;
        for _ in 0..3 {
            self.send_raw(server, &request);
            if let Ok(Ok(a)) = tokio::time::timeout(Duration::from_millis(300), &mut recv).await {
                seen = Some(a);
                break;
            }
        }
        if let Ok(mut pending) = self.0.stun.lock() {
            pending.remove(&tx);
        }
        seen
    }

    /// This socket's local address toward `peer` (the interface address the OS would use when
    /// the socket is bound to a wildcard).
    pub fn local_toward(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let local = self.0.udp.local_addr().ok()?;
        if !local.ip().is_unspecified() {
            return Some(local);
        }
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let any: SocketAddr = if peer.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let probe = std::net::UdpSocket::bind(any).ok()?;
        probe.connect(peer).ok()?;
        Some(SocketAddr::new(probe.local_addr().ok()?.ip(), local.port()))
    }

    fn on_stun(&self, packet: &[u8]) {
        if let Some((tx, seen)) = stun::parse_response(packet)
            && let Ok(mut pending) = self.0.stun.lock()
            && let Some(waiter) = pending.remove(&tx)
        {
            let _ = waiter.send(SocketAddr::new(seen.ip().to_canonical(), seen.port()));
        }
    }

    /// `addr` in the socket's family (IPv4 as IPv4-mapped on an IPv6 socket).
    fn fit(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(v4) if self.0.v6 => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            other => other,
        }
    }

    /// One datagram straight out of the UDP socket (probes, STUN); lost if the socket is busy.
    fn send_raw(&self, to: SocketAddr, contents: &[u8]) {
        let _ = self.0.udp.try_send(&Transmit {
            destination: self.fit(to),
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        });
    }

    /// The virtual address datagrams from `from` belong to, if it is a punched peer's.
    fn alias(&self, from: SocketAddr) -> Option<SocketAddr> {
        if self.0.aliases.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.0
            .table
            .read()
            .ok()?
            .aliases
            .get(&canonical(from))
            .copied()
    }

    /// The virtual address of `key`, if bound.
    pub fn addr_of(&self, key: RouteKey) -> Option<SocketAddr> {
        self.0.table.read().ok()?.addrs.get(&key).copied()
    }

    /// Hands quinn a datagram that arrived for `addr` (a bound virtual address). Dropped and
    /// counted when quinn is behind by `INBOX` datagrams.
    pub fn deliver(&self, addr: SocketAddr, datagram: Bytes) {
        if self.0.inbox.try_send((addr, datagram)).is_ok() {
            self.0
                .stats
                .relayed_received
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.0.stats.relayed_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Routes now.
    pub fn route_count(&self) -> usize {
        self.0.table.read().map_or(0, |t| t.routes.len())
    }

    /// The counters.
    pub fn stats(&self) -> &PathStats {
        &self.0.stats
    }

    /// Sends on the route of `transmit.destination`: whole to its punched address when direct
    /// (`Some` with the UDP socket's result), else per segment on its leg. `None`: no route.
    ///
    /// A direct datagram larger than the leg could carry is dropped like a lost one: without
    /// that, path MTU discovery on a punched path grows the connection's packets past what the
    /// relay carries, and when the direct path dies every packet of the fallback is too large
    /// for the leg (the connection stalls until it times out; seen on a 1500-byte LAN, where a
    /// leg carries 1,369-byte packets and the punched path 1,452).
    fn send_routed(&self, transmit: &Transmit<'_>) -> Option<io::Result<()>> {
        let direct = {
            let t = self.0.table.read().ok()?;
            let route = t.routes.get(&transmit.destination)?;
            match route.direct {
                Some(d) => {
                    let size = transmit.segment_size.unwrap_or(transmit.contents.len());
                    if let Some(room) = route.leg.max_datagram_size()
                        && size + TAG_LEN > room
                    {
                        self.0
                            .stats
                            .direct_oversized
                            .fetch_add(1, Ordering::Relaxed);
                        return Some(Ok(()));
                    }
                    d
                }
                None => {
                    self.send_relayed(route, transmit);
                    return Some(Ok(()));
                }
            }
        };
        let r = self.0.udp.try_send(&Transmit {
            destination: direct,
            ..*transmit
        });
        if r.is_ok() {
            self.0.stats.direct_sent.fetch_add(1, Ordering::Relaxed);
        }
        Some(r)
    }

    fn send_relayed(&self, route: &Route, transmit: &Transmit<'_>) {
        let size = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for segment in transmit.contents.chunks(size) {
            let mut d = BytesMut::with_capacity(TAG_LEN + segment.len());
            d.put_slice(&route.tag);
            d.put_slice(segment);
            // Too large for the leg, leg lost: dropped like UDP loss (the inner connection's
            // loss recovery and PLPMTUD deal with it). quinn's own queue drops its oldest entry
            // when full; leave room so a burst is dropped here, counted, instead.
            let fits = route.leg.datagram_send_buffer_space() >= d.len();
            if fits && route.leg.send_datagram(d.freeze()).is_ok() {
                self.0.stats.relayed_sent.fetch_add(1, Ordering::Relaxed);
            } else {
                self.0.stats.relayed_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Makes `from` (canonical) one of `vaddr`'s aliases, the newest; the oldest beyond
/// [`MAX_ALIASES`] is forgotten, unless it is `keep` (the punched address).
fn add_alias(t: &mut Table, vaddr: SocketAddr, from: SocketAddr, keep: Option<SocketAddr>) {
    if let Some(old) = t.aliases.insert(from, vaddr)
        && old != vaddr
        && let Some(p) = t.punches.get_mut(&old)
    {
        p.aliases.retain(|a| *a != from);
    }
    let Some(p) = t.punches.get_mut(&vaddr) else {
        return;
    };
    p.aliases.retain(|a| *a != from);
    p.aliases.push_back(from);
    while p.aliases.len() > MAX_ALIASES {
        let Some(i) = p.aliases.iter().position(|a| Some(*a) != keep) else {
            break;
        };
        let Some(oldest) = p.aliases.remove(i) else {
            break;
        };
        if t.aliases.get(&oldest) == Some(&vaddr) {
            t.aliases.remove(&oldest);
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A [`quinn::AsyncUdpSocket`] over a UDP socket and relayed routes.
pub struct PathSocket {
    udp: Arc<dyn AsyncUdpSocket>,
    paths: Paths,
    inbox: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
}

impl fmt::Debug for PathSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathSocket")
            .field("udp", &self.udp)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl PathSocket {
    /// Wraps `udp` (a bound, non-blocking socket).
    ///
    /// # Errors
    /// The OS error of registering the socket with the runtime.
    pub fn new(udp: std::net::UdpSocket) -> io::Result<(Arc<Self>, Paths)> {
        let v6 = udp.local_addr()?.is_ipv6();
        let udp = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, udp)?;
        let (tx, rx) = mpsc::channel(INBOX);
        let paths = Paths(Arc::new(Shared {
            v6,
            udp: udp.clone(),
            table: RwLock::new(Table::default()),
            forbidden: RwLock::new(Vec::new()),
            pings: Mutex::new(TokenBucket::new(
                SOCKET_PINGS_BURST,
                SOCKET_PINGS_PER_SEC,
                Instant::now(),
            )),
            next: AtomicU32::new(1),
            aliases: AtomicUsize::new(0),
            inbox: tx,
            stun: Mutex::new(HashMap::new()),
            stats: PathStats::default(),
        }));
        Ok((
            Arc::new(Self {
                udp,
                paths: paths.clone(),
                inbox: Mutex::new(rx),
            }),
            paths,
        ))
    }
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.udp.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if is_virtual(transmit.destination) {
            return self.paths.send_routed(transmit).unwrap_or_else(|| {
                // A route that is gone (its channel closed): as lost.
                self.paths
                    .0
                    .stats
                    .relayed_dropped
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            });
        }
        self.udp.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut n = 0;
        if let Ok(mut inbox) = self.inbox.lock() {
            while n < bufs.len().min(meta.len()) {
                match inbox.poll_recv(cx) {
                    Poll::Ready(Some((addr, data))) => {
                        let buf = &mut bufs[n];
                        if data.len() > buf.len() {
                            // Larger than quinn accepts: as a datagram too large for the path.
                            self.paths
                                .0
                                .stats
                                .relayed_dropped
                                .fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        buf[..data.len()].copy_from_slice(&data);
                        meta[n] = RecvMeta {
                            addr,
                            len: data.len(),
                            stride: data.len(),
                            ecn: None,
                            dst_ip: None,
                        };
                        n += 1;
                    }
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
        }
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        let n = match self.udp.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        for (m, buf) in meta.iter_mut().zip(bufs.iter()).take(n) {
            let single = m.len <= m.stride;
            let data = &buf[..m.len.min(buf.len())];
            if single && punch::is_probe(data) {
                self.paths.on_probe(m.addr, data);
                m.len = 0; // quinn skips an empty entry
            } else if single && stun::is_stun(data) {
                self.paths.on_stun(data);
                m.len = 0;
            } else if let Some(vaddr) = self.paths.alias(m.addr) {
                m.addr = vaddr;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.udp.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.udp.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.udp.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use crate::transport::{self, Identity, TransportSettings};

    /// This end's probe key, and the peer's (what it seals with; this end opens with it).
    const OURS: [u8; 32] = [1; 32];
    const THEIRS: [u8; 32] = [2; 32];

    /// A PathSocket endpoint with one relayed route (its leg a real QUIC connection to a
    /// throwaway server) armed with the keys above.
    async fn armed_route() -> (quinn::Endpoint, quinn::Endpoint, Paths, SocketAddr) {
        let settings = TransportSettings::default();
        let server_id = Identity::new(SecretKey::generate()).unwrap();
        let mut server_cfg = transport::server_config(&server_id, b"t", &settings, 1, 8).unwrap();
        // As a relay's: DATAGRAM frames on, so the leg says what one datagram carries.
        server_cfg.transport_config(Arc::new(transport::leg_transport_config(&settings, 8)));
        let server = transport::server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            server_id.secret_key(),
            server_cfg,
            &settings,
        )
        .unwrap();
        let server_addr = server.local_addr().unwrap();
        let accept = {
            let server = server.clone();
            tokio::spawn(async move { server.accept().await.unwrap().await.unwrap() })
        };
        let (client, paths) = transport::client_endpoint_with_paths(&settings).unwrap();
        let me = Identity::new(SecretKey::generate()).unwrap();
        let (cfg, _) =
            transport::client_config(&me, b"t", Some(server_id.fingerprint()), &settings).unwrap();
        let leg = client
            .connect_with(cfg, server_addr, transport::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let _server_side = accept.await.unwrap();
        let route = RouteKey {
            relay: server_id.fingerprint(),
            channel: 42,
        };
        let vaddr = paths.bind(route, &leg).unwrap();
        assert!(paths.arm(vaddr, PunchKey::from_bytes(OURS, THEIRS)));
        (server, client, paths, vaddr)
    }

    /// A probe as the peer (key `send`) seals it.
    fn probe(send: [u8; 32], kind: Kind, channel: u64, tx: u64) -> [u8; punch::PROBE_LEN] {
        PunchKey::from_bytes(send, [0; 32]).seal(&Probe { kind, channel, tx })
    }

    /// Opens what this end sent (as the peer would).
    fn open_ours(packet: &[u8]) -> Probe {
        PunchKey::from_bytes([0; 32], OURS).open(packet).unwrap()
    }

    async fn no_answer(sock: &tokio::net::UdpSocket) -> bool {
        let mut buf = [0u8; 256];
        tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
            .await
            .is_err()
    }

    /// The punched address once the route is direct, waiting up to 2 s (`None`: still relayed).
    async fn wait_direct(paths: &Paths, vaddr: SocketAddr) -> Option<SocketAddr> {
        wait_direct_for(paths, vaddr, Duration::from_secs(2)).await
    }

    async fn wait_direct_for(paths: &Paths, vaddr: SocketAddr, d: Duration) -> Option<SocketAddr> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(PathState::Direct(a)) = paths.state(vaddr) {
                return Some(canonical(a));
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Forged probes (another key, another channel, a pong nobody asked for, our own probe
    /// reflected) never move the path and get no answer; the real peer's pong to a real ping
    /// does.
    #[tokio::test]
    async fn only_the_peers_probes_move_the_path() {
        let (_server, client, paths, vaddr) = armed_route().await;
        let target: SocketAddr = (Ipv4Addr::LOCALHOST, client.local_addr().unwrap().port()).into();
        let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer_addr = peer.local_addr().unwrap();
        let mut buf = [0u8; 256];

        for forged in [
            probe([3; 32], Kind::Ping, 42, 1),
            probe([3; 32], Kind::Pong, 42, 1),
            probe(THEIRS, Kind::Ping, 43, 1),
            probe(THEIRS, Kind::Pong, 42, 7), // no such ping in flight
            probe(OURS, Kind::Ping, 42, 8),   // our own, reflected
        ] {
            peer.send_to(&forged, target).await.unwrap();
            assert!(no_answer(&peer).await, "a forged probe was answered");
            assert_eq!(paths.state(vaddr), Some(PathState::Relayed));
        }
        assert!(paths.stats().probes_rejected.load(Ordering::Relaxed) >= 5);

        // The peer's ping is answered with a pong under this end's key.
        peer.send_to(&probe(THEIRS, Kind::Ping, 42, 9), target)
            .await
            .unwrap();
        let (n, _) = peer.recv_from(&mut buf).await.unwrap();
        let pong = open_ours(&buf[..n]);
        assert_eq!((pong.kind, pong.tx), (Kind::Pong, 9));
        assert_eq!(paths.state(vaddr), Some(PathState::Relayed));

        // Our ping, answered by the peer: direct, to the address the pong came from.
        paths.ping(vaddr, peer_addr);
        let (n, _) = peer.recv_from(&mut buf).await.unwrap();
        let ping = open_ours(&buf[..n]);
        assert_eq!(ping.kind, Kind::Ping);
        peer.send_to(&probe(THEIRS, Kind::Pong, 42, ping.tx), target)
            .await
            .unwrap();
        assert_eq!(wait_direct(&paths, vaddr).await, Some(peer_addr));
        paths.fall_back(vaddr);
        assert_eq!(paths.state(vaddr), Some(PathState::Relayed));
    }

    /// Punches `vaddr` to a fresh peer socket (its ping answered); the socket and its address.
    async fn punched(
        paths: &Paths,
        vaddr: SocketAddr,
        target: SocketAddr,
    ) -> tokio::net::UdpSocket {
        let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer_addr = peer.local_addr().unwrap();
        let mut buf = [0u8; 256];
        paths.ping(vaddr, peer_addr);
        let (n, _) = peer.recv_from(&mut buf).await.unwrap();
        let ping = open_ours(&buf[..n]);
        peer.send_to(&probe(THEIRS, Kind::Pong, 42, ping.tx), target)
            .await
            .unwrap();
        assert_eq!(wait_direct(paths, vaddr).await, Some(peer_addr));
        peer
    }

    /// A punched path carried packets larger than the relay leg could, so path MTU discovery
    /// grew the connection past its fallback: when the direct path died, every packet was too
    /// large for the leg and the connection timed out (seen as a reset mid-transfer in
    /// `e2e::punch::a_direct_path_cut_mid_transfer_falls_back_to_the_relay`). A direct datagram
    /// the leg could not carry is dropped, one it could is sent.
    #[tokio::test]
    async fn a_punched_path_carries_only_what_the_relay_could() {
        let (_server, client, paths, vaddr) = armed_route().await;
        let target: SocketAddr = (Ipv4Addr::LOCALHOST, client.local_addr().unwrap().port()).into();
        let peer = punched(&paths, vaddr, target).await;
        let leg_room = {
            let t = paths.0.table.read().unwrap();
            t.routes[&vaddr].leg.max_datagram_size().unwrap()
        };
        let send = |len: usize| {
            let contents = vec![0x40u8; len];
            let r = paths.send_routed(&Transmit {
                destination: vaddr,
                ecn: None,
                contents: &contents,
                segment_size: None,
                src_ip: None,
            });
            assert!(matches!(r, Some(Ok(()))), "{r:?}");
        };
        let mut buf = vec![0u8; 9000];
        send(leg_room - TAG_LEN + 1);
        let recv = tokio::time::timeout(Duration::from_millis(300), peer.recv_from(&mut buf));
        assert!(
            recv.await.is_err(),
            "a packet the leg could not carry went direct"
        );
        assert_eq!(paths.stats().direct_oversized.load(Ordering::Relaxed), 1);
        send(leg_room - TAG_LEN);
        let (n, _) = peer.recv_from(&mut buf).await.unwrap();
        assert_eq!(n, leg_room - TAG_LEN);
        assert_eq!(paths.stats().direct_sent.load(Ordering::Relaxed), 1);
    }

    /// Issue 18, defect 2: a pong was accepted from any source if its transaction was among the
    /// last 64 pings, and never used up, so one captured pong replayed from elsewhere moved the
    /// connection's traffic to the replayer (or, spoofed, onto a victim).
    #[tokio::test]
    async fn a_replayed_pong_moves_nothing() {
        let (_server, client, paths, vaddr) = armed_route().await;
        let target: SocketAddr = (Ipv4Addr::LOCALHOST, client.local_addr().unwrap().port()).into();
        let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 256];
        paths.ping(vaddr, peer.local_addr().unwrap());
        let (n, _) = peer.recv_from(&mut buf).await.unwrap();
        let pong = probe(THEIRS, Kind::Pong, 42, open_ours(&buf[..n]).tx);

        // The pong, captured on the way and sent first from elsewhere: the ping did not go
        // there, so it moves nothing.
        attacker.send_to(&pong, target).await.unwrap();
        let brief = Duration::from_millis(300);
        assert!(
            wait_direct_for(&paths, vaddr, brief).await.is_none(),
            "moved by a pong from elsewhere"
        );
        // The real pong from the peer moves the path to the peer...
        peer.send_to(&pong, target).await.unwrap();
        assert_eq!(
            wait_direct(&paths, vaddr).await,
            Some(peer.local_addr().unwrap())
        );
        // ...and is used up: replayed after a fallback, from the peer's address or anywhere else,
        // it moves nothing again.
        paths.fall_back(vaddr);
        let rejected = paths.stats().probes_rejected.load(Ordering::Relaxed);
        for _ in 0..10 {
            attacker.send_to(&pong, target).await.unwrap();
            peer.send_to(&pong, target).await.unwrap();
        }
        assert!(
            wait_direct_for(&paths, vaddr, brief).await.is_none(),
            "moved by a replay"
        );
        assert!(paths.stats().probes_rejected.load(Ordering::Relaxed) >= rejected + 20);
    }

    /// Issue 18, defect 6: a replayed ping from each new source got a pong and added an alias
    /// that was never evicted (client RSS 9.4 → 26.3 MB after 200,000 sources).
    #[tokio::test]
    async fn a_replayed_ping_is_answered_once_and_aliases_stay_bounded() {
        let (_server, client, paths, vaddr) = armed_route().await;
        let target: SocketAddr = (Ipv4Addr::LOCALHOST, client.local_addr().unwrap().port()).into();
        let ping = probe(THEIRS, Kind::Ping, 42, 77);
        let mut answered = 0;
        let mut sockets = Vec::new();
        for _ in 0..50 {
            let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            s.send_to(&ping, target).await.unwrap();
            sockets.push(s);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut buf = [0u8; 256];
        for s in &sockets {
            if s.try_recv_from(&mut buf).is_ok() {
                answered += 1;
            }
        }
        assert_eq!(answered, 1, "a replayed ping was answered again");
        // New pings (as the peer makes them) from many sources: answered within the budget,
        // and the route keeps at most MAX_ALIASES of their addresses.
        for (tx, s) in sockets.iter().enumerate() {
            let tx = 1000 + u64::try_from(tx).unwrap();
            s.send_to(&probe(THEIRS, Kind::Ping, 42, tx), target)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = paths.0.table.read().unwrap();
        assert!(
            t.aliases.len() <= MAX_ALIASES,
            "{} aliases",
            t.aliases.len()
        );
        assert!(t.punches[&vaddr].aliases.len() <= MAX_ALIASES);
    }

    /// Issue 18, defect 8: probes had no cap per peer or in total.
    #[tokio::test]
    async fn pings_are_capped_per_route() {
        let (_server, _client, paths, vaddr) = armed_route().await;
        let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..1000 {
            paths.ping(vaddr, sink.local_addr().unwrap());
        }
        let sent = paths.stats().probes_sent.load(Ordering::Relaxed);
        assert!(sent <= 201, "{sent} pings sent at once");
        assert!(paths.stats().probes_capped.load(Ordering::Relaxed) >= 799);
    }

    /// A relay's socket answers a STUN binding request with the address it came from, and a
    /// PathSocket reads the answer as its reflexive address.
    #[tokio::test]
    async fn the_reflexive_address_is_learned_from_a_relay() {
        let settings = TransportSettings::default();
        let id = Identity::new(SecretKey::generate()).unwrap();
        let cfg = transport::server_config(&id, b"t", &settings, 1, 8).unwrap();
        let relay = transport::relay_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            id.secret_key(),
            cfg,
            &settings,
        )
        .unwrap();
        let (client, paths) = transport::client_endpoint_with_paths(&settings).unwrap();
        let seen = paths.reflexive(relay.local_addr().unwrap()).await;
        let port = client.local_addr().unwrap().port();
        assert_eq!(seen, Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port))));
        let local = paths.local_toward(relay.local_addr().unwrap()).unwrap();
        assert_eq!(local, SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }

    #[test]
    fn virtual_addresses_are_recognised_and_in_the_socket_family() {
        for n in [1, 2, 0xffff, 0x1_0000, 0x0fff_ffff] {
            let v4 = virtual_addr(false, n);
            let v6 = virtual_addr(true, n);
            assert!(v4.is_ipv4() && is_virtual(v4), "{v4}");
            assert!(v6.is_ipv6() && is_virtual(v6), "{v6}");
        }
        assert_ne!(virtual_addr(false, 1), virtual_addr(false, 2));
        assert_ne!(virtual_addr(true, 1), virtual_addr(true, 0x1_0001));
        let mapped: SocketAddr = "[::ffff:240.0.0.7]:1".parse().unwrap();
        assert!(is_virtual(mapped));
        for real in [
            "127.0.0.1:5592",
            "10.0.0.1:1",
            "203.0.113.5:9",
            "[::1]:5592",
            "[2001:db8::1]:1",
            "[100:0:0:1::1]:1",
            "239.255.255.255:1",
        ] {
            assert!(!is_virtual(real.parse().unwrap()), "{real}");
        }
    }
}
