//! Relay legs over TCP, for networks that block UDP: a [`quinn::AsyncUdpSocket`] whose
//! "datagrams" travel as length-prefixed frames on TLS 1.3 streams.
//!
//! Kind: IO.
//!
//! The leg itself does not change: it is the same QUIC connection (ALPN `tunnel-relay/1`, pinned
//! keys, the same control stream and datagrams), only its packets ride a TLS-over-TCP stream
//! (ALPN [`TCP_ALPN`], the relay's pinned key) instead of UDP. Each packet is a frame: 2 bytes of
//! length (big endian) and the packet. The inner end-to-end connection is unchanged too.
//!
//! A [`StreamSocket`] holds any number of streams, each behind the address of its TCP peer (a
//! relay has one per leg; a client or device has one, to its relay). Sending never blocks: a
//! packet for a stream whose queue holds [`MAX_QUEUED`] bytes is dropped like UDP loss, so the
//! leg's congestion controller, not an unbounded buffer, absorbs a slow TCP path.
//!
//! On the relay, TLS costs nothing to a stranger, so the [`LegAcceptor`] bounds what one source
//! can hold (issue 18: 300 idle connections took every TLS slot, 8,192 TLS streams that never
//! carried QUIC were never reaped): TLS handshakes in flight per source and in all, each within
//! a deadline; a stream must carry a QUIC connection ([`StreamSocket::claim`]) within the same
//! deadline or it is dropped; and the relay drops a stream when its leg ends.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// ALPN of the TLS stream under a TCP leg.
pub const TCP_ALPN: &[u8] = b"tunnel-relay-tcp/1";

/// Bytes one stream may have waiting to be written; more packets are dropped (as lost).
pub const MAX_QUEUED: usize = 1024 * 1024;

/// Packets received from all streams and not yet read by quinn; a full queue stops reading the
/// streams (TCP backpressure).
const INBOX: usize = 1024;

/// Packets quinn may hand over in one batch (they are split into frames here).
const MAX_SEGMENTS: usize = 16;

struct Peer {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    /// Whether a QUIC connection runs on the stream (the relay says so once its handshake is
    /// done); unclaimed streams are counted per source and reaped.
    claimed: bool,
}

/// The socket: streams by peer address, and what they received.
pub struct StreamSocket {
    local: SocketAddr,
    peers: RwLock<HashMap<SocketAddr, Peer>>,
    inbox_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    inbox: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    dropped: AtomicU64,
}

impl fmt::Debug for StreamSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSocket")
            .field("local", &self.local)
            .field("streams", &self.stream_count())
            .finish_non_exhaustive()
    }
}

impl StreamSocket {
    /// An empty socket that reports `local` as its address.
    pub fn new(local: SocketAddr) -> Arc<Self> {
        let (inbox_tx, inbox) = mpsc::channel(INBOX);
        Arc::new(Self {
            local,
            peers: RwLock::new(HashMap::new()),
            inbox_tx,
            inbox: Mutex::new(inbox),
            dropped: AtomicU64::new(0),
        })
    }

    /// Streams held now.
    pub fn stream_count(&self) -> usize {
        self.peers.read().map_or(0, |p| p.len())
    }

