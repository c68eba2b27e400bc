//! A user-space UDP impairment relay (this kernel has no netem): datagrams from the first sender
//! are forwarded to an upstream address and the answers back, with a seeded mix of delay, jitter,
//! loss, duplication and reordering; datagrams larger than a path's MTU are dropped as on a real
//! path. While it runs it can move to a new source port toward the upstream (as a NAT rebinding
//! does) and flip one byte of a chosen datagram (tampering on the wire).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the relay does to each datagram.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Added to each datagram, each way.
    pub delay: Duration,
    /// A further uniform random delay in `0..jitter` (reorders datagrams when large enough).
    pub jitter: Duration,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram is sent twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back by [`Impairment::reorder_by`], so later ones
    /// overtake it.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_by: Duration,
    /// Larger datagrams are dropped (1472: an Ethernet path, 1500 − 20 − 8).
    pub max_datagram: usize,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Impairment {
    /// Nothing but an Ethernet path's MTU.
    pub fn none() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_by: Duration::ZERO,
            max_datagram: 1472,
            seed: 1,
        }
    }

    /// `delay` each way on an Ethernet path.
    pub fn delay(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::none()
        }
    }
}

/// Which way a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// From the first sender (the client) to the upstream.
    Up,
    /// From the upstream back to the client.
    Down,
}

/// Counters and controls of a running relay.
#[derive(Debug, Default)]
pub struct Control {
    /// Datagrams forwarded (duplicates counted once).
    pub forwarded: AtomicU64,
    /// Datagrams dropped on purpose.
    pub dropped: AtomicU64,
    /// Datagrams sent twice.
    pub duplicated: AtomicU64,
    /// Datagrams held back to be reordered.
    pub reordered: AtomicU64,
    tamper: Mutex<Option<(Way, usize)>>,
    tampered: AtomicU64,
    marker: Mutex<Option<Vec<u8>>>,
    marker_hits: AtomicU64,
}

impl Control {
    /// Flips byte `offset` of the next datagram going `way` that is long enough.
    pub fn tamper_next(&self, way: Way, offset: usize) {
        if let Ok(mut t) = self.tamper.lock() {
            *t = Some((way, offset));
        }
    }

    /// From now on, counts every datagram (either way) that contains `marker` anywhere: what an
    /// observer of the wire would see of a plaintext.
    pub fn scan_for(&self, marker: &[u8]) {
        if let Ok(mut m) = self.marker.lock() {
            *m = Some(marker.to_vec());
        }
    }

    /// Datagrams that contained the marker of [`Self::scan_for`].
    pub fn marker_hits(&self) -> u64 {
        self.marker_hits.load(Ordering::Relaxed)
    }

