//! The running relay: accepts legs, attaches devices, checks clients' tokens, and forwards.
//!
//! Kind: IO. Entry point: [`run`].
//!
//! Per leg, in order: the handshake gate (QUIC Retry for unproven sources under load, caps per
//! source and in total) → TLS with the leg's key proven → the leg cap → the first frame within
//! the handshake timeout → for a device: its id must be one `relay.toml` serves *with this key*
//! (else `WRONG_KEY`: no id squatting) → attached, its token hashes stored; for a client: the
//! failed-connect limiter of its source → the device must be served and attached → its token's
//! hash must be one the device uploaded (or its JWT valid for the device) → the channel caps →
//! connected. Nothing is forwarded before that answer, and a refused leg is closed with the
//! refusal's code.
//!
//! Shutdown: stop accepting → close every leg with `SHUTDOWN` → `wait_idle` (bounded) → wait for
//! tasks (bounded).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use tunnel_core::fsutil::{self, FileStamp};
use tunnel_core::identity::Fingerprint;
use tunnel_core::jwt::{JwtError, JwtVerifier};
use tunnel_core::limits::{HandshakeGate, TokenBucket, source_key};
use tunnel_core::relay::{self, RelayCode};
use tunnel_core::transport::tcp::{LegAcceptor, StreamSocket, TcpRefusal};
use tunnel_core::transport::{self, Identity, TransportError};

use crate::config::RelayConfig;
use crate::home::{HomeError, RelayHome};
use crate::hub::{Counters, Hub};
use crate::leg::accept_loop;
use crate::registry::Registry;

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The relay home.
    pub home: PathBuf,
    /// Listen addresses overriding `relay.toml` (empty: the file's).
    pub listen: Vec<SocketAddr>,
    /// Where to write the ready JSON once listening.
    pub ready_file: Option<PathBuf>,
    /// How often to check `relay.toml` for changes.
    pub reload_interval: Duration,
}

impl RunOptions {
    /// Defaults for a home.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self {
            home: home.into(),
            listen: Vec::new(),
            ready_file: None,
            reload_interval: Duration::from_millis(500),
        }
    }
}

/// What [`run`] reports once listening (also the ready file).
#[derive(Debug, Clone, Serialize)]
pub struct Ready {
    /// Process id.
    pub pid: u32,
    /// The relay's fingerprint (devices and clients pin it).
    pub fingerprint: String,
    /// Bound UDP addresses.
    pub listen: Vec<SocketAddr>,
    /// Bound TCP addresses (the same ports; empty with `tcp = false`).
    pub tcp: Vec<SocketAddr>,
    /// Devices served.
    pub devices: usize,
    /// Where the metrics are served (`[metrics] listen`, with its port if it was 0).
    pub metrics: Option<SocketAddr>,
}

/// The relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The home, its files or its key.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The transport (e.g. the port is in use).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The JWKS of `[jwt]`.
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// `[fleet]` cannot be used.
    #[error("[fleet] in relay.toml: {0}")]
    Fleet(String),
    /// The TCP port next to a UDP one.
    #[error(
        "cannot listen on TCP {addr}: {source} (the relay also listens on TCP at each UDP \
         address, for networks that block UDP; free the port, or set tcp = false in relay.toml)"
    )]
    TcpBind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another relay uses this home.
    #[error(
        "another tunnel-relay is already running with home '{path}' (it holds run.lock); stop \
         it first or use another --home", path = .0.display()
    )]
    AlreadyRunning(PathBuf),
    /// Other IO on a named file.
    #[error("'{path}': {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `[metrics] listen` cannot be bound.
    #[error("cannot serve metrics on {addr} ([metrics] listen in relay.toml): {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Failed connects remembered per source at most (full buckets are forgotten first).
const MAX_SOURCES: usize = 16_384;

/// The clock, read here at the IO edge.
pub(crate) fn now() -> Instant {
    Instant::now()
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) struct Relay {
    pub(crate) config: RwLock<Arc<RelayConfig>>,
    pub(crate) jwt: RwLock<Option<Arc<JwtVerifier>>>,
    pub(crate) hubs: Mutex<HashMap<String, Arc<Hub>>>,
    pub(crate) gate: Mutex<HandshakeGate>,
    pub(crate) failures: Mutex<HashMap<IpAddr, TokenBucket>>,
    pub(crate) per_client: Mutex<HashMap<Fingerprint, usize>>,
    pub(crate) legs: AtomicUsize,
    pub(crate) next_leg: AtomicU64,
    pub(crate) counters: Counters,
    pub(crate) metrics: crate::metrics::RelayMetrics,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// The fleet's registry (`[fleet]`), or none: this relay alone.
    pub(crate) registry: Option<Arc<Registry>>,
    /// Ids whose refused attaches were warned about lately.
    attach_warnings: crate::leg::AttachWarnings,
}

