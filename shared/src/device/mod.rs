//! The device: accepts client connections, authenticates them, answers control requests
//! (pairing, services, user management), and splices authorized tunnel streams to configured
//! services.
//!
//! Kind: IO. Entry point: [`run`]. Each file has one job:
//!
//! | module | job |
//! |---|---|
//! | [`home`] | the home's files: paths, loading, the locked `device.toml` edit |
//! | `live` | the running state: current policy, live connections, applying [`crate::authz`] |
//! | `reload` | watching the three files and re-enforcing after a change |
//! | `conn` | one connection: handshake, `Hello`, admission, `Welcome` |
//! | `relay` | legs to the relays of `[[relay]]`: attach, token hashes, relayed datagrams, backoff |
//! | `stream` | tunnel streams: header, `Tunnel:Connect`, target connect, splice; the self-test |
//! | `resolve` | connecting to a target: the one place service names are resolved (30 s cache) |
//! | `control` | control requests, one file per area (services, pairing, users, settings) |
//! | [`admin`] | the offline commands on the files (`init`, users, services, `iam explain`) |
//!
//! Per connection, in order: TLS handshake (client key proven, [`crate::transport`]) → control
//! stream → `Hello` → version check → local or remote (DESIGN §6) → the remote-access switch →
//! for remote connections a valid server-connect token (constant-time, before any IAM work) → the
//! key is looked up in the *current* users (a key on no user has the unpaired role, which can only
//! pair; when no pairing mode is usable it is closed with [`CloseCode::UNKNOWN_KEY`]) →
//! `Welcome`. Per tunnel stream: header → `Tunnel:Connect` evaluated against the current state,
//! IAM and service → TCP connect to the target → splice.
//!
//! The device polls `state.json`, `device.toml` and `iam.toml` for changes
//! ([`RunOptions::reload_interval`]). After any change every live connection and tunnel is
//! re-checked: removed users and revoked tokens are disconnected, tunnels the new policy denies
//! are reset.
//!
//! Shutdown order: stop accepting connections and streams → let live tunnels finish for up to
//! [`RunOptions::drain_timeout`] → reset the rest → close connections with
//! [`CloseCode::SHUTDOWN`] → `wait_idle` (bounded) → wait for tasks (bounded).

pub mod admin;
mod conn;
mod control;
pub mod home;
mod live;
mod metrics;
mod relay;
mod reload;
mod resolve;
mod stream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{ConfigError, DeviceConfig, ValueError};
use crate::fsutil;
use crate::iam::{IamError, RoleError, UnknownRole};
use crate::identity::{self, KeyFileError};
use crate::pairing::PairingMode;
use crate::proto::{self, CloseCode};
use crate::state::{DeviceState, StateError};
use crate::transport::{self, Identity, TransportError};
pub use home::DeviceHome;
use live::Live;
pub use relay::RelayStatus;
pub use stream::{Probe, probe_services};

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The device home.
    pub home: PathBuf,
    /// Listen addresses overriding `device.toml` (empty: use the file's).
    pub listen: Vec<SocketAddr>,
    /// Where to write the ready JSON once listening.
    pub ready_file: Option<PathBuf>,
    /// How often to check `state.json`, `device.toml` and `iam.toml` for changes.
    pub reload_interval: Duration,
    /// How long live tunnels may continue after a shutdown signal.
    pub drain_timeout: Duration,
}

impl RunOptions {
    /// Defaults for a home.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self {
            home: home.into(),
            listen: Vec::new(),
            ready_file: None,
            reload_interval: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(3),
        }
    }
}

/// What [`run`] reports once listening (also written as the ready file).
#[derive(Debug, Clone, Serialize)]
pub struct Ready {
    /// Process id.
    pub pid: u32,
    /// The device key's fingerprint.
    pub fingerprint: String,
    /// Device id.
    pub device_id: String,
    /// Device name.
    pub name: String,
    /// Bound UDP addresses.
    pub listen: Vec<SocketAddr>,
    /// Each relay of `[[relay]]` and its state (the ready file is rewritten when one changes).
    pub relays: Vec<RelayStatus>,
    /// Where the metrics are served (`[metrics] listen`, with its port if it was 0).
    pub metrics: Option<SocketAddr>,
}

impl Ready {
    fn new(identity: &Identity, config: &DeviceConfig, bound: &[SocketAddr]) -> Self {
        Self {
            pid: std::process::id(),
            fingerprint: identity.fingerprint().to_string(),
            device_id: config.device_id.clone(),
            name: config.name.clone(),
            listen: bound.to_vec(),
            relays: config
                .relays
                .iter()
                .map(|r| RelayStatus {
                    addr: r.addr.to_string(),
                    state: "connecting".into(),
                    observed: None,
                })
                .collect(),
            metrics: None,
        }
    }
}

