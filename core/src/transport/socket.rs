//! UDP sockets: created by the application, not by quinn, so their buffers can be raised and so a
//! custom socket can replace them without touching protocol code.
//!
//! Kind: IO.
//!
//! This is where the custom `quinn::AsyncUdpSocket` of the relay issue will live: one socket
//! that sends to a peer directly or through a relay leg, behind a stable virtual peer address
//! (DESIGN §13). Device and client endpoints are built from whatever this module returns, so the
//! swap stays inside `transport`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, Socket, Type};

use super::TransportError;

static BUFFER_WARNING: AtomicBool = AtomicBool::new(false);

/// Creates a non-blocking UDP socket bound to `addr` with send and receive buffers raised to
/// `buffer` bytes where the kernel allows; warns once when it caps them.
///
/// # Errors
/// [`TransportError::Bind`].
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, TransportError> {
    let err = |source| TransportError::Bind { addr, source };
    let sock =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        // Dual stack where the OS allows it, so `[::]` also serves IPv4.
        let _ = sock.set_only_v6(false);
    }
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    // Linux reports twice the requested size (bookkeeping overhead included).
    let got_rcv = sock.recv_buffer_size().unwrap_or(0);
    let got_snd = sock.send_buffer_size().unwrap_or(0);
    if (got_rcv < buffer || got_snd < buffer) && !BUFFER_WARNING.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            requested = buffer,
            receive = got_rcv,
            send = got_snd,
            "the kernel capped the UDP socket buffers; throughput may suffer. Raise the limit \
             with: sysctl -w net.core.rmem_max={buffer} net.core.wmem_max={buffer}"
        );
    }
    sock.set_nonblocking(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    Ok(sock.into())
}
