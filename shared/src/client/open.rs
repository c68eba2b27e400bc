//! `tunnel-client open`: local TCP listeners forwarded to a device's services, every accepted
//! connection carried as one stream of a single QUIC connection.
//!
//! Kind: IO. Build with [`Opener::bind`] (loads the key and the pinned device, binds every
//! listener, so "port in use" fails before anything else), read live counters from
//! [`Opener::status`], then [`Opener::run`] until shutdown.
//!
//! Resilience: the listeners stay bound for the whole run. A connection manager keeps one
//! connection to the device and reconnects after a loss with capped exponential backoff and
//! jitter (a waiting local connection cuts the wait short). A local connection accepted while the
//! device is unreachable waits up to [`OpenOptions::connect_wait`], then is reset with a logged
//! reason. Only non-transient errors end the run: a changed device key, a key the device does not
//! know, revoked access, an incompatible version.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::session::{connection_error, learn};
use super::{
    ClientError, ClientHome, ConnectError, ConnectOptions, Dialer, KnownDevice, Session, connect,
};
use crate::fsutil;
use crate::identity::Fingerprint;
use crate::proto::{CloseCode, StreamCode};
use crate::splice::{self, Counters, Kill};
use crate::transport::Identity;
use crate::wire;

/// One `-L [BIND:]PORT:SERVICE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    /// Local address to bind (default 127.0.0.1).
    pub bind: IpAddr,
    /// Local port (0 = ephemeral).
    pub port: u16,
    /// The device's service id.
    pub service: String,
}

impl FromStr for ForwardSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!("'{s}' must look like [BIND:]PORT:SERVICE, e.g. 2222:ssh or 0.0.0.0:8080:web")
        };
        let (left, service) = s.rsplit_once(':').ok_or_else(usage)?;
        crate::config::check_id("service id", service).map_err(|e| e.0)?;
        let (bind, port) = match left.rsplit_once(':') {
            Some((bind, _)) if bind.contains(':') && !bind.starts_with('[') => {
                return Err(format!(
                    "'{s}': write an IPv6 bind address in brackets, e.g. [::1]:2222:ssh"
                ));
            }
            Some((bind, port)) => {
                let bare = bind
                    .strip_prefix('[')
                    .and_then(|b| b.strip_suffix(']'))
                    .unwrap_or(bind);
                let ip = if bare == "localhost" {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    bare.parse::<IpAddr>().map_err(|_| {
                        format!("'{s}': '{bind}' is not an IP address (write IPv6 as [::1])")
                    })?
                };
                (ip, port)
            }
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), left),
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("'{s}': '{port}' is not a port number (0-65535)"))?;
        Ok(Self {
            bind,
            port,
            service: service.to_string(),
        })
    }
}

/// Options of [`Opener::bind`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The client home.
    pub home: ClientHome,
    /// Name, id or fingerprint prefix of a known device.
    pub device: String,
    /// The forwards.
    pub forwards: Vec<ForwardSpec>,
    /// Where to write the ready JSON once listening.
    pub ready_file: Option<PathBuf>,
    /// How long a local connection waits for the device before it is reset.
    pub connect_wait: Duration,
    /// How long live tunnels may continue after a shutdown signal.
    pub drain_timeout: Duration,
    /// Connection settings.
    pub connect: ConnectOptions,
}

impl OpenOptions {
    /// Defaults for a device and forwards.
    pub fn new(home: ClientHome, device: impl Into<String>, forwards: Vec<ForwardSpec>) -> Self {
        Self {
            home,
            device: device.into(),
            forwards,
            ready_file: None,
            connect_wait: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(2),
            connect: ConnectOptions::default(),
        }
    }
}

/// Live counters of one forward.
#[derive(Debug)]
pub struct ServiceStatus {
    /// The service id.
    pub service: String,
    /// The bound local address.
    pub local: SocketAddr,
    /// Local connections open now.
    pub open: AtomicU64,
    /// Local connections accepted in total.
    pub total: AtomicU64,
    /// Bytes each way.
    pub bytes: Counters,
}