/// A device operation (running it, or a command on its files) failed. Each variant says what
/// failed; the binary maps them to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A configuration file is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state file is missing, corrupt or unwritable, or a change was refused.
    #[error(transparent)]
    State(#[from] StateError),
    /// `iam.toml` is invalid.
    #[error(transparent)]
    Iam(#[from] IamError),
    /// A user has a role `iam.toml` does not define.
    #[error(transparent)]
    Role(#[from] RoleError),
    /// A role name that does not exist.
    #[error(transparent)]
    UnknownRole(#[from] UnknownRole),
    /// A value (service, name, address) is malformed.
    #[error(transparent)]
    Value(#[from] ValueError),
    /// The key file is missing, unprotected or invalid.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The transport could not be set up (e.g. the port is in use).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The JWKS of `[jwt]` is missing or unusable.
    #[error(transparent)]
    Jwt(#[from] crate::jwt::JwtError),
    /// Another device process uses this home.
    #[error(
        "another tunnel-device is already running with home '{0}' (it holds run.lock); stop it \
         first or use another --home"
    )]
    AlreadyRunning(PathBuf),
    /// `init` found a home that is initialised already.
    #[error(
        "'{0}' is already initialised; use --force to overwrite device.toml and state.json \
         (this removes all users; the key is kept)"
    )]
    AlreadyInitialised(PathBuf),
    /// A user without a pending invitation, where one is needed.
    #[error(
        "user '{0}' has no pending invitation; create one with `tunnel-device user invite {0}`"
    )]
    NoInvitation(String),
    /// No address clients could use is known.
    #[error(
        "cannot tell which address clients should use: pass --addr HOST:PORT or set \
         network.advertise in device.toml"
    )]
    NoAddress,
    /// Other IO on a named file (lock file, ready file, home directory).
    #[error("'{path}': {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `[metrics] listen` cannot be bound.
    #[error("cannot serve metrics on {addr} ([metrics] listen in device.toml): {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Runs the device until `shutdown` is cancelled, then shuts down gracefully.
