//! A relay's UDP socket: quinn's, plus answers to STUN binding requests, so devices and clients
//! learn the reflexive address of the very socket they punch from ([`super::path::Paths::reflexive`]).
//!
//! Kind: IO.
//!
//! A request is answered to its source with the address it came from (an answer is 32 or 44
//! bytes to a 20-byte request); answers are capped per source ([`PER_SOURCE_PER_SEC`], an IPv4
//! address or IPv6 /64) and at [`MAX_ANSWERS_PER_SEC`] in all, so a spoofed flood cannot turn
//! the relay into much of a reflector and one busy host cannot spend everyone's budget (issue
//! 18: one host at 116k requests/s starved every other client). quinn never sees these packets.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::limits::{TokenBucket, source_key};
use crate::stun;

/// STUN answers per second at most (the rest are dropped).
pub const MAX_ANSWERS_PER_SEC: u32 = 5000;

/// STUN answers per second to one source (after a burst of [`PER_SOURCE_BURST`]); a client
/// sends three requests per leg it dials.
pub const PER_SOURCE_PER_SEC: f64 = 10.0;
/// See [`PER_SOURCE_PER_SEC`].
pub const PER_SOURCE_BURST: f64 = 20.0;

/// Sources remembered at most (full buckets are forgotten first).
const MAX_SOURCES: usize = 4096;

/// What has been answered: per source, and in the current second in all.
struct Budget {
    second: (Instant, u32),
    sources: HashMap<IpAddr, TokenBucket>,
}

/// A [`quinn::AsyncUdpSocket`] that also answers STUN binding requests.
pub struct ReflectSocket {
    udp: Arc<dyn AsyncUdpSocket>,
    budget: Mutex<Budget>,
}

impl fmt::Debug for ReflectSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReflectSocket")
            .field("udp", &self.udp)
            .finish_non_exhaustive()
    }
}

impl ReflectSocket {
    /// Wraps `udp` (a bound, non-blocking socket).
    ///
    /// # Errors
    /// The OS error of registering the socket with the runtime.
    pub fn new(udp: std::net::UdpSocket) -> io::Result<Arc<Self>> {
        let udp = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, udp)?;
        Ok(Arc::new(Self {
            udp,
            budget: Mutex::new(Budget {
                second: (Instant::now(), 0),
                sources: HashMap::new(),
            }),
        }))
    }

    /// Whether a request from `source` may be answered now: its own budget first, then the
    /// socket's.
    fn may_answer(&self, source: IpAddr) -> bool {
        let Ok(mut b) = self.budget.lock() else {
            return false;
        };
        let now = Instant::now();
        if b.sources.len() >= MAX_SOURCES {
            b.sources.retain(|_, t| !t.is_full(now));
            if b.sources.len() >= MAX_SOURCES {
                b.sources.clear();
            }
        }
        let mine = b
            .sources
            .entry(source_key(source))
            .or_insert_with(|| TokenBucket::new(PER_SOURCE_BURST, PER_SOURCE_PER_SEC, now));
        if !mine.try_take(now) {
            return false;
        }
        if now.saturating_duration_since(b.second.0).as_secs() >= 1 {
            b.second = (now, 0);
        }
        b.second.1 += 1;
        b.second.1 <= MAX_ANSWERS_PER_SEC
    }

    fn answer(&self, to: SocketAddr, tx: &stun::TxId) {
        if !self.may_answer(to.ip()) {
            return;
        }
        let response = stun::response(tx, to);
        let _ = self.udp.try_send(&Transmit {
            destination: to,
            ecn: None,
            contents: &response,
            segment_size: None,
            src_ip: None,
        });
    }
}

impl AsyncUdpSocket for ReflectSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.udp.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.udp.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = match self.udp.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        for (m, buf) in meta.iter_mut().zip(bufs.iter()).take(n) {
            if m.len <= m.stride
                && let Some(tx) = stun::parse_request(&buf[..m.len.min(buf.len())])
            {
                self.answer(m.addr, &tx);
                m.len = 0; // quinn skips an empty entry
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

    /// Issue 18, defect 9: one host's flood spent the relay's whole STUN budget, so other
    /// clients got 3 answers in 50 and stayed relayed.
    #[tokio::test]
    async fn one_source_cannot_spend_everyones_answers() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_nonblocking(true).unwrap();
        let socket = ReflectSocket::new(udp).unwrap();
        let flood: IpAddr = "127.0.0.2".parse().unwrap();
        let answered = (0..100_000).filter(|_| socket.may_answer(flood)).count();
        assert!(answered <= 21, "{answered} answers to one flooding source");
        for other in 1..=50u8 {
            let ip = IpAddr::from([10, 0, 0, other]);
            assert!(socket.may_answer(ip), "source {ip} got no answer");
        }
        // An IPv6 /64 is one source.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let n = (0..100u16)
            .filter(|i| socket.may_answer(v6(&format!("2001:db8::{i:x}"))))
            .count();
        assert!(n <= 21, "{n}");
    }
}