    /// Packets dropped because a stream's queue was full or its peer was gone.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Carries the packets to and from `peer` on `stream` until the stream ends, a frame is
    /// malformed, or the socket is dropped. The returned receiver resolves when the stream is
    /// gone. A second stream for the same address replaces the first.
    pub fn add<S>(self: &Arc<Self>, peer: SocketAddr, stream: S) -> oneshot::Receiver<()>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        if let Ok(mut p) = self.peers.write() {
            p.insert(
                peer,
                Peer {
                    tx,
                    queued: queued.clone(),
                    claimed: false,
                },
            );
        }
        let (ended_tx, ended) = oneshot::channel();
        let inbox = self.inbox_tx.clone();
        let socket = Arc::downgrade(self);
        tokio::spawn(async move {
            let (r, w) = tokio::io::split(stream);
            tokio::select! {
                r = read_frames(r, peer, inbox) => tracing::debug!(%peer, ?r, "TCP leg stream: read side ended"),
                r = write_frames(w, rx, queued) => tracing::debug!(%peer, ?r, "TCP leg stream: write side ended"),
            }
            if let Some(s) = socket.upgrade()
                && let Ok(mut p) = s.peers.write()
            {
                // Only this stream's entry: a newer stream for the address stays.
                if p.get(&peer).is_some_and(|e| e.tx.is_closed()) {
                    p.remove(&peer);
                }
            }
            let _ = ended_tx.send(());
        });
        ended
    }

    /// Drops the stream of `peer` (its task ends and the TCP connection closes).
    pub fn remove(&self, peer: SocketAddr) {
        if let Ok(mut p) = self.peers.write() {
            p.remove(&peer);
        }
    }

    /// Records that the stream of `peer` carries a QUIC connection (its handshake is done);
    /// `false` when there is no such stream.
    pub fn claim(&self, peer: SocketAddr) -> bool {
        self.peers
            .write()
            .ok()
            .and_then(|mut p| p.get_mut(&peer).map(|e| e.claimed = true))
            .is_some()
    }

    /// Whether the stream of `peer` carries a QUIC connection.
    pub fn is_claimed(&self, peer: SocketAddr) -> bool {
        self.peers
            .read()
            .is_ok_and(|p| p.get(&peer).is_some_and(|e| e.claimed))
    }

    /// Streams from `source` (an IPv4 address or IPv6 /64) that carry no QUIC connection yet.
    pub fn unclaimed_from(&self, source: std::net::IpAddr) -> usize {
        let key = crate::limits::source_key(source);
        self.peers.read().map_or(0, |p| {
            p.iter()
                .filter(|(a, e)| !e.claimed && crate::limits::source_key(a.ip()) == key)
                .count()
        })
    }

    fn enqueue(&self, transmit: &Transmit<'_>) {
        let Ok(peers) = self.peers.read() else {
            return;
        };
        let Some(peer) = peers.get(&transmit.destination) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let contents = transmit.contents;
        let seg = transmit
            .segment_size
            .unwrap_or(contents.len())
            .clamp(1, usize::from(u16::MAX));
        let count = contents.len().div_ceil(seg);
        let total = contents.len() + 2 * count;
        if peer.queued.load(Ordering::Relaxed) + total > MAX_QUEUED {
            self.dropped
                .fetch_add(u64::try_from(count).unwrap_or(u64::MAX), Ordering::Relaxed);
            return;
        }
        let mut frames = BytesMut::with_capacity(total);
        for packet in contents.chunks(seg) {
            // `seg` ≤ u16::MAX, so the length fits.
            frames.put_u16(u16::try_from(packet.len()).unwrap_or(u16::MAX));
            frames.put_slice(packet);
        }
        peer.queued.fetch_add(total, Ordering::Relaxed);
        if peer.tx.send(frames.freeze()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn read_frames<R: AsyncRead + Unpin>(
    mut r: R,
    peer: SocketAddr,
    inbox: mpsc::Sender<(SocketAddr, Bytes)>,
) -> io::Result<()> {
    loop {
        let len = usize::from(r.read_u16().await?);
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "empty frame"));
        }
        let mut buf = BytesMut::zeroed(len);
        r.read_exact(&mut buf).await?;
        if inbox.send((peer, buf.freeze())).await.is_err() {
            return Ok(());
        }
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
) -> io::Result<()> {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Write what is queued, then flush once (TLS records fill up, syscalls stay few).
        while let Some(frames) = next {
            w.write_all(&frames).await?;
            queued.fetch_sub(frames.len(), Ordering::Relaxed);
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    let _ = w.shutdown().await;
    Ok(())
}

/// TLS handshakes of TCP legs in flight at most; connections beyond are closed at once.
pub const MAX_TLS_HANDSHAKES: usize = 256;

/// TLS handshakes in flight from one source (an IPv4 address or IPv6 /64) at most.
pub const MAX_TLS_HANDSHAKES_PER_SOURCE: usize = 8;

/// Streams from one source that carry no QUIC connection yet, at most.
pub const MAX_UNCLAIMED_PER_SOURCE: usize = 16;

/// The server side of TCP legs: TLS 1.3 with the relay's key, then the stream joins a
/// [`StreamSocket`] behind its TCP peer's address.
pub struct LegAcceptor {
    tls: tokio_rustls::TlsAcceptor,
    handshakes: Arc<tokio::sync::Semaphore>,
    per_source: crate::limits::KeySlots<std::net::IpAddr>,
}

impl fmt::Debug for LegAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LegAcceptor")
            .field("handshakes_free", &self.handshakes.available_permits())
            .finish_non_exhaustive()
    }
}

/// Why [`LegAcceptor::accept`] closed a TCP connection at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpRefusal {
    /// [`MAX_TLS_HANDSHAKES`] are in flight.
    Full,
    /// [`MAX_TLS_HANDSHAKES_PER_SOURCE`] from this source are in flight, or it holds
    /// [`MAX_UNCLAIMED_PER_SOURCE`] streams that carry nothing yet.
    Source,
}