///
/// `on_ready` is called once every endpoint is bound (after the ready file is written).
///
/// # Errors
/// [`DeviceError`] when the device cannot start. Errors of single connections are logged.
pub async fn run(
    opts: RunOptions,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), DeviceError> {
    let home = DeviceHome::new(opts.home.clone());
    // Stamped before loading: a change written while we start is then seen by the watcher.
    let stamps = reload::Stamps::of(&home);
    let config = home.load_config()?;
    let (state, iam) = home.load_checked()?;
    let key = identity::load_key(&home.key_path())?;
    let jwt = config
        .jwt
        .as_ref()
        .map(|j| crate::jwt::JwtVerifier::load(j, home.dir()))
        .transpose()?;
    let _run_lock = fsutil::LockFile::try_acquire(&home.run_lock_path())
        .map_err(|source| DeviceError::Io {
            path: home.run_lock_path(),
            source,
        })?
        .ok_or_else(|| DeviceError::AlreadyRunning(home.dir().to_owned()))?;

    raise_open_files(&config);
    let identity = Identity::new(key)?;
    let listen = if opts.listen.is_empty() {
        &config.listen
    } else {
        &opts.listen
    };
    let (endpoints, paths, bound) = bind(&identity, &config, listen)?;
    // Relay legs are client connections from their own socket.
    let leg_endpoint = transport::client_endpoint(&config.transport)?;

    let mut ready = Ready::new(&identity, &config, &bound);
    let metrics_listener = crate::metrics::bind_config(&config.metrics)
        .await
        .map_err(|(addr, source)| DeviceError::Metrics { addr, source })?;
    ready.metrics = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    log_start(&config, &state, &iam, &identity, &bound);
    let announcer = announce(&config, &identity, &bound);

    let live = Arc::new(Live::new(
        home,
        identity.fingerprint(),
        config,
        state,
        iam,
        shutdown.clone(),
    ));
    live.set_jwt(jwt);
    if let Some(listener) = metrics_listener {
        export_metrics(&live, listener);
    }
    if let Some(path) = &opts.ready_file {
        write_ready_file(path, &ready).map_err(|source| DeviceError::Io {
            path: path.clone(),
            source,
        })?;
    }
    on_ready(&ready);

    live.tasks
        .spawn(reload::watch(live.clone(), stamps, opts.reload_interval));
    accept_all(&live, &identity, &endpoints, &paths)?;
    start_relays(
        &live,
        identity,
        leg_endpoint.clone(),
        paths,
        opts.ready_file.clone(),
        ready,
    );

    shutdown.cancelled().await;
    info!("shutting down: no new connections or tunnels");
    drop(announcer);
    stop(&live, &endpoints, opts.drain_timeout).await;
    leg_endpoint.close(CloseCode::SHUTDOWN.to_varint(), b"device shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), leg_endpoint.wait_idle()).await;
    if let Some(path) = &opts.ready_file {
        let _ = std::fs::remove_file(path);
    }
    info!("stopped");
    Ok(())
}

/// An accept loop per endpoint. Relayed clients arrive at the first endpoint, whose socket also
/// punches direct paths.
fn accept_all(
    live: &Arc<Live>,
    identity: &Identity,
    endpoints: &[quinn::Endpoint],
    paths: &transport::path::Paths,
) -> Result<(), DeviceError> {
    let relayed = Arc::new(relayed_server_config(identity, &live.config())?);
    for (i, ep) in endpoints.iter().enumerate() {
        live.tasks.spawn(conn::accept_loop(
            live.clone(),
            ep.clone(),
            relayed.clone(),
            (i == 0).then(|| paths.clone()),
        ));
    }
    Ok(())
}

/// Serves the device's metrics on `listener` and samples its connections' RTT and congestion
/// window every [`crate::metrics::SAMPLE_EVERY`].
fn export_metrics(live: &Arc<Live>, listener: tokio::net::TcpListener) {
    let mut registry = crate::metrics::registry("tunnel-device");
    crate::metrics::register_source(
        &mut registry,
        Arc::new(metrics::Exported {
            live: Arc::downgrade(live),
        }),
    );
    live.metrics.sampler.register(&mut registry, "device");
    info!(addr = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "serving metrics at /metrics");
    crate::metrics::serve(listener, Arc::new(registry), live.shutdown.clone());
    let weak = Arc::downgrade(live);
    live.tasks.spawn(
        live.metrics
            .sampler
            .clone()
            .sample_until(live.shutdown.clone(), move || {
                let live = weak.upgrade()?;
                Some(live.conns().iter().map(|c| c.quic.clone()).collect())
            }),
    );
}

/// Starts the legs to the relays of `[[relay]]` (following `device.toml`), and keeps the ready
/// file in step with their states.
fn start_relays(
    live: &Arc<Live>,
    identity: Identity,
    leg_endpoint: quinn::Endpoint,
    paths: transport::path::Paths,
    ready_file: Option<PathBuf>,
    mut ready: Ready,
) {
    live.tasks.spawn(forbid_services(
        live.clone(),
        paths.clone(),
        live.config_changed(),
    ));
    let legs = Arc::new(relay::Legs {
        live: live.clone(),
        identity: Arc::new(identity),
        endpoint: leg_endpoint,
        paths,
        statuses: Arc::new(relay::Statuses::default()),
    });
    live.tasks
        .spawn(relay::supervise(legs.clone(), live.config_changed()));
    let Some(path) = ready_file else {
        return;
    };
    let (statuses, stop) = (legs.statuses.clone(), live.shutdown.clone());
    live.tasks.spawn(async move {
        loop {
            tokio::select! {
                () = statuses.changed() => {}
                () = stop.cancelled() => return,
            }
            ready.relays = statuses.all();
            if let Err(e) = write_ready_file(&path, &ready) {
                warn!("cannot update the ready file '{}': {e}", path.display());
            }
        }
    });
}

/// Keeps the device's services (those given by address, and `localhost`) out of the
/// hole-punching candidates a peer may name, as `device.toml` changes, until shutdown.
async fn forbid_services(
    live: Arc<Live>,
    paths: transport::path::Paths,
    mut changed: tokio::sync::watch::Receiver<u64>,
) {
    loop {
        let targets = live
            .config()
            .services
            .iter()
            .flat_map(|s| {
                let ips: Vec<std::net::IpAddr> = match &s.host {
                    crate::config::Host::Ip(ip) => vec![*ip],
                    crate::config::Host::Dns(name) if name.eq_ignore_ascii_case("localhost") => {
                        vec![
                            std::net::Ipv4Addr::LOCALHOST.into(),
                            std::net::Ipv6Addr::LOCALHOST.into(),
                        ]
                    }
                    crate::config::Host::Dns(_) => Vec::new(),
                };
                ips.into_iter().map(move |ip| SocketAddr::new(ip, s.port))
            })
            .collect();
        paths.set_forbidden(targets);
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            () = live.shutdown.cancelled() => return,
        }
    }
}

