//! A relay's UDP socket: quinn's, plus answers to STUN binding requests, so devices and clients
//! learn the reflexive address of the very socket they punch from ([`super::path::Paths::reflexive`]).
//!
//! Kind: IO.
//!
//! A request is answered to its source with the address it came from (an answer is 32 or 44
//! bytes to a 20-byte request); answers are capped at [`MAX_ANSWERS_PER_SEC`] in all, so a
//! spoofed flood cannot turn the relay into much of a reflector. quinn never sees these packets.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::stun;

/// STUN answers per second at most (the rest are dropped).
pub const MAX_ANSWERS_PER_SEC: u32 = 5000;

/// A [`quinn::AsyncUdpSocket`] that also answers STUN binding requests.
pub struct ReflectSocket {
    udp: Arc<dyn AsyncUdpSocket>,
    budget: Mutex<(Instant, u32)>,
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
            budget: Mutex::new((Instant::now(), 0)),
        }))
    }

    fn may_answer(&self) -> bool {
        let Ok(mut b) = self.budget.lock() else {
            return false;
        };
        if b.0.elapsed().as_secs() >= 1 {
            *b = (Instant::now(), 0);
        }
        b.1 += 1;
        b.1 <= MAX_ANSWERS_PER_SEC
    }

    fn answer(&self, to: SocketAddr, tx: &stun::TxId) {
        if !self.may_answer() {
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