/// The state of the connection to the device.
#[derive(Debug, Clone)]
pub enum LinkState {
    /// Trying to connect.
    Connecting,
    /// Connected.
    Connected {
        /// The connection.
        conn: quinn::Connection,
        /// The device address (a virtual one when relayed).
        addr: SocketAddr,
        /// `direct` or `relayed via RELAY`.
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

/// Everything a status display needs.
#[derive(Debug)]
pub struct Status {
    /// The device's local name.
    pub device: String,
    /// This client's fingerprint.
    pub client_fingerprint: Fingerprint,
    /// One entry per forward, in command-line order.
    pub services: Vec<Arc<ServiceStatus>>,
    /// The connection state.
    pub link: watch::Receiver<LinkState>,
}

#[derive(Serialize)]
struct ReadyFile<'a> {
    pid: u32,
    fingerprint: String,
    device: &'a str,
    device_fingerprint: String,
    services: Vec<ReadyService<'a>>,
    /// `direct` or `relayed via RELAY` once connected (the file is rewritten at each connect).
    path: Option<String>,
    /// Round-trip time when it connected, ms.
    rtt_ms: Option<f64>,
}

fn write_ready(
    path: &std::path::Path,
    identity: &Identity,
    device: &KnownDevice,
    status: &Status,
    link: Option<(&str, Duration)>,
) -> Result<(), ClientError> {
    let ready = ReadyFile {
        pid: std::process::id(),
        fingerprint: identity.fingerprint().to_string(),
        device: &device.name,
        device_fingerprint: device.fingerprint.to_string(),
        services: status
            .services
            .iter()
            .map(|s| ReadyService {
                service: &s.service,
                local: s.local,
            })
            .collect(),
        path: link.map(|(p, _)| p.to_string()),
        rtt_ms: link.map(|(_, rtt)| rtt.as_secs_f64() * 1000.0),
    };
    let io = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let mut json = serde_json::to_vec(&ready).map_err(|e| io(std::io::Error::other(e)))?;
    json.push(b'\n');
    fsutil::write_atomic(path, &json, 0o644).map_err(io)
}

#[derive(Serialize)]
struct ReadyService<'a> {
    service: &'a str,
    local: SocketAddr,
}

/// A bound, not yet running `open`.
#[derive(Debug)]
pub struct Opener {
    opts: OpenOptions,
    device: KnownDevice,
    identity: Identity,
    dialer: Dialer,
    listeners: Vec<(TcpListener, Arc<ServiceStatus>)>,
    status: Arc<Status>,
    link_tx: watch::Sender<LinkState>,
}

impl Opener {
    /// Loads the key and the device, binds every listener and writes the ready file.
    ///
    /// # Errors
    /// [`ClientError`] (unknown device, port in use, …).
    pub async fn bind(opts: OpenOptions) -> Result<Self, ClientError> {
        if opts.forwards.is_empty() {
            return Err(ClientError::NoForwards);
        }
        let identity = opts.home.identity()?;
        let device = opts.home.find_device(&opts.device)?;
        if let Err(e) = fsutil::raise_open_file_limit() {
            warn!("cannot raise the open-file limit: {e}");
        }
        let mut listeners = Vec::new();
        let mut services = Vec::new();
        for f in &opts.forwards {
            let addr = SocketAddr::new(f.bind, f.port);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ClientError::Listen { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| ClientError::Listen { addr, source })?;
            if !local.ip().is_loopback() {
                warn!(
                    %local,
                    service = %f.service,
                    "listening on a non-loopback address: anyone who can reach it uses the tunnel with your key"
                );
            }
            let status = Arc::new(ServiceStatus {
                service: f.service.clone(),
                local,
                open: AtomicU64::new(0),
                total: AtomicU64::new(0),
                bytes: Counters::default(),
            });
            services.push(status.clone());
            listeners.push((listener, status));
        }
        let dialer = Dialer::new(&opts.connect.transport)?;
        let (link_tx, link_rx) = watch::channel(LinkState::Connecting);
        let status = Arc::new(Status {
            device: device.name.clone(),
            client_fingerprint: identity.fingerprint(),
            services,
            link: link_rx,
        });
        if let Some(path) = &opts.ready_file {
            write_ready(path, &identity, &device, &status, None)?;
        }
        Ok(Self {
            opts,
            device,
            identity,
            dialer,
            listeners,
            status,
            link_tx,
        })
    }