fn raise_open_files(config: &DeviceConfig) {
    match fsutil::raise_open_file_limit() {
        Ok(n) if n < u64::from(config.limits.max_streams_total) + 64 => warn!(
            open_files = n,
            "the open-file limit is below limits.max_streams_total: tunnels beyond it will fail \
             (raise it with ulimit -n or LimitNOFILE=)"
        ),
        Ok(n) => debug!(open_files = n, "open-file limit"),
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
}

/// One server endpoint per listen address; returns them with the addresses they bound and the
/// relayed paths of the first one (where relayed clients arrive).
fn bind(
    identity: &Identity,
    config: &DeviceConfig,
    listen: &[SocketAddr],
) -> Result<
    (
        Vec<quinn::Endpoint>,
        transport::path::Paths,
        Vec<SocketAddr>,
    ),
    DeviceError,
> {
    // A new connection may open the control stream only; tunnel streams are allowed once its
    // key is known to be a user's (`Conn::allow_tunnels`).
    let server_cfg = transport::server_config(
        identity,
        proto::ALPN,
        &config.transport,
        1,
        config.limits.max_handshakes,
    )?;
    let mut endpoints = Vec::new();
    let mut bound = Vec::new();
    let mut first_paths = None;
    for addr in listen {
        let (ep, paths) = transport::server_endpoint_with_paths(
            *addr,
            identity.secret_key(),
            server_cfg.clone(),
            &config.transport,
        )?;
        first_paths.get_or_insert(paths);
        bound.push(ep.local_addr().map_err(|source| {
            DeviceError::Transport(TransportError::Bind {
                addr: *addr,
                source,
            })
        })?);
        endpoints.push(ep);
    }
    let paths = first_paths.ok_or_else(|| {
        DeviceError::Value(ValueError("listen must hold at least one address".into()))
    })?;
    Ok((endpoints, paths, bound))
}

/// The server configuration for clients that arrive through a relay: as the direct one, with
/// packets that fit in a relay leg's datagrams.
fn relayed_server_config(
    identity: &Identity,
    config: &DeviceConfig,
) -> Result<quinn::ServerConfig, DeviceError> {
    let mut cfg = transport::server_config(
        identity,
        proto::ALPN,
        &config.transport,
        1,
        config.limits.max_handshakes,
    )?;
    cfg.transport_config(Arc::new(transport::relayed_transport_config(
        &config.transport,
        1,
    )));
    Ok(cfg)
}

/// The shutdown order after the signal (module docs).
async fn stop(live: &Live, endpoints: &[quinn::Endpoint], drain: Duration) {
    for ep in endpoints {
        ep.set_server_config(None);
    }
    live.streams.close();
    let open = live.streams.len();
    if open > 0 {
        info!(tunnels = open, deadline = ?drain, "waiting for live tunnels to finish");
        if tokio::time::timeout(drain, live.streams.wait())
            .await
            .is_err()
        {
            info!(
                tunnels = live.streams.len(),
                "drain deadline reached: resetting the remaining tunnels"
            );
        }
    }
    live.kill.cancel();
    transport::close_endpoints(
        endpoints,
        CloseCode::SHUTDOWN.to_varint(),
        b"device shutting down",
        &live.tasks,
    )
    .await;
}

fn log_start(
    config: &DeviceConfig,
    state: &DeviceState,
    iam: &crate::iam::IamConfig,
    identity: &Identity,
    bound: &[SocketAddr],
) {
    info!(
        device_id = %config.device_id,
        fingerprint = %identity.fingerprint(),
        listen = ?bound,
        users = state.users.len(),
        services = config.services.len(),
        iam = %iam.source_name(),
        "tunnel-device is listening"
    );
    for svc in &config.services {
        info!(service = %svc.id, r#type = %svc.service_type, target = %svc.target(), "service");
    }
    let enabled: Vec<&str> = PairingMode::ALL
        .into_iter()
        .filter(|m| state.pairing.enabled(*m))
        .map(PairingMode::as_str)
        .collect();
    info!(
        modes = %if enabled.is_empty() { "none".to_string() } else { enabled.join(", ") },
        remote_access = config.network.remote_access,
        "pairing"
    );
    if !state
        .users
        .iter()
        .any(|u| !u.fingerprints.is_empty() || u.password.is_some())
        && enabled.is_empty()
    {
        warn!(
            "no users and no pairing mode: nobody can use this device. Invite one with \
             `tunnel-device user invite NAME` or add a key with `tunnel-device user add`"
        );
    }
}

fn announce(
    config: &DeviceConfig,
    identity: &Identity,
    bound: &[SocketAddr],
) -> Option<crate::discovery::Announcer> {
    if !config.network.mdns {
        return None;
    }
    let addr = bound.first()?;
    crate::discovery::Announcer::start(
        &config.device_id,
        &config.name,
        &identity.fingerprint(),
        addr.port(),
    )
    .inspect_err(|e| warn!("cannot announce the device on the LAN (mDNS): {e}"))
    .ok()
}

fn write_ready_file(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let mut json = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    json.push(b'\n');
    fsutil::write_atomic(path, &json, 0o644)
}