impl Relay {
    fn new(
        config: RelayConfig,
        jwt: Option<JwtVerifier>,
        registry: Option<Arc<Registry>>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            config: RwLock::new(Arc::new(config)),
            jwt: RwLock::new(jwt.map(Arc::new)),
            hubs: Mutex::new(HashMap::new()),
            gate: Mutex::new(HandshakeGate::default()),
            failures: Mutex::new(HashMap::new()),
            per_client: Mutex::new(HashMap::new()),
            legs: AtomicUsize::new(0),
            next_leg: AtomicU64::new(1),
            counters: Counters::default(),
            metrics: crate::metrics::RelayMetrics::default(),
            shutdown,
            tasks: TaskTracker::new(),
            registry,
            attach_warnings: crate::leg::AttachWarnings::default(),
        }
    }

    /// Logs a refused attach of `device_id` by `key`: a warning once a minute per id (someone
    /// may be squatting it, or the device's key changed), debug otherwise.
    pub(crate) fn warn_attach(&self, device_id: &str, key: Fingerprint) {
        let served = self.config().device(device_id).is_some();
        let what = if served { "wrong key" } else { "not served" };
        if self
            .attach_warnings
            .due(&format!("{device_id} ({what})"), now())
        {
            if served {
                warn!(
                    device = %device_id,
                    key = %key.fmt_short(),
                    "refused an attach: this key is not the one relay.toml has for the device id \
                     (further refusals of this id are logged at debug for a minute)"
                );
            } else {
                info!(device = %device_id, "refused an attach: relay.toml does not serve this id");
            }
        } else {
            debug!(device = %device_id, key = %key.fmt_short(), served, "refused an attach");
        }
    }

    pub(crate) fn config(&self) -> Arc<RelayConfig> {
        self.config
            .read()
            .map_or_else(|p| p.into_inner().clone(), |c| c.clone())
    }

    /// Every hub now.
    pub(crate) fn hubs_now(&self) -> Vec<Arc<Hub>> {
        self.hubs
            .lock()
            .map(|h| h.values().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn hub(&self, id: &str) -> Option<Arc<Hub>> {
        self.hubs.lock().ok()?.get(id).cloned()
    }

    pub(crate) fn hub_or_new(&self, id: &str) -> Option<Arc<Hub>> {
        let mut hubs = self.hubs.lock().ok()?;
        Some(
            hubs.entry(id.to_string())
                .or_insert_with(|| Arc::new(Hub::new(id.to_string())))
                .clone(),
        )
    }

    /// Forgets `hub` when nothing uses it and its device is not served (a served device's hub
    /// keeps its tokens while the device is away, so a client's proof is checked before it
    /// learns whether the device is attached).
    pub(crate) fn forget_if_idle(&self, hub: &Hub) {
        if let Ok(mut hubs) = self.hubs.lock()
            && hub.is_idle()
            && self.config().device(&hub.id).is_none()
        {
            hubs.remove(&hub.id);
        }
    }

    /// Whether `source` may try another connect now.
    pub(crate) fn may_try(&self, source: IpAddr) -> bool {
        let Ok(mut f) = self.failures.lock() else {
            return false;
        };
        f.get_mut(&source_key(source))
            .is_none_or(|b| b.wait(now()).is_zero())
    }

    /// Counts a failed connect of `source`.
    pub(crate) fn failed(&self, source: IpAddr) {
        let l = self.config().limits.clone();
        let Ok(mut f) = self.failures.lock() else {
            return;
        };
        let t = now();
        if f.len() >= MAX_SOURCES {
            f.retain(|_, b| !b.is_full(t));
            if f.len() >= MAX_SOURCES {
                f.clear();
            }
        }
        f.entry(source_key(source))
            .or_insert_with(|| {
                TokenBucket::new(
                    f64::from(l.failed_connects_burst),
                    f64::from(l.failed_connects_per_minute) / 60.0,
                    t,
                )
            })
            .spend(t);
    }

    pub(crate) fn take_client_slot(&self, client: Fingerprint, max: u32) -> bool {
        let Ok(mut m) = self.per_client.lock() else {
            return false;
        };
        let n = m.entry(client).or_insert(0);
        if u32::try_from(*n).unwrap_or(u32::MAX) >= max {
            return false;
        }
        *n += 1;
        true
    }

    pub(crate) fn give_client_slot(&self, client: Fingerprint) {
        if let Ok(mut m) = self.per_client.lock()
            && let Some(n) = m.get_mut(&client)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&client);
            }
        }
    }
}

