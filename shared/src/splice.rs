//! Splicing a TCP connection to a QUIC stream, both ways, with the project's close contract.
//!
//! Kind: IO.
//!
//! | event | what the other side sees |
//! |---|---|
//! | TCP EOF | `finish()` on the stream; the far end shuts down its TCP write side (half-close) |
//! | stream finished by the peer | `shutdown(Write)` on the TCP socket |
//! | TCP read/write error | stream `reset` + `stop` with [`StreamCode::PEER_RESET`]; TCP closed with RST |
//! | stream reset / stopped by the peer | TCP closed with RST (`SO_LINGER 0`), never a clean FIN |
//! | connection lost | TCP closed with RST |
//! | [`Kill`] fired | stream reset/stopped with the kill's code, TCP closed with RST |
//!
//! So a failure anywhere reaches the far application as a reset, never as a clean EOF on
//! truncated data. Flow control is QUIC's: a reader that stops reading stops the sender once the
//! stream window is full, and other streams are unaffected.
//!
//! Copy loop: TCP → QUIC reads into a 64 KiB `BytesMut` and hands the filled part to quinn as
//! `Bytes` (`write_chunk`, no copy); QUIC → TCP takes quinn's received `Bytes` (`read_chunks`, no
//! copy) and writes up to 64 of them per vectored write.

use std::io::IoSlice;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::proto::StreamCode;

/// Read size of both copy directions.
pub const CHUNK: usize = 64 * 1024;

/// Byte counters shared by many splices (e.g. per service), updated as data moves.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes read from TCP and sent into QUIC.
    pub tcp_to_quic: AtomicU64,
    /// Bytes received from QUIC and written to TCP.
    pub quic_to_tcp: AtomicU64,
}

/// A way to end a splice from outside, with the code the peer will see.
#[derive(Debug)]
pub struct Kill {
    token: CancellationToken,
    code: AtomicU32,
}

impl Kill {
    /// A kill that also fires when `parent` is cancelled (then with [`StreamCode::SHUTDOWN`]).
    pub fn child_of(parent: &CancellationToken) -> Self {
        Self {
            token: parent.child_token(),
            code: AtomicU32::new(StreamCode::SHUTDOWN.0),
        }
    }

    /// Ends the splice; the peer sees `code`.
    pub fn kill(&self, code: StreamCode) {
        self.code.store(code.0, Ordering::Relaxed);
        self.token.cancel();
    }

    fn code(&self) -> StreamCode {
        StreamCode(self.code.load(Ordering::Relaxed))
    }
}

/// Bytes moved by a splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpliceStats {
    /// TCP → QUIC.
    pub tcp_to_quic: u64,
    /// QUIC → TCP.
    pub quic_to_tcp: u64,
}

/// Why a splice ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// Reading the local side (the TCP socket, or standard input) failed.
    #[error("local read failed: {0}")]
    TcpRead(std::io::Error),
    /// Writing the local side (the TCP socket, or standard output) failed.
    #[error("local write failed: {0}")]
    TcpWrite(std::io::Error),
    /// The peer reset the stream.
    #[error("the peer reset the stream: {0}")]
    Reset(StreamCode),
    /// The peer stopped reading the stream.
    #[error("the peer stopped the stream: {0}")]
    Stopped(StreamCode),
    /// The QUIC connection went away.
    #[error("connection lost: {0}")]
    ConnectionLost(quinn::ConnectionError),
    /// Ended from outside through a [`Kill`].
    #[error("ended locally: {0}")]
    Killed(StreamCode),
    /// Any other error reading the stream.
    #[error("stream read failed: {0}")]
    Read(quinn::ReadError),
    /// Any other error writing the stream.
    #[error("stream write failed: {0}")]
    Write(quinn::WriteError),
}

impl SpliceError {
    /// The code the far end sent, when it reset or stopped the stream.
    pub fn peer_code(&self) -> Option<StreamCode> {
        match self {
            Self::Reset(c) | Self::Stopped(c) => Some(*c),
            _ => None,
        }
    }