    /// Live status for displays.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Forwards until `shutdown` is cancelled (then drains and exits `Ok`) or a fatal error.
    ///
    /// # Errors
    /// [`ClientError::Connect`] for fatal connection errors (changed device key, unknown key,
    /// revoked access).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ClientError> {
        let Self {
            opts,
            device,
            identity,
            dialer,
            listeners,
            status,
            link_tx,
        } = self;
        let link_rx = link_tx.subscribe();
        let ctx = Arc::new(Ctx {
            link: link_rx,
            wake: Notify::new(),
            kill: CancellationToken::new(),
            connect_wait: opts.connect_wait,
        });
        let stop = shutdown.child_token();
        let locals = TaskTracker::new();
        let accept_tasks = TaskTracker::new();
        for (listener, svc) in listeners {
            info!(local = %svc.local, service = %svc.service, device = %device.name, "forwarding");
            accept_tasks.spawn(accept_loop(
                listener,
                svc,
                ctx.clone(),
                locals.clone(),
                stop.clone(),
            ));
        }
        let manager = manage(
            &dialer, &identity, &device, &opts, &status, &link_tx, &ctx, &stop,
        );
        let result = manager.await;
        // Either a signal (result Ok) or a fatal error: stop accepting in both cases.
        stop.cancel();
        accept_tasks.close();
        accept_tasks.wait().await;
        locals.close();
        if result.is_ok() && !locals.is_empty() {
            info!(tunnels = locals.len(), "waiting for live tunnels to finish");
            let _ = tokio::time::timeout(opts.drain_timeout, locals.wait()).await;
        }
        ctx.kill.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), locals.wait()).await;
        let reason = match &result {
            Ok(()) => "stopped".to_string(),
            Err(e) => e.to_string(),
        };
        if let LinkState::Connected { conn, .. } = &*link_tx.borrow() {
            conn.close(CloseCode::NORMAL.to_varint(), b"client exiting");
        }
        link_tx.send_replace(LinkState::Stopped(reason));
        dialer.close().await;
        if let Some(path) = &opts.ready_file {
            let _ = std::fs::remove_file(path);
        }
        result.map_err(ClientError::from)
    }
}