/// Runs the relay until `shutdown` is cancelled.
///
/// # Errors
/// [`RelayError`] when it cannot start; errors of single legs are logged.
pub async fn run(
    opts: RunOptions,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), RelayError> {
    let home = RelayHome::new(opts.home.clone());
    let stamp = FileStamp::of(&home.config_path());
    let config = home.load_config()?;
    let key = home.load_key()?;
    let _run_lock = fsutil::LockFile::try_acquire(&home.run_lock_path())
        .map_err(|source| RelayError::Io {
            path: home.run_lock_path(),
            source,
        })?
        .ok_or_else(|| RelayError::AlreadyRunning(home.dir().to_owned()))?;
    let jwt = load_jwt(&home, &config)?;
    let identity = Identity::new(key)?;
    let registry = config
        .fleet
        .as_ref()
        .map(|f| Registry::new(f, identity.secret_key()).map(Arc::new))
        .transpose()
        .map_err(RelayError::Fleet)?;
    let _ = fsutil::raise_open_file_limit();
    let listen = if opts.listen.is_empty() {
        config.listen.clone()
    } else {
        opts.listen.clone()
    };
    let Bound {
        endpoints,
        udp: bound,
        tcp,
    } = bind(&identity, &config, &listen)?;
    let quic: Vec<quinn::Endpoint> = endpoints.iter().map(|(ep, _)| ep.clone()).collect();
    let tcp_bound = tcp.bound.clone();
    let metrics_listener = tunnel_core::metrics::bind_config(&config.metrics)
        .await
        .map_err(|(addr, source)| RelayError::Metrics { addr, source })?;
    let ready = Ready {
        pid: std::process::id(),
        fingerprint: identity.fingerprint().to_string(),
        listen: bound.clone(),
        tcp: tcp_bound.clone(),
        devices: config.devices.len(),
        metrics: metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
    };
    info!(
        fingerprint = %identity.fingerprint(),
        listen = ?bound,
        tcp = ?tcp_bound,
        devices = config.devices.len(),
        jwt = config.jwt.is_some(),
        "tunnel-relay is listening"
    );
    let relay = Arc::new(Relay::new(config, jwt, registry, shutdown.clone()));
    if let Some(path) = &opts.ready_file {
        write_ready(path, &ready).map_err(|source| RelayError::Io {
            path: path.clone(),
            source,
        })?;
    }
    if let Some(listener) = metrics_listener {
        export_metrics(&relay, listener);
    }
    on_ready(&ready);
    start_tasks(&relay, &endpoints, tcp);
    watch(&relay, &home, stamp, opts.reload_interval).await;
    info!("shutting down");
    stop(&relay, &quic).await;
    log_counters(&relay);
    if let Some(path) = &opts.ready_file {
        let _ = std::fs::remove_file(path);
    }
    info!("stopped");
    Ok(())
}

/// Serves the relay's metrics on `listener` and samples its legs every
/// [`tunnel_core::metrics::SAMPLE_EVERY`].
fn export_metrics(relay: &Arc<Relay>, listener: tokio::net::TcpListener) {
    let mut registry = tunnel_core::metrics::registry("tunnel-relay");
    tunnel_core::metrics::register_source(
        &mut registry,
        Arc::new(crate::metrics::Exported(Arc::downgrade(relay))),
    );
    relay.metrics.sampler.register(&mut registry, "relay_leg");
    info!(addr = ?listener.local_addr().ok(), "serving metrics at /metrics");
    tunnel_core::metrics::serve(listener, Arc::new(registry), relay.shutdown.clone());
    let weak = Arc::downgrade(relay);
    relay
        .tasks
        .spawn(
            relay
                .metrics
                .sampler
                .clone()
                .sample_until(relay.shutdown.clone(), move || {
                    let relay = weak.upgrade()?;
                    Some(crate::metrics::legs(&relay))
                }),
        );
}

/// The relay's long-running tasks: an accept loop per endpoint and per TCP listener, and the
/// registry's refresh.
fn start_tasks(relay: &Arc<Relay>, endpoints: &[Served], tcp: TcpLegs) {
    for (ep, socket) in endpoints {
        relay
            .tasks
            .spawn(accept_loop(relay.clone(), ep.clone(), socket.clone()));
    }
    tcp.spawn(relay);
    if let Some(r) = &relay.registry {
        relay
            .tasks
            .spawn(refresh_registry(relay.clone(), r.clone()));
    }
}

