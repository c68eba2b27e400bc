//! The systemd service-manager protocol (`sd_notify`): readiness, reloads, stopping, and the
//! watchdog, for units with `Type=notify` and `WatchdogSec=`.
//!
//! Kind: IO. Every call is a no-op unless systemd started us with `NOTIFY_SOCKET` (a path, or
//! `@name` for the abstract namespace): the same binary runs under systemd, under another
//! supervisor, or by hand. A datagram that cannot be sent is logged at debug and dropped: the
//! service manager's view must never stop the service itself.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager. Returns whether
/// a manager is listening (`NOTIFY_SOCKET` set) and the datagram went out.
pub fn notify(state: &str) -> bool {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let sent = (|| {
        let socket = UnixDatagram::unbound()?;
        let bytes = target.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), &target)
        }
    })();
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!("cannot notify the service manager: {e}");
            false
        }
    }
}

/// `READY=1` with a one-line status: the service is serving.
pub fn ready(status: &str) -> bool {
    notify(&format!("READY=1\nSTATUS={}", one_line(status)))
}

/// `RELOADING=1` (and the monotonic time systemd's `Type=notify-reload` asks for); send
/// [`ready`] when the reload is done.
pub fn reloading() -> bool {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"))
}

/// `STOPPING=1`: a graceful shutdown has begun.
pub fn stopping() -> bool {
    notify("STOPPING=1")
}

/// A status line shown by `systemctl status`.
pub fn status(status: &str) -> bool {
    notify(&format!("STATUS={}", one_line(status)))
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`, for this process when
/// `WATCHDOG_PID` is set), if any.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends `WATCHDOG=1` at half the interval systemd asks for, from a task on the current
/// runtime, so the pings stop if the runtime stops making progress. `None` without a watchdog.
pub fn spawn_watchdog() -> Option<JoinHandle<()>> {
    let every = watchdog_interval()? / 2;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    }))
}

/// For a long-running command under systemd: starts the watchdog pings (if asked for) and says
/// `STOPPING=1` when `shutdown` is cancelled. Call [`ready`] once serving.
pub fn attach(shutdown: &tokio_util::sync::CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    spawn_watchdog();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stopping();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test owns the environment variables (tests of a binary share them).
    #[test]
    fn notifies_a_listening_socket_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 256];
        // Setting the environment of this process is `unsafe` in edition 2024: the variable is
        // given to a child that runs `child_sends`.
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sdnotify::tests::child_sends", "--nocapture"])
            .env("NOTIFY_SOCKET", &path)
            .env("TUNNEL_SDNOTIFY_CHILD", "1")
            .status()
            .unwrap();
        assert!(status.success());
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving two lines");
        let n = listener.recv(&mut buf).unwrap();
        assert!(
            std::str::from_utf8(&buf[..n])
                .unwrap()
                .starts_with("RELOADING=1\nMONOTONIC_USEC=")
        );
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    /// Run by [`notifies_a_listening_socket_only`] in a child process with `NOTIFY_SOCKET`.
    #[test]
    fn child_sends() {
        if std::env::var_os("TUNNEL_SDNOTIFY_CHILD").is_none() {
            assert!(!ready("nobody listens"), "sent without NOTIFY_SOCKET");
            assert_eq!(watchdog_interval(), None);
            return;
        }
        assert!(ready("serving\ntwo lines"));
        assert!(reloading());
        assert!(stopping());
    }
}