    /// The code this end resets the stream with for this error.
    pub fn local_code(&self) -> StreamCode {
        match self {
            Self::Reset(c) | Self::Stopped(c) | Self::Killed(c) => *c,
            _ => StreamCode::PEER_RESET,
        }
    }
}

fn read_error(e: quinn::ReadError) -> SpliceError {
    match e {
        quinn::ReadError::Reset(code) => SpliceError::Reset(StreamCode::from_varint(code)),
        quinn::ReadError::ConnectionLost(c) => SpliceError::ConnectionLost(c),
        other => SpliceError::Read(other),
    }
}

fn write_error(e: quinn::WriteError) -> SpliceError {
    match e {
        quinn::WriteError::Stopped(code) => SpliceError::Stopped(StreamCode::from_varint(code)),
        quinn::WriteError::ConnectionLost(c) => SpliceError::ConnectionLost(c),
        other => SpliceError::Write(other),
    }
}

/// Closes `tcp` with a RST instead of a FIN.
pub fn abort_tcp(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// Resets both directions of a stream with `code` (used to refuse or cancel it).
pub fn reject_stream(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: StreamCode) {
    let _ = send.reset(code.to_varint());
    let _ = recv.stop(code.to_varint());
}

/// Copies both ways until both directions have finished cleanly, or until the first error, after
/// which the stream is reset and the TCP connection aborted (see the module table).
///
/// # Errors
/// [`SpliceError`] describing the first failure.
pub async fn splice(
    mut tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    kill: &Kill,
    counters: Option<&Counters>,
) -> Result<SpliceStats, SpliceError> {
    let mut stats = SpliceStats::default();
    let result = {
        let (rd, mut wr) = tcp.split();
        let up = tcp_to_quic(&rd, &mut send, &mut stats.tcp_to_quic, counters);
        let down = quic_to_tcp(&mut recv, &mut wr, &mut stats.quic_to_tcp, counters);
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
            () = kill.token.cancelled() => Err(SpliceError::Killed(kill.code())),
        }
    };
    match result {
        Ok(()) => Ok(stats),
        Err(e) => {
            let code = e.local_code();
            let _ = send.reset(code.to_varint());
            let _ = recv.stop(code.to_varint());
            abort_tcp(tcp);
            Err(e)
        }
    }
}

async fn tcp_to_quic(
    rd: &tokio::net::tcp::ReadHalf<'_>,
    send: &mut quinn::SendStream,
    total: &mut u64,
    counters: Option<&Counters>,
) -> Result<(), SpliceError> {
    // The read buffer is allocated only once data is ready and handed to quinn whole, so an idle
    // tunnel holds no buffer (10,000 idle tunnels would otherwise pin 64 KiB each).
    let mut buf = BytesMut::new();
    loop {
        rd.readable().await.map_err(SpliceError::TcpRead)?;
        buf.reserve(CHUNK);
        let n = match rd.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(SpliceError::TcpRead(e)),
        };
        if n == 0 {
            // A finish on a stream the peer already stopped fails; the stopped error surfaces on
            // the next write or through the other direction, so it is safe to ignore here.
            let _ = send.finish();
            return Ok(());
        }
        *total += n as u64;
        if let Some(c) = counters {
            c.tcp_to_quic.fetch_add(n as u64, Ordering::Relaxed);
        }
        let chunk = std::mem::take(&mut buf).freeze();
        send.write_chunk(chunk).await.map_err(write_error)?;
    }
}

/// Chunks taken from quinn per `read_chunks` call and written with one `writev`.
const CHUNKS_PER_WRITE: usize = 64;