/// Until shutdown: re-announces every attached device to the fleet's registry every third of
/// the TTL, so entries of a live relay never expire and a dead relay's do.
async fn refresh_registry(relay: Arc<Relay>, registry: Arc<Registry>) {
    let mut tick = tokio::time::interval(registry.refresh_every());
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = relay.shutdown.cancelled() => return,
        }
        let hubs: Vec<Arc<Hub>> = relay
            .hubs
            .lock()
            .map(|h| {
                h.values()
                    .filter(|h| h.device().is_some())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let mut result = Ok(());
        for hub in hubs {
            result = registry.announce(&hub.id, &hub.tokens().entries).await;
            if result.is_err() {
                break;
            }
        }
        match result {
            Err(e) if !failing => {
                failing = true;
                warn!(
                    "cannot refresh the fleet's registry ({e}); attached devices are still \
                     served here, but other relays cannot redirect clients to them"
                );
            }
            Ok(()) if failing => {
                failing = false;
                info!("the fleet's registry is reachable again");
            }
            _ => {}
        }
    }
}

/// The shutdown order: stop accepting, close every leg, wait (bounded) for the endpoints and the
/// tasks.
async fn stop(relay: &Relay, endpoints: &[quinn::Endpoint]) {
    for ep in endpoints {
        ep.set_server_config(None);
    }
    transport::close_endpoints(
        endpoints,
        RelayCode::SHUTDOWN.to_varint(),
        b"relay shutting down",
        &relay.tasks,
    )
    .await;
}

/// Until shutdown: reloads `relay.toml` when it changes, and logs the counters every minute.
async fn watch(relay: &Relay, home: &RelayHome, mut stamp: Option<FileStamp>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    let mut stats = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            () = relay.shutdown.cancelled() => return,
            _ = tick.tick() => {
                let now = FileStamp::of(&home.config_path());
                if now != stamp {
                    stamp = now;
                    reload(relay, home);
                }
            }
            _ = stats.tick() => log_counters(relay),
        }
    }
}

/// A QUIC endpoint the relay serves, with the stream socket under it when it carries TCP legs.
type Served = (quinn::Endpoint, Option<Arc<StreamSocket>>);

/// What [`bind`] made: the QUIC endpoints (UDP, and one over TCP streams per TCP listener), and
/// the TCP listeners with the sockets their streams join.
struct Bound {
    endpoints: Vec<Served>,
    udp: Vec<SocketAddr>,
    tcp: TcpLegs,
}

/// The TCP side: listeners, the sockets their streams join, their addresses, the TLS acceptor.
struct TcpLegs {
    listeners: Vec<(tokio::net::TcpListener, Arc<StreamSocket>)>,
    bound: Vec<SocketAddr>,
    acceptor: Arc<LegAcceptor>,
}

impl TcpLegs {
    /// One accept loop per listener, on the relay's tasks.
    fn spawn(self, relay: &Arc<Relay>) {
        for (listener, socket) in self.listeners {
            relay.tasks.spawn(tcp_accept_loop(
                relay.clone(),
                listener,
                socket,
                self.acceptor.clone(),
            ));
        }
    }
}

/// Times a `:0` listen address is rebound when its UDP port is taken on TCP.
const TCP_PORT_TRIES: usize = 8;