impl LegAcceptor {
    /// An acceptor presenting `identity`'s key.
    ///
    /// # Errors
    /// [`super::TransportError::Tls`].
    pub fn new(identity: &super::Identity) -> Result<Self, super::TransportError> {
        let tls = super::server_tls_config(identity, TCP_ALPN)?;
        Ok(Self {
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_TLS_HANDSHAKES)),
            per_source: crate::limits::KeySlots::default(),
        })
    }

    /// Runs the TLS handshake of `tcp` (from `peer`) on its own task, within `timeout`, and adds
    /// the stream to `socket`; a stream that carries no QUIC connection `timeout` later (nobody
    /// [claimed](StreamSocket::claim) it) is dropped. Refused (and `tcp` closed) at once when
    /// the source or the acceptor is at a cap.
    ///
    /// # Errors
    /// [`TcpRefusal`]: which cap.
    pub fn accept(
        &self,
        socket: &Arc<StreamSocket>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        timeout: std::time::Duration,
    ) -> Result<(), TcpRefusal> {
        if socket.unclaimed_from(peer.ip()) >= MAX_UNCLAIMED_PER_SOURCE {
            return Err(TcpRefusal::Source);
        }
        let source = self
            .per_source
            .take(
                crate::limits::source_key(peer.ip()),
                MAX_TLS_HANDSHAKES_PER_SOURCE,
            )
            .ok_or(TcpRefusal::Source)?;
        let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
            return Err(TcpRefusal::Full);
        };
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.clone();
        let socket = Arc::downgrade(socket);
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(timeout, tls.accept(tcp)).await;
            drop((permit, source));
            match handshake {
                Ok(Ok(stream)) => {
                    let Some(s) = socket.upgrade() else {
                        return;
                    };
                    drop(s.add(peer, stream));
                    drop(s);
                    // It must carry QUIC within the deadline, or it goes.
                    tokio::time::sleep(timeout).await;
                    if let Some(s) = socket.upgrade()
                        && !s.is_claimed(peer)
                    {
                        tracing::debug!(%peer, "TCP leg: no QUIC connection on the stream in time; closed");
                        s.remove(peer);
                    }
                }
                Ok(Err(e)) => tracing::debug!(%peer, "TCP leg: TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "TCP leg: TLS handshake timed out"),
            }
        });
        Ok(())
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for StreamSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.enqueue(transmit);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Ok(mut inbox) = self.inbox.lock() else {
            return Poll::Ready(Err(io::Error::other("stream socket poisoned")));
        };
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let next = if n == 0 {
                match inbox.poll_recv(cx) {
                    Poll::Ready(Some(d)) => d,
                    // The sender half lives in `self`: never closed while polled.
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
            } else {
                match inbox.try_recv() {
                    Ok(d) => d,
                    Err(_) => break,
                }
            };
            let (addr, data) = next;
            if data.len() > bufs[n].len() {
                // Larger than quinn's buffer: as lost.
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            bufs[n][..data.len()].copy_from_slice(&data);
            meta[n] = RecvMeta {
                addr,
                len: data.len(),
                stride: data.len(),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn max_transmit_segments(&self) -> usize {
        MAX_SEGMENTS
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transmit(to: SocketAddr, contents: &[u8], seg: Option<usize>) -> Transmit<'_> {
        Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: seg,
            src_ip: None,
        }
    }

    async fn recv(s: &Arc<StreamSocket>) -> (SocketAddr, Vec<u8>) {
        let mut buf = vec![0u8; 2048];
        let mut meta = [RecvMeta::default()];
        let n = std::future::poll_fn(|cx| {
            let mut bufs = [IoSliceMut::new(&mut buf)];
            s.poll_recv(cx, &mut bufs, &mut meta)
        })
        .await
        .unwrap();
        assert_eq!(n, 1);
        (meta[0].addr, buf[..meta[0].len].to_vec())
    }

    #[tokio::test]
    async fn batches_are_split_into_frames_and_arrive_as_packets() {
        let (a_io, b_io) = tokio::io::duplex(64 * 1024);
        let a_addr: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b_addr: SocketAddr = "192.0.2.2:2".parse().unwrap();
        let a = StreamSocket::new(a_addr);
        let b = StreamSocket::new(b_addr);
        let _ea = a.add(b_addr, a_io);
        let eb = b.add(a_addr, b_io);
        // A GSO batch of three packets, the last one short.
        let batch: Vec<u8> = (0..250u8).collect();
        a.try_send(&transmit(b_addr, &batch, Some(100))).unwrap();
        for want in [&batch[..100], &batch[100..200], &batch[200..]] {
            let (from, got) = recv(&b).await;
            assert_eq!(from, a_addr);
            assert_eq!(got, want);
        }
        // Unknown destinations are dropped, not errors.
        a.try_send(&transmit("192.0.2.9:9".parse().unwrap(), b"x", None))
            .unwrap();
        assert_eq!(a.dropped(), 1);
        // Dropping a side ends the other's stream.
        drop(a);
        eb.await.unwrap();
        assert_eq!(b.stream_count(), 0);
    }

    #[tokio::test]
    async fn a_malformed_frame_ends_the_stream() {
        let (mut raw, b_io) = tokio::io::duplex(1024);
        let b = StreamSocket::new("192.0.2.2:2".parse().unwrap());
        let ended = b.add("192.0.2.1:1".parse().unwrap(), b_io);
        raw.write_all(&[0, 0]).await.unwrap();
        ended.await.unwrap();
        assert_eq!(b.stream_count(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_growing() {
        // A peer that never reads: the queue fills, then packets are dropped.
        let (_keep, b_io) = tokio::io::duplex(1024);
        let to: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let s = StreamSocket::new("192.0.2.2:2".parse().unwrap());
        let _ended = s.add(to, b_io);
        let packet = vec![7u8; 1200];
        for _ in 0..2 * MAX_QUEUED / packet.len() {
            s.try_send(&transmit(to, &packet, None)).unwrap();
        }
        assert!(s.dropped() > 0);
        let queued = s.peers.read().unwrap()[&to].queued.load(Ordering::Relaxed);
        assert!(queued <= MAX_QUEUED, "{queued}");
    }
}
