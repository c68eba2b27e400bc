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

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use crate::identity::Fingerprint;
use crate::relay::TAG_LEN;

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
}

#[derive(Default)]
struct Table {
    routes: HashMap<SocketAddr, Route>,
    addrs: HashMap<RouteKey, SocketAddr>,
}

struct Shared {
    v6: bool,
    table: RwLock<Table>,
    next: AtomicU32,
    inbox: mpsc::Sender<(SocketAddr, Bytes)>,
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
        t.routes.insert(
            addr,
            Route {
                leg: leg.clone(),
                tag: crate::relay::tag(key.channel),
            },
        );
        Some(addr)
    }

    /// Forgets `key` (its address is not reused).
    pub fn unbind(&self, key: RouteKey) {
        if let Ok(mut t) = self.0.table.write()
            && let Some(addr) = t.addrs.remove(&key)
        {
            t.routes.remove(&addr);
        }
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

    fn send_relayed(&self, transmit: &Transmit<'_>) -> bool {
        let Ok(t) = self.0.table.read() else {
            return false;
        };
        let Some(route) = t.routes.get(&transmit.destination) else {
            return false;
        };
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
        true
    }
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
            table: RwLock::new(Table::default()),
            next: AtomicU32::new(1),
            inbox: tx,
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
            if !self.paths.send_relayed(transmit) {
                // A route that is gone (its channel closed): as lost.
                self.paths
                    .0
                    .stats
                    .relayed_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
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
        self.udp.poll_recv(cx, bufs, meta)
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
