//! One device's connection, kept up for as long as it has forwards: connect (direct or relayed,
//! whichever answers first), follow path changes, reconnect after a loss with capped exponential
//! backoff and jitter. Only non-transient errors end it: a changed device key, a key the device
//! does not know, revoked access, an incompatible version.
//!
//! Kind: IO. The state is published on a `watch` channel ([`LinkState`]); every change also
//! wakes the ready-file writer (`Shared::changed`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::local::{Ctx, ForwardSpec};
use crate::client::session::{connection_error, learn};
use crate::client::{
    ClientHome, ConnectError, ConnectOptions, Dialer, KnownDevice, Session, connect,
};
use crate::transport::Identity;

/// The state of the connection to a device.
#[derive(Debug, Clone)]
pub enum LinkState {
    /// Trying to connect.
    Connecting,
    /// Connected.
    Connected {
        /// The connection.
        conn: quinn::Connection,
        /// The device address (a virtual one when relayed).
        addr: std::net::SocketAddr,
        /// `direct`, `relayed via RELAY`, `direct (punched)`, …
        path: String,
    },
    /// Not connected; the next attempt is scheduled.
    Down {
        /// Why.
        error: String,
        /// When the next attempt starts.
        retry_at: Instant,
    },
    /// Gave up (fatal error) or stopped.
    Stopped(String),
}

impl LinkState {
    /// A one-word state for files and metrics: `connecting`, `connected`, `down`, `stopped`.
    pub fn word(&self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected { .. } => "connected",
            Self::Down { .. } => "down",
            Self::Stopped(_) => "stopped",
        }
    }
}

/// What every device's manager of one process shares.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) home: ClientHome,
    pub(super) identity: Identity,
    pub(super) dialer: Dialer,
    pub(super) connect: ConnectOptions,
    /// Notified on every change worth rewriting the ready file for.
    pub(super) changed: Notify,
    /// What the forwarding tasks count (exported with `--metrics`).
    pub(super) metrics: Arc<super::metrics::ClientMetrics>,
    /// Where the metrics are served, once they are.
    pub(super) metrics_addr: std::sync::OnceLock<std::net::SocketAddr>,
}

/// Capped exponential backoff with jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Self { next: Self::MIN }
    }

    fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// The next delay: a random value in [next/2, next], then `next` doubles up to the cap.
    fn next_delay(&mut self) -> Duration {
        let d = self.next.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

/// Keeps one connection to `device` until `stop`, direct or relayed, whichever path answers
/// first at each attempt. Returns `Err` only for fatal errors.
pub(super) async fn manage(
    shared: Arc<Shared>,
    device: KnownDevice,
    forwards: Arc<Mutex<Vec<ForwardSpec>>>,
    link_tx: Arc<watch::Sender<LinkState>>,
    ctx: Arc<Ctx>,
    stop: CancellationToken,
) -> Result<(), ConnectError> {
    let publish = |state: LinkState| {
        link_tx.send_replace(state);
        shared.changed.notify_one();
    };
    let mut backoff = Backoff::new();
    let mut checked_services = false;
    loop {
        publish(LinkState::Connecting);
        // What the last connection learned (its relays, its token) is in the file now.
        let current = shared
            .home
            .find_device(&device.name)
            .ok()
            .filter(|d| d.fingerprint == device.fingerprint)
            .unwrap_or_else(|| device.clone());
        let device = &current;
        let attempt = tokio::select! {
            r = connect(&shared.dialer, &shared.identity, device, &shared.connect) => r,
            () = stop.cancelled() => return Ok(()),
        };
        let error = match attempt {
            Ok(session) => {
                if let Err(e) = session.require_user() {
                    session.close();
                    return Err(e);
                }
                backoff.reset();
                let path = connected(&session, device);
                shared.metrics.connected(&device.name, &session.conn);
                // Waiting local connections may go now.
                publish(LinkState::Connected {
                    conn: session.conn.clone(),
                    addr: session.addr,
                    path: path.clone(),
                });
                // Learn this user's token (needed for remote connections) if we lack it.
                learn(&shared.home, &session, device).await;
                if !checked_services {
                    checked_services = true;
                    let wanted = forwards.lock().map(|f| f.clone()).unwrap_or_default();
                    warn_unoffered(&session, &wanted).await;
                }
                let reason = tokio::select! {
                    r = session.conn.closed() => r,
                    () = follow_path(&shared, &session, path, device, &link_tx) => {
                        unreachable!("follow_path never returns")
                    }
                    () = stop.cancelled() => return Ok(()),
                };
                let err =
                    connection_error(&device.name, &reason, Some(shared.identity.fingerprint()));
                if err.is_fatal() {
                    return Err(err);
                }
                warn!(device = %device.name, "lost the connection: {reason}; reconnecting");
                err.to_string()
            }
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => e.to_string(),
        };
        let delay = backoff.next_delay();
        let retry_at = Instant::now() + delay;
        debug!("next attempt in {delay:?}: {error}");
        publish(LinkState::Down {
            error: error.clone(),
            retry_at,
        });
        let earliest = Instant::now() + Backoff::MIN;
        tokio::select! {
            () = tokio::time::sleep_until(retry_at) => {}
            () = async {
                ctx.wake.notified().await;
                tokio::time::sleep_until(earliest).await;
            } => debug!("a local connection is waiting: retrying now"),
            () = stop.cancelled() => return Ok(()),
        }
    }
}

/// Logs a new connection; returns its path.
fn connected(session: &Session, device: &KnownDevice) -> String {
    let path = session.path_now();
    info!(
        device = %device.name,
        addr = %session.addr,
        %path,
        rtt_ms = session.rtt().as_secs_f64() * 1000.0,
        user = session.welcome.user.as_deref().unwrap_or("-"),
        role = %session.welcome.role,
        "connected"
    );
    path
}

/// While connected: notices when the path changes (a relayed connection punched a direct path,
/// or fell back to the relay) and says so in the log, the status and the ready file.
async fn follow_path(
    shared: &Shared,
    session: &Session,
    mut path: String,
    device: &KnownDevice,
    link_tx: &watch::Sender<LinkState>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let now = session.path_now();
        if now == path {
            continue;
        }
        info!(device = %device.name, from = %path, to = %now, "the connection changed path");
        session.record_seen(&shared.home);
        link_tx.send_modify(|l| {
            if let LinkState::Connected { path: p, .. } = l {
                p.clone_from(&now);
            }
        });
        shared.changed.notify_one();
        path = now;
    }
}

/// Warns about every forward whose service the device does not offer to this user.
async fn warn_unoffered(session: &Session, forwards: &[ForwardSpec]) {
    let list = match session.services().await {
        Ok(list) => list,
        Err(e) => {
            debug!("could not list services: {e}");
            return;
        }
    };
    for f in forwards {
        if !list.iter().any(|s| s.id == f.service) {
            let known: Vec<&str> = list.iter().map(|s| s.id.as_str()).collect();
            warn!(
                "device '{}' offers no service '{}' to you (it offers: {}); connections to it \
                 will be refused",
                session.device(),
                f.service,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new();
        let mut prev_cap = Backoff::MIN;
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d >= prev_cap / 2 && d <= prev_cap, "{d:?} vs {prev_cap:?}");
            prev_cap = (prev_cap * 2).min(Backoff::MAX);
        }
        assert_eq!(b.next, Backoff::MAX);
        b.reset();
        assert!(b.next_delay() <= Backoff::MIN);
    }
}