    fn scan(&self, pkt: &[u8]) {
        if let Ok(m) = self.marker.lock()
            && let Some(m) = m.as_deref()
            && !m.is_empty()
            && pkt.windows(m.len()).any(|w| w == m)
        {
            self.marker_hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Datagrams tampered with so far.
    pub fn tampered(&self) -> u64 {
        self.tampered.load(Ordering::Relaxed)
    }

    fn maybe_tamper(&self, way: Way, pkt: &mut [u8]) {
        let Ok(mut t) = self.tamper.lock() else {
            return;
        };
        if let Some((w, offset)) = *t
            && w == way
            && offset < pkt.len()
        {
            pkt[offset] ^= 0x55;
            *t = None;
            self.tampered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A relay running on the current runtime; stops when dropped.
#[derive(Debug)]
pub struct Relay {
    /// Where clients send.
    pub addr: SocketAddr,
    /// Its counters and controls.
    pub control: Arc<Control>,
    upstream: SocketAddr,
    reader: Mutex<Option<JoinHandle<()>>>,
    back: Arc<Mutex<Arc<UdpSocket>>>,
    tasks: Vec<JoinHandle<()>>,
    down_tx: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    shared: Arc<Shared>,
}

struct Shared {
    impairment: Impairment,
    rng: Mutex<StdRng>,
    control: Arc<Control>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// Schedules `pkt` (going `way`) on `tx`: dropped, delayed, held back or duplicated.
    fn schedule(&self, way: Way, mut pkt: Vec<u8>, tx: &mpsc::UnboundedSender<(Instant, Vec<u8>)>) {
        let i = &self.impairment;
        self.control.scan(&pkt);
        if pkt.len() > i.max_datagram {
            return;
        }
        let (lost, dup, held, jitter) = {
            let Ok(mut rng) = self.rng.lock() else {
                return;
            };
            let jitter = if i.jitter.is_zero() {
                Duration::ZERO
            } else {
                i.jitter.mul_f64(rng.r#gen::<f64>())
            };
            (
                rng.r#gen::<f64>() < i.loss,
                rng.r#gen::<f64>() < i.duplicate,
                rng.r#gen::<f64>() < i.reorder,
                jitter,
            )
        };
        let c = &self.control;
        if lost {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        c.maybe_tamper(way, &mut pkt);
        let mut due = Instant::now() + i.delay + jitter;
        if held {
            c.reordered.fetch_add(1, Ordering::Relaxed);
            due += i.reorder_by;
        }
        c.forwarded.fetch_add(1, Ordering::Relaxed);
        if dup {
            c.duplicated.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send((due, pkt.clone()));
        }
        let _ = tx.send((due, pkt));
    }
}

/// Sends what `rx` yields, each at its due time (a datagram held back lets later ones pass).
fn sender(
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    send: impl Fn(Vec<u8>) + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut queue: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, u64, Vec<u8>)>> =
            std::collections::BinaryHeap::new();
        let mut n = 0u64;
        loop {
            let next = queue.peek().map(|r| r.0.0);
            tokio::select! {
                item = rx.recv() => match item {
                    Some((due, pkt)) => {
                        n += 1;
                        queue.push(std::cmp::Reverse((due, n, pkt)));
                    }
                    None => return,
                },
                () = async {
                    match next {
                        Some(due) => tokio::time::sleep_until(due).await,
                        None => std::future::pending().await,
                    }
                } => {
                    while let Some(std::cmp::Reverse((due, _, _))) = queue.peek() {
                        if *due > Instant::now() {
                            break;
                        }
                        if let Some(std::cmp::Reverse((_, _, pkt))) = queue.pop() {
                            send(pkt);
                        }
                    }
                }
            }
        }
    })
}

impl Relay {
    /// Starts a relay on `127.0.0.1:0` toward `upstream`.
    ///
    /// # Errors
    /// Binding the sockets.
    pub async fn start(upstream: SocketAddr, impairment: Impairment) -> std::io::Result<Self> {
        let front = Arc::new(bind_big(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
        )?);
        let back = Arc::new(bind_big(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
        )?);
        back.connect(upstream).await?;
        let control = Arc::new(Control::default());
        let shared = Arc::new(Shared {
            impairment,
            rng: Mutex::new(StdRng::seed_from_u64(impairment.seed)),
            control: control.clone(),
        });
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let back_slot = Arc::new(Mutex::new(back.clone()));
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        {
            let (front, client, shared, up_tx) =
                (front.clone(), client.clone(), shared.clone(), up_tx);
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    if let Ok(mut c) = client.lock() {
                        *c = Some(from);
                    }
                    shared.schedule(Way::Up, buf[..n].to_vec(), &up_tx);
                }
            }));
        }
        {
            let slot = back_slot.clone();
            tasks.push(sender(up_rx, move |pkt| {
                if let Ok(b) = slot.lock() {
                    let _ = b.try_send(&pkt);
                }
            }));
        }
        {
            let front = front.clone();
            tasks.push(sender(down_rx, move |pkt| {
                if let Some(to) = client.lock().ok().and_then(|c| *c) {
                    let _ = front.try_send_to(&pkt, to);
                }
            }));
        }
        let reader = read_back(back, shared.clone(), down_tx.clone());
        Ok(Self {
            addr: front.local_addr()?,
            control,
            upstream,
            reader: Mutex::new(Some(reader)),
            back: back_slot,
            tasks,
            down_tx,
            shared,
        })
    }

    /// Moves to a new source port toward the upstream, as a NAT that forgot the mapping: the
    /// upstream sees the same peer from a new address.
    ///
    /// # Errors
    /// Binding the new socket.
    pub async fn rebind(&self) -> std::io::Result<()> {
        let back = Arc::new(bind_big(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
        )?);
        back.connect(self.upstream).await?;
        if let Ok(mut slot) = self.back.lock() {
            *slot = back.clone();
        }
        let reader = read_back(back, self.shared.clone(), self.down_tx.clone());
        if let Ok(mut r) = self.reader.lock()
            && let Some(old) = r.replace(reader)
        {
            old.abort();
        }
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Ok(mut r) = self.reader.lock()
            && let Some(t) = r.take()
        {
            t.abort();
        }
    }
}

fn read_back(
    back: Arc<UdpSocket>,
    shared: Arc<Shared>,
    down_tx: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = back.recv(&mut buf).await {
            shared.schedule(Way::Down, buf[..n].to_vec(), &down_tx);
        }
    })
}

/// Runs a relay toward `upstream` and writes its port to `port_file` once bound; runs until the
/// process ends (the benchmark runs it as a child process).
///
/// # Errors
/// Binding the sockets or writing the port file.
pub async fn relay(
    upstream: SocketAddr,
    impairment: Impairment,
    port_file: &Path,
) -> std::io::Result<()> {
    let relay = Relay::start(upstream, impairment).await?;
    std::fs::write(port_file, relay.addr.port().to_string())?;
    std::future::pending::<()>().await;
    drop(relay);
    Ok(())
}

fn bind_big(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_both_ways_and_can_move_its_source_port() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start(server.local_addr().unwrap(), Impairment::none())
            .await
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 16];
        client.send_to(b"ping", relay.addr).await.unwrap();
        let (_, from1) = server.recv_from(&mut buf).await.unwrap();
        server.send_to(b"pong", from1).await.unwrap();
        let (n, _) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"pong");
        relay.rebind().await.unwrap();
        client.send_to(b"ping", relay.addr).await.unwrap();
        let (_, from2) = server.recv_from(&mut buf).await.unwrap();
        assert_ne!(from1, from2, "a new source port");
        relay.control.tamper_next(Way::Up, 1);
        client.send_to(b"abc", relay.addr).await.unwrap();
        let (n, _) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &[b'a', b'b' ^ 0x55, b'c']);
        assert_eq!(relay.control.tampered(), 1);
    }
}
