//! Signals: the first SIGINT or SIGTERM starts a graceful shutdown, a second one exits at once.
//!
//! Kind: IO (process signals).

use tokio_util::sync::CancellationToken;

/// Exit status after a second signal (128 + SIGINT).
pub const FORCED_EXIT: i32 = 130;

/// Spawns the handler on the current runtime: the first SIGINT/SIGTERM cancels `shutdown`; a
/// second one calls `before_exit` (e.g. to clear a progress display) and exits with
/// [`FORCED_EXIT`].
///
/// The handlers are installed before this returns (not when the task first runs), so a signal
/// that arrives right after a process reports ready still shuts it down gracefully.
pub fn spawn_signal_handler(shutdown: CancellationToken, before_exit: fn()) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot install signal handlers: stop this process with SIGKILL");
        return;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received: shutting down (send it again to exit at once)");
        shutdown.cancel();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        before_exit();
        #[expect(clippy::print_stderr, reason = "the last words of a forced exit")]
        {
            eprintln!("second signal: exiting now");
        }
        std::process::exit(FORCED_EXIT);
    });
}