/// One server endpoint per listen address (legs get datagrams and their MTU bound), and with
/// `tcp` a TCP listener on the same address and port.
fn bind(
    identity: &Identity,
    config: &RelayConfig,
    listen: &[SocketAddr],
) -> Result<Bound, RelayError> {
    let mut server = transport::server_config(
        identity,
        relay::ALPN,
        &config.transport,
        1,
        config.limits.max_handshakes,
    )?;
    server.transport_config(Arc::new(transport::leg_transport_config(
        &config.transport,
        1,
    )));
    let mut out = Bound {
        endpoints: Vec::new(),
        udp: Vec::new(),
        tcp: TcpLegs {
            listeners: Vec::new(),
            bound: Vec::new(),
            acceptor: Arc::new(LegAcceptor::new(identity)?),
        },
    };
    for addr in listen {
        let mut tries = 0;
        loop {
            let ep = transport::relay_endpoint(
                *addr,
                identity.secret_key(),
                server.clone(),
                &config.transport,
            )?;
            let local = ep.local_addr().map_err(|source| {
                RelayError::Transport(TransportError::Bind {
                    addr: *addr,
                    source,
                })
            })?;
            if !config.tcp {
                out.endpoints.push((ep, None));
                out.udp.push(local);
                break;
            }
            match bind_tcp(local) {
                Ok(listener) => {
                    let (tcp_ep, socket) = transport::stream_server_endpoint(
                        local,
                        identity.secret_key(),
                        server.clone(),
                    )?;
                    out.endpoints.push((ep, None));
                    out.endpoints.push((tcp_ep, Some(socket.clone())));
                    out.udp.push(local);
                    out.tcp.bound.push(local);
                    out.tcp.listeners.push((listener, socket));
                    break;
                }
                Err(_) if addr.port() == 0 && tries < TCP_PORT_TRIES => tries += 1,
                Err(source) => {
                    return Err(RelayError::TcpBind {
                        addr: local,
                        source,
                    });
                }
            }
        }
    }
    Ok(out)
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// Accepts TCP legs on `listener` until shutdown: the leg cap and the source's failure limiter
/// first, then TLS (bounded in flight and in time), then the stream joins `socket`, whose QUIC
/// endpoint runs the same leg code as UDP.
async fn tcp_accept_loop(
    relay: Arc<Relay>,
    listener: tokio::net::TcpListener,
    socket: Arc<StreamSocket>,
    acceptor: Arc<LegAcceptor>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: wait instead of spinning.
                    warn!("cannot accept a TCP leg: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = relay.shutdown.cancelled() => return,
        };
        let config = relay.config();
        let full =
            socket.stream_count() >= usize::try_from(config.limits.max_legs).unwrap_or(usize::MAX);
        if full || !relay.may_try(peer.ip()) {
            continue;
        }
        let timeout = Duration::from_secs(config.limits.handshake_timeout_secs);
        match acceptor.accept(&socket, tcp, peer, timeout) {
            Ok(()) => {}
            Err(TcpRefusal::Full) => {
                relay.metrics.handshake_failures.inc("tcp_full");
                debug!(%peer, "too many TLS handshakes in flight: TCP leg closed");
            }
            Err(TcpRefusal::Source) => {
                relay.metrics.handshake_failures.inc("tcp_source_cap");
                debug!(%peer, "this source holds too many TCP legs that carry nothing yet: closed");
            }
        }
    }
}

fn write_ready(path: &std::path::Path, ready: &Ready) -> std::io::Result<()> {
    let mut json = serde_json::to_vec(ready).map_err(std::io::Error::other)?;
    json.push(b'\n');
    fsutil::write_atomic(path, &json, 0o644)
}

fn load_jwt(home: &RelayHome, config: &RelayConfig) -> Result<Option<JwtVerifier>, JwtError> {
    config
        .jwt
        .as_ref()
        .map(|j| JwtVerifier::load(j, home.dir()))
        .transpose()
}

fn log_counters(relay: &Relay) {
    let c = &relay.counters;
    let devices = relay
        .hubs
        .lock()
        .map_or(0, |h| h.values().filter(|h| h.device().is_some()).count());
    info!(
        legs = relay.legs.load(Ordering::Relaxed),
        devices_attached = devices,
        forwarded = c.forwarded.load(Ordering::Relaxed),
        forwarded_bytes = c.bytes.load(Ordering::Relaxed),
        dropped = c.dropped.load(Ordering::Relaxed),
        "counters"
    );
}

/// Adopts a changed `relay.toml`: devices removed, or with another key, are disconnected.
fn reload(relay: &Relay, home: &RelayHome) {
    let config = match home.load_config() {
        Ok(c) => c,
        Err(e) => {
            warn!("relay.toml changed but is not valid; keeping the previous one: {e}");
            return;
        }
    };
    match load_jwt(home, &config) {
        Ok(j) => {
            if let Ok(mut slot) = relay.jwt.write() {
                *slot = j.map(Arc::new);
            }
        }
        Err(e) => warn!("keeping the previous JWT keys: {e}"),
    }
    let hubs: Vec<Arc<Hub>> = relay
        .hubs
        .lock()
        .map(|h| h.values().cloned().collect())
        .unwrap_or_default();
    for hub in hubs {
        let keep = config.device(&hub.id).is_some_and(|d| {
            hub.device()
                .is_none_or(|leg| transport::peer_fingerprint(&leg.conn) == Some(d.fingerprint))
        });
        if !keep {
            info!(device = %hub.id, "no longer served (or its key changed): disconnecting");
            hub.close_all(
                RelayCode::UNKNOWN_DEVICE.to_varint(),
                b"device no longer served",
            );
        }
    }
    info!(devices = config.devices.len(), "reloaded relay.toml");
    if let Ok(mut c) = relay.config.write() {
        *c = Arc::new(config);
    }
}