struct Ctx {
    link: watch::Receiver<LinkState>,
    wake: Notify,
    kill: CancellationToken,
    connect_wait: Duration,
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

/// Keeps one connection to the device until `stop`, direct or relayed, whichever path answers
/// first at each attempt. Returns `Err` only for fatal errors.
#[expect(
    clippy::too_many_arguments,
    reason = "the parts of one running `open`, passed once"
)]
async fn manage(
    dialer: &Dialer,
    identity: &Identity,
    device: &KnownDevice,
    opts: &OpenOptions,
    status: &Status,
    link_tx: &watch::Sender<LinkState>,
    ctx: &Ctx,
    stop: &CancellationToken,
) -> Result<(), ConnectError> {
    let mut backoff = Backoff::new();
    let mut checked_services = false;
    loop {
        link_tx.send_replace(LinkState::Connecting);
        // What the last connection learned (its relays, its token) is in the file now.
        let current = opts
            .home
            .find_device(&device.name)
            .ok()
            .filter(|d| d.fingerprint == device.fingerprint)
            .unwrap_or_else(|| device.clone());
        let device = &current;
        let attempt = tokio::select! {
            r = connect(dialer, identity, device, &opts.connect) => r,
            () = stop.cancelled() => return Ok(()),
        };
        let error = match attempt {
            Ok(session) => {
                if let Err(e) = session.require_user() {
                    session.close();
                    return Err(e);
                }
                backoff.reset();
                let path = connected(&session, identity, device, opts, status);
                // Learn this user's token (needed for remote connections) if we lack it.
                learn(&opts.home, &session, device).await;
                if !checked_services {
                    checked_services = true;
                    warn_unoffered(&session, &opts.forwards).await;
                }
                link_tx.send_replace(LinkState::Connected {
                    conn: session.conn.clone(),
                    addr: session.addr,
                    path: path.clone(),
                });
                let reason = tokio::select! {
                    r = session.conn.closed() => r,
                    () = follow_path(&session, path, identity, device, opts, status, link_tx) => {
                        unreachable!("follow_path never returns")
                    }
                    () = stop.cancelled() => return Ok(()),
                };
                let err = connection_error(&device.name, &reason, Some(identity.fingerprint()));
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
        link_tx.send_replace(LinkState::Down {
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

/// Logs a new connection and records its path in the ready file; returns the path.
fn connected(
    session: &Session,
    identity: &Identity,
    device: &KnownDevice,
    opts: &OpenOptions,
    status: &Status,
) -> String {
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
    if let Some(file) = &opts.ready_file
        && let Err(e) = write_ready(file, identity, device, status, Some((&path, session.rtt())))
    {
        warn!("cannot update the ready file: {e}");
    }
    path
}

/// While connected: notices when the path changes (a relayed connection punched a direct path,
/// or fell back to the relay) and says so in the log, the status and the ready file.
async fn follow_path(
    session: &Session,
    mut path: String,
    identity: &Identity,
    device: &KnownDevice,
    opts: &OpenOptions,
    status: &Status,
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
        session.record_seen(&opts.home);
        if let Some(file) = &opts.ready_file
            && let Err(e) = write_ready(file, identity, device, status, Some((&now, session.rtt())))
        {
            warn!("cannot update the ready file: {e}");
        }
        link_tx.send_modify(|l| {
            if let LinkState::Connected { path: p, .. } = l {
                p.clone_from(&now);
            }
        });
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

async fn accept_loop(
    listener: TcpListener,
    svc: Arc<ServiceStatus>,
    ctx: Arc<Ctx>,
    locals: TaskTracker,
    stop: CancellationToken,
) {
    let mut error_delay = Duration::from_millis(10);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => { error_delay = Duration::from_millis(10); x }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(local = %svc.local, "accept failed: {e}");
                    tokio::time::sleep(error_delay).await;
                    error_delay = (error_delay * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let span = info_span!("tunnel", service = %svc.service, local = %peer);
        locals.spawn(handle_local(ctx.clone(), svc.clone(), tcp).instrument(span));
    }
}

struct OpenGuard<'a>(&'a AtomicU64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle_local(ctx: Arc<Ctx>, svc: Arc<ServiceStatus>, tcp: TcpStream) {
    svc.total.fetch_add(1, Ordering::Relaxed);
    svc.open.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(&svc.open);
    let deadline = Instant::now() + ctx.connect_wait;
    let header = match wire::tunnel_header(&svc.service) {
        Ok(h) => h,
        Err(e) => {
            warn!("cannot encode the stream header: {e}");
            splice::abort_tcp(tcp);
            return;
        }
    };
    let mut link = ctx.link.clone();
    // A stream can fail to open if the connection dies just then: wait for the next one.
    let (send, recv) = loop {
        let conn = match wait_for_link(&mut link, &ctx.wake, deadline).await {
            Ok(c) => c,
            Err(reason) => {
                warn!(
                    "device not reachable within {:?} ({reason}): resetting the local connection",
                    ctx.connect_wait
                );
                splice::abort_tcp(tcp);
                return;
            }
        };
        match wire::open_tunnel(&conn, header.clone()).await {
            Ok(streams) => break streams,
            Err(e) => debug!("cannot open a stream: {e}; waiting for a new connection"),
        }
        if Instant::now() >= deadline {
            warn!("device connection kept failing: resetting the local connection");
            splice::abort_tcp(tcp);
            return;
        }
    };
    let kill = Kill::child_of(&ctx.kill);
    match splice::splice(tcp, send, recv, &kill, Some(&svc.bytes)).await {
        Ok(stats) => debug!(
            sent = stats.tcp_to_quic,
            received = stats.quic_to_tcp,
            "tunnel closed"
        ),
        Err(e) => match e.peer_code() {
            Some(
                code @ (StreamCode::FORBIDDEN
                | StreamCode::NO_SUCH_SERVICE
                | StreamCode::TARGET_UNREACHABLE
                | StreamCode::LIMIT_REACHED
                | StreamCode::BAD_HEADER),
            ) => warn!("the device refused the tunnel to '{}': {code}", svc.service),
            _ => info!("tunnel ended with an error: {e}"),
        },
    }
}

/// Waits until the link is up (or the deadline passes), waking the manager if it is backing off.
async fn wait_for_link(
    link: &mut watch::Receiver<LinkState>,
    wake: &Notify,
    deadline: Instant,
) -> Result<quinn::Connection, String> {
    let mut last_error = "still connecting".to_string();
    loop {
        match &*link.borrow_and_update() {
            LinkState::Connected { conn, .. } if conn.close_reason().is_none() => {
                return Ok(conn.clone());
            }
            LinkState::Stopped(reason) => return Err(reason.clone()),
            LinkState::Down { error, .. } => {
                last_error.clone_from(error);
                wake.notify_one();
            }
            _ => {}
        }
        match tokio::time::timeout_at(deadline, link.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("shutting down".into()),
            Err(_) => return Err(last_error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_spec_parsing() {
        let f: ForwardSpec = "2222:ssh".parse().unwrap();
        assert_eq!(
            f,
            ForwardSpec {
                bind: "127.0.0.1".parse().unwrap(),
                port: 2222,
                service: "ssh".into()
            }
        );
        let f: ForwardSpec = "0.0.0.0:0:web".parse().unwrap();
        assert_eq!(f.bind, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(f.port, 0);
        let f: ForwardSpec = "[::1]:8080:web".parse().unwrap();
        assert_eq!(f.bind, "::1".parse::<IpAddr>().unwrap());
        let f: ForwardSpec = "localhost:80:web".parse().unwrap();
        assert!(f.bind.is_loopback());
        for bad in [
            "ssh",
            "2222",
            "x:ssh",
            "70000:ssh",
            "host.example:22:ssh",
            "2222:bad service",
            "::1:22:ssh",
        ] {
            assert!(bad.parse::<ForwardSpec>().is_err(), "{bad}");
        }
    }

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
