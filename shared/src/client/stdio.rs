//! `tunnel-client stdio DEVICE SERVICE`: one tunnelled connection on standard input and output,
//! for ssh's `ProxyCommand` (no local port).
//!
//! Kind: IO. [`carry`] connects like every other command (pinned key, direct or relayed, token),
//! opens one tunnel stream and copies both ways with [`splice::splice_io`]: EOF on the input
//! finishes the stream, the device's finish shuts the output down, so half-close works both ways.
//! It returns when both directions are done, after the device has acknowledged everything sent
//! (closing the connection earlier could drop the last bytes). A refusal or a broken tunnel is
//! [`ClientError::Tunnel`]; a pipe has no reset, so the binary exits non-zero instead.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::{ClientError, ClientHome, ConnectOptions, Dialer, connect_paired};
use crate::proto::{CloseCode, StreamCode};
use crate::splice::{self, Kill, SpliceError, SpliceStats};
use crate::wire;

/// How long the end waits for the device to acknowledge the last bytes sent.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Carries one connection to `service` on `device` over `input` / `output` until both directions
/// end, or `shutdown` is cancelled (the stream is then reset).
///
/// # Errors
/// [`ClientError`]: the device unknown or unreachable, the tunnel refused or broken.
pub async fn carry<R, W>(
    home: &ClientHome,
    device: &str,
    service: &str,
    opts: &ConnectOptions,
    mut input: R,
    mut output: W,
    shutdown: CancellationToken,
) -> Result<SpliceStats, ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    crate::config::check_id("service id", service)?;
    let identity = home.identity()?;
    let dev = home.find_device(device)?;
    let dialer = Dialer::new(&opts.transport)?;
    let result = async {
        let session = tokio::select! {
            s = connect_paired(home, &dialer, &identity, &dev, opts) => s?,
            () = shutdown.cancelled() => return Err(interrupted(&dev.name, service)),
        };
        tracing::debug!(device = %dev.name, path = %session.path_now(), "connected");
        let header = wire::tunnel_header(service).map_err(|e| {
            crate::config::ValueError(format!("service id '{service}' cannot be sent: {e}"))
        })?;
        let (mut send, mut recv) = wire::open_tunnel(&session.conn, header)
            .await
            .map_err(|e| tunnel_error(&dev.name, service, SpliceError::Write(e)))?;
        let kill = Kill::child_of(&shutdown);
        let stats = splice::splice_io(&mut input, &mut output, &mut send, &mut recv, &kill)
            .await
            .map_err(|e| tunnel_error(&dev.name, service, e))?;
        // Everything sent must reach the device before the connection closes.
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, send.stopped()).await;
        session
            .conn
            .close(CloseCode::NORMAL.to_varint(), b"stream done");
        Ok(stats)
    }
    .await;
    dialer.close().await;
    result
}

fn tunnel_error(device: &str, service: &str, error: SpliceError) -> ClientError {
    ClientError::Tunnel {
        device: device.to_string(),
        service: service.to_string(),
        error: Box::new(error),
    }
}

fn interrupted(device: &str, service: &str) -> ClientError {
    tunnel_error(device, service, SpliceError::Killed(StreamCode::SHUTDOWN))
}

/// [`carry`] on this process's standard input and output. Shutting the output down (the device
/// finished its direction) points file descriptor 1 at `/dev/null`, so the reader of the pipe
/// sees EOF while the other direction goes on.
///
/// The input is read on tokio's blocking pool: after this returns with an error, a read may still
/// be pending there, so the caller should not wait for the runtime's blocking threads
/// (`Runtime::shutdown_timeout`).
///
/// # Errors
/// As [`carry`].
pub async fn run(
    home: &ClientHome,
    device: &str,
    service: &str,
    opts: &ConnectOptions,
    shutdown: CancellationToken,
) -> Result<SpliceStats, ClientError> {
    let output = HalfClosingStdout(tokio::io::stdout());
    carry(
        home,
        device,
        service,
        opts,
        tokio::io::stdin(),
        output,
        shutdown,
    )
    .await
}

/// Standard output whose shutdown closes the pipe (see [`run`]).
struct HalfClosingStdout(tokio::io::Stdout);

impl AsyncWrite for HalfClosingStdout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(Pin::new(&mut self.0).poll_flush(cx))?;
        Poll::Ready(crate::fsutil::detach_stdout())
    }
}