async fn quic_to_tcp(
    recv: &mut quinn::RecvStream,
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
    total: &mut u64,
    counters: Option<&Counters>,
) -> Result<(), SpliceError> {
    // quinn hands out its reassembled `Bytes` without copying; they go to the socket with one
    // vectored write per batch (one write per chunk would cost a syscall per QUIC frame).
    let mut chunks: [Bytes; CHUNKS_PER_WRITE] = std::array::from_fn(|_| Bytes::new());
    loop {
        match recv.read_chunks(&mut chunks).await.map_err(read_error)? {
            Some(n) => {
                let len = write_all_chunks(wr, &mut chunks[..n])
                    .await
                    .map_err(SpliceError::TcpWrite)?;
                *total += len;
                if let Some(c) = counters {
                    c.quic_to_tcp.fetch_add(len, Ordering::Relaxed);
                }
            }
            None => {
                wr.shutdown().await.map_err(SpliceError::TcpWrite)?;
                return Ok(());
            }
        }
    }
}

/// Writes every chunk (emptying them) with vectored writes; returns the byte count.
async fn write_all_chunks(
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
    chunks: &mut [Bytes],
) -> std::io::Result<u64> {
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let mut first = 0;
    while first < chunks.len() {
        let slices: [IoSlice<'_>; CHUNKS_PER_WRITE] = std::array::from_fn(|i| {
            chunks
                .get(first + i)
                .map_or_else(|| IoSlice::new(&[]), |c| IoSlice::new(c))
        });
        let count = (chunks.len() - first).min(CHUNKS_PER_WRITE);
        let mut written = wr.write_vectored(&slices[..count]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while first < chunks.len() && written >= chunks[first].len() {
            written -= chunks[first].len();
            chunks[first] = Bytes::new();
            first += 1;
        }
        if written > 0 {
            chunks[first].advance(written);
        }
    }
    Ok(total)
}

/// As [`splice`], for any local byte stream instead of a TCP socket (standard input and output
/// for `tunnel-client stdio`): `input`'s EOF finishes the stream, the peer's finish shuts
/// `output` down (half-close both ways). On an error the stream is reset; a pipe has no reset,
/// so the caller reports the error and exits non-zero.
///
/// The streams are borrowed so that the caller can wait for its finish to be acknowledged
/// ([`quinn::SendStream::stopped`]) before closing the connection.
///
/// # Errors
/// [`SpliceError`] describing the first failure.
pub async fn splice_io<R, W>(
    input: &mut R,
    output: &mut W,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    kill: &Kill,
) -> Result<SpliceStats, SpliceError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut stats = SpliceStats::default();
    let result = {
        let up = async {
            let mut buf = BytesMut::new();
            loop {
                buf.reserve(CHUNK);
                let n = input
                    .read_buf(&mut buf)
                    .await
                    .map_err(SpliceError::TcpRead)?;
                if n == 0 {
                    let _ = send.finish();
                    return Ok::<_, SpliceError>(());
                }
                stats.tcp_to_quic += n as u64;
                let chunk = std::mem::take(&mut buf).freeze();
                send.write_chunk(chunk).await.map_err(write_error)?;
            }
        };
        let down = async {
            let mut received = 0;
            while let Some(mut chunk) = recv.read_chunk(CHUNK, true).await.map_err(read_error)? {
                received += chunk.bytes.len() as u64;
                output
                    .write_all_buf(&mut chunk.bytes)
                    .await
                    .map_err(SpliceError::TcpWrite)?;
                output.flush().await.map_err(SpliceError::TcpWrite)?;
            }
            output.shutdown().await.map_err(SpliceError::TcpWrite)?;
            Ok::<_, SpliceError>(received)
        };
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => r.map(|((), down)| down),
            () = kill.token.cancelled() => Err(SpliceError::Killed(kill.code())),
        }
    };
    match result {
        Ok(received) => {
            stats.quic_to_tcp = received;
            Ok(stats)
        }
        Err(e) => {
            let code = e.local_code();
            let _ = send.reset(code.to_varint());
            let _ = recv.stop(code.to_varint());
            Err(e)
        }
    }
}
