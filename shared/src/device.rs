//! The device: accepts client connections, authenticates them against `state.json`, answers
//! control requests, and splices authorized data streams to configured services.
//!
//! Kind: IO. Entry point: [`run`]. Management commands that work on the files (init, users,
//! services) are in [`admin`].
//!
//! Per connection, in order: TLS handshake (client key proven, [`transport`]) → control stream →
//! `Hello` → version check → key looked up in the *current* user list (unknown keys are closed
//! with [`CloseCode::UNKNOWN_KEY`]) → `Welcome`. Per data stream: header → the user and the
//! service are looked up again in the current state and config (so a removed user or service is
//! refused at once) → TCP connect to the target → splice.
//!
//! The device polls `state.json` and `device.toml` for changes ([`RunOptions::reload_interval`]).
//! A new state that drops a user closes that user's connections with [`CloseCode::REVOKED`]; a
//! service that disappears from the config has its live tunnels reset.
//!
//! Shutdown order: stop accepting connections and streams → let live tunnels finish for up to
//! [`RunOptions::drain_timeout`] → reset the rest → close connections with
//! [`CloseCode::SHUTDOWN`] → `wait_idle` (bounded) → wait for tasks (bounded).

pub mod admin;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::{ConfigError, DeviceConfig, ServiceConfig};
use crate::framed::{self, FrameError};
use crate::fsutil::{self, FileStamp, LockFile};
use crate::identity::{self, Fingerprint, KeyFileError};
use crate::proto::{
    self, CloseCode, DecodeError, ErrorCode, ErrorReply, Hello, Request, Response, ServiceInfo,
    StreamCode, StreamOpen, Welcome,
};
use crate::splice::{self, Kill};
use crate::state::{DeviceState, StateError, StateStore, User};
use crate::transport::{self, Identity, TransportError};

/// File layout of a device home directory.
#[derive(Debug, Clone)]
pub struct DeviceHome {
    dir: PathBuf,
}

impl DeviceHome {
    /// The home at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `device.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("device.toml")
    }

    /// `state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// `device.key`.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("device.key")
    }

    /// Held by a running device.
    pub fn run_lock_path(&self) -> PathBuf {
        self.dir.join("run.lock")
    }

    /// Serializes edits of `device.toml`.
    pub fn config_lock_path(&self) -> PathBuf {
        self.dir.join("device.lock")
    }

    /// The state store.
    pub fn state_store(&self) -> StateStore {
        StateStore::new(self.state_path())
    }

    /// Loads `device.toml`, with a hint when the home is not initialised.
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn load_config(&self) -> Result<DeviceConfig, ConfigError> {
        let path = self.config_path();
        if !path.exists() {
            return Err(ConfigError::Invalid {
                path,
                message: "does not exist: this device home is not initialised. Run \
                          `tunnel-device init` (or pass the right --home)"
                    .into(),
            });
        }
        DeviceConfig::load(&path)
    }
}

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The device home.
    pub home: PathBuf,
    /// Listen addresses overriding `device.toml` (empty: use the file's).
    pub listen: Vec<SocketAddr>,
    /// Where to write the ready JSON once listening.
    pub ready_file: Option<PathBuf>,
    /// How often to check `state.json` and `device.toml` for changes.
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
}

/// Why the device could not run.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A configuration file is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state file is missing, corrupt or unwritable.
    #[error(transparent)]
    State(#[from] StateError),
    /// The key file is missing, unprotected or invalid.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The transport could not be set up (e.g. the port is in use).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Another device process uses this home.
    #[error(
        "another tunnel-device is already running with home '{0}' (it holds run.lock); stop it \
         first or use another --home"
    )]
    AlreadyRunning(PathBuf),
    /// Other IO (lock file, ready file).
    #[error("'{path}': {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl DeviceError {
    /// Exit code: 2 for problems the user fixes in files or arguments, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_)
            | Self::Key(KeyFileError::Unprotected { .. } | KeyFileError::Invalid { .. }) => 2,
            Self::State(StateError::Missing(_) | StateError::Corrupt { .. }) => 2,
            Self::Key(KeyFileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                2
            }
            _ => 1,
        }
    }
}

/// Whether an address is on a local network: loopback, link-local, RFC 1918 or ULA.
pub fn is_local_addr(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unicast_link_local() || (v6.segments()[0] & 0xfe00) == 0xfc00
        }
    }
}

/// Whether `user` may open a tunnel to `service`. Every user on the list may, for now; roles and
/// policies refine this.
fn may_connect(_user: &User, _service: &ServiceConfig, _local: bool) -> bool {
    true
}

/// Whether `user` may see `service` in the service list.
fn may_see(user: &User, service: &ServiceConfig, local: bool) -> bool {
    may_connect(user, service, local)
}

struct Shared {
    home: DeviceHome,
    store: StateStore,
    config: RwLock<Arc<DeviceConfig>>,
    state: RwLock<Arc<DeviceState>>,
    conns: Mutex<HashMap<u64, Arc<ConnEntry>>>,
    next_id: AtomicU64,
    active: AtomicUsize,
    streams_total: Arc<Semaphore>,
    /// Cancelled at the shutdown signal: stop accepting.
    shutdown: CancellationToken,
    /// Cancelled after the drain deadline: end every splice.
    kill: CancellationToken,
    tasks: TaskTracker,
    streams: TaskTracker,
}

struct ConnEntry {
    conn: quinn::Connection,
    fingerprint: Fingerprint,
    username: String,
    local: bool,
    streams: Mutex<HashMap<u64, (String, Arc<Kill>)>>,
}

/// Decrements the in-progress connection count when a handler ends.
struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    fn config(&self) -> Arc<DeviceConfig> {
        self.config
            .read()
            .map_or_else(|p| p.into_inner().clone(), |g| g.clone())
    }

    fn state(&self) -> Arc<DeviceState> {
        self.state
            .read()
            .map_or_else(|p| p.into_inner().clone(), |g| g.clone())
    }

    fn set_state(&self, state: DeviceState) {
        match self.state.write() {
            Ok(mut g) => *g = Arc::new(state),
            Err(p) => *p.into_inner() = Arc::new(state),
        }
    }

    fn set_config(&self, config: DeviceConfig) {
        match self.config.write() {
            Ok(mut g) => *g = Arc::new(config),
            Err(p) => *p.into_inner() = Arc::new(config),
        }
    }

    fn conns(&self) -> Vec<Arc<ConnEntry>> {
        self.conns.lock().map_or_else(
            |p| p.into_inner().values().cloned().collect(),
            |g| g.values().cloned().collect(),
        )
    }

    /// Re-checks every live connection and stream against the current state and config.
    fn enforce(&self) {
        let state = self.state();
        let config = self.config();
        for entry in self.conns() {
            let user = state.user_by_fingerprint(&entry.fingerprint);
            let Some(user) = user.filter(|u| u.username == entry.username) else {
                info!(
                    user = %entry.username,
                    peer = %entry.fingerprint.fmt_short(),
                    "access removed: closing the connection"
                );
                entry
                    .conn
                    .close(CloseCode::REVOKED.to_varint(), b"access revoked");
                continue;
            };
            let streams = entry.streams.lock().map(|g| g.clone()).unwrap_or_default();
            for (service_id, kill) in streams.values() {
                match config.service(service_id) {
                    None => {
                        info!(service = %service_id, "service removed: resetting its tunnel");
                        kill.kill(StreamCode::NO_SUCH_SERVICE);
                    }
                    Some(svc) if !may_connect(user, svc, entry.local) => {
                        info!(user = %user.username, service = %service_id, "access to service removed: resetting tunnel");
                        kill.kill(StreamCode::FORBIDDEN);
                    }
                    Some(_) => {}
                }
            }
        }
    }
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
    let config = home.load_config()?;
    let store = home.state_store();
    let state = store.load()?;
    let key = identity::load_key(&home.key_path())?;
    let _run_lock = LockFile::try_acquire(&home.run_lock_path())
        .map_err(|source| DeviceError::Io {
            path: home.run_lock_path(),
            source,
        })?
        .ok_or_else(|| DeviceError::AlreadyRunning(home.dir().to_owned()))?;

    match fsutil::raise_open_file_limit() {
        Ok(n) if n < u64::from(config.limits.max_streams_total) + 64 => warn!(
            open_files = n,
            "the open-file limit is below limits.max_streams_total: tunnels beyond it will fail \
             (raise it with ulimit -n or LimitNOFILE=)"
        ),
        Ok(n) => debug!(open_files = n, "open-file limit"),
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
    let identity = Identity::new(key.clone())?;
    let listen = if opts.listen.is_empty() {
        config.listen.clone()
    } else {
        opts.listen.clone()
    };
    let server_cfg = transport::server_config(
        &identity,
        &config.transport,
        config.limits.max_streams_per_connection,
    )?;
    let mut endpoints = Vec::new();
    let mut bound = Vec::new();
    for addr in &listen {
        let ep = transport::device_endpoint(*addr, &key, server_cfg.clone(), &config.transport)?;
        bound.push(ep.local_addr().map_err(|source| {
            DeviceError::Transport(TransportError::Bind {
                addr: *addr,
                source,
            })
        })?);
        endpoints.push(ep);
    }

    let ready = Ready {
        pid: std::process::id(),
        fingerprint: identity.fingerprint().to_string(),
        device_id: config.device_id.clone(),
        name: config.name.clone(),
        listen: bound.clone(),
    };
    info!(
        device_id = %config.device_id,
        fingerprint = %identity.fingerprint(),
        listen = ?bound,
        users = state.users.len(),
        services = config.services.len(),
        "tunnel-device is listening"
    );
    for svc in &config.services {
        info!(service = %svc.id, r#type = %svc.service_type, target = %svc.target(), "service");
    }
    if state.users.is_empty() {
        warn!(
            "no users yet: add a client with `tunnel-device user add NAME --fingerprint FP` \
             (the client prints its fingerprint with `tunnel-client fingerprint`)"
        );
    }

    let shared = Arc::new(Shared {
        home,
        store,
        streams_total: Arc::new(Semaphore::new(
            usize::try_from(config.limits.max_streams_total).unwrap_or(usize::MAX),
        )),
        config: RwLock::new(Arc::new(config)),
        state: RwLock::new(Arc::new(state)),
        conns: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        active: AtomicUsize::new(0),
        shutdown: shutdown.clone(),
        kill: CancellationToken::new(),
        tasks: TaskTracker::new(),
        streams: TaskTracker::new(),
    });

    if let Some(path) = &opts.ready_file {
        write_ready_file(path, &ready).map_err(|source| DeviceError::Io {
            path: path.clone(),
            source,
        })?;
    }
    on_ready(&ready);

    shared
        .tasks
        .spawn(watch_files(shared.clone(), opts.reload_interval));
    for ep in &endpoints {
        shared.tasks.spawn(accept_loop(shared.clone(), ep.clone()));
    }

    shutdown.cancelled().await;
    info!("shutting down: no new connections or tunnels");
    for ep in &endpoints {
        ep.set_server_config(None);
    }
    shared.streams.close();
    let live = shared.streams.len();
    if live > 0 {
        info!(tunnels = live, deadline = ?opts.drain_timeout, "waiting for live tunnels to finish");
        if tokio::time::timeout(opts.drain_timeout, shared.streams.wait())
            .await
            .is_err()
        {
            info!(
                tunnels = shared.streams.len(),
                "drain deadline reached: resetting the remaining tunnels"
            );
        }
    }
    shared.kill.cancel();
    for ep in &endpoints {
        ep.close(CloseCode::SHUTDOWN.to_varint(), b"device shutting down");
    }
    for ep in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }
    shared.tasks.close();
    if tokio::time::timeout(Duration::from_secs(2), shared.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            tasks = shared.tasks.len(),
            "some tasks did not stop in time"
        );
    }
    if let Some(path) = &opts.ready_file {
        let _ = std::fs::remove_file(path);
    }
    info!("stopped");
    Ok(())
}

fn write_ready_file(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let mut json = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    json.push(b'\n');
    fsutil::write_atomic(path, &json, 0o644)
}

async fn watch_files(shared: Arc<Shared>, interval: Duration) {
    let state_path = shared.store.path().to_owned();
    let config_path = shared.home.config_path();
    let mut state_stamp = FileStamp::of(&state_path);
    let mut config_stamp = FileStamp::of(&config_path);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.shutdown.cancelled() => return,
        }
        let mut changed = false;
        let stamp = FileStamp::of(&state_path);
        if stamp != state_stamp {
            state_stamp = stamp;
            match shared.store.load() {
                Ok(state) => {
                    info!(users = state.users.len(), "state.json changed: reloaded");
                    shared.set_state(state);
                    changed = true;
                }
                Err(e) => error!(
                    "state.json changed but cannot be used, keeping the previous access list: {e}"
                ),
            }
        }
        let stamp = FileStamp::of(&config_path);
        if stamp != config_stamp {
            config_stamp = stamp;
            match DeviceConfig::load(&config_path) {
                Ok(new) => {
                    let old = shared.config();
                    if new.listen != old.listen
                        || new.transport != old.transport
                        || new.limits != old.limits
                    {
                        warn!(
                            "device.toml changed listen, limits or transport settings: restart the device to apply them"
                        );
                    }
                    let mut next = (*old).clone();
                    next.services = new.services;
                    next.name = new.name;
                    info!(
                        services = next.services.len(),
                        "device.toml changed: services reloaded"
                    );
                    shared.set_config(next);
                    changed = true;
                }
                Err(e) => error!(
                    "device.toml changed but cannot be used, keeping the previous services: {e}"
                ),
            }
        }
        if changed {
            shared.enforce();
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            () = shared.shutdown.cancelled() => return,
        };
        let max = shared.config().limits.max_connections as usize;
        if shared.active.fetch_add(1, Ordering::Relaxed) >= max {
            shared.active.fetch_sub(1, Ordering::Relaxed);
            warn!(remote = %incoming.remote_address(), max, "connection limit reached: refusing");
            incoming.refuse();
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, remote = %incoming.remote_address(), peer = tracing::field::Empty);
        shared
            .tasks
            .spawn(handle_connection(shared.clone(), incoming, id).instrument(span));
    }
}

async fn handle_connection(shared: Arc<Shared>, incoming: quinn::Incoming, id: u64) {
    let _active = ActiveGuard(&shared.active);
    let remote = incoming.remote_address();
    let limits = shared.config().limits.clone();
    let deadline = Duration::from_secs(limits.handshake_timeout_secs);
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!("handshake refused: {e}");
            return;
        }
    };
    let conn = match tokio::time::timeout(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!("handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!("handshake timed out");
            return;
        }
    };
    let Some(fingerprint) = transport::peer_fingerprint(&conn) else {
        conn.close(CloseCode::PROTOCOL.to_varint(), b"no client key");
        return;
    };
    tracing::Span::current().record("peer", tracing::field::display(fingerprint.fmt_short()));

    let hello = tokio::time::timeout(deadline, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let hello = framed::read_frame::<Hello>(&mut recv, proto::MAX_FRAME_LEN)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "control stream closed before hello".to_string())?;
        Ok::<_, String>((send, recv, hello))
    })
    .await;
    let (mut ctl_send, ctl_recv, hello) = match hello {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            debug!("no valid hello: {e}");
            conn.close(CloseCode::PROTOCOL.to_varint(), b"expected hello");
            return;
        }
        Err(_) => {
            debug!("hello timed out");
            conn.close(CloseCode::PROTOCOL.to_varint(), b"hello timeout");
            return;
        }
    };
    if hello.version != proto::PROTOCOL_VERSION {
        info!(
            client_version = hello.version,
            "incompatible client version"
        );
        conn.close(
            CloseCode::VERSION.to_varint(),
            format!("device speaks protocol {}", proto::PROTOCOL_VERSION).as_bytes(),
        );
        return;
    }
    let local = is_local_addr(remote.ip());
    let state = shared.state();
    let Some(user) = state.user_by_fingerprint(&fingerprint) else {
        info!(
            fingerprint = %fingerprint,
            client = hello.client_name.as_deref().unwrap_or("-"),
            "refused a client key that is on no user (add it with `tunnel-device user add NAME --fingerprint {fingerprint}`)"
        );
        conn.close(CloseCode::UNKNOWN_KEY.to_varint(), b"unknown client key");
        return;
    };
    let config = shared.config();
    let welcome = Welcome {
        version: proto::PROTOCOL_VERSION,
        device_id: config.device_id.clone(),
        device_name: config.name.clone(),
        user: Some(user.username.clone()),
        role: user.role.clone(),
        local,
    };
    if framed::write_frame(&mut ctl_send, &welcome, proto::MAX_FRAME_LEN)
        .await
        .is_err()
    {
        return;
    }
    info!(
        user = %user.username,
        role = %user.role,
        local,
        client = hello.client_name.as_deref().unwrap_or("-"),
        "client connected"
    );
    let entry = Arc::new(ConnEntry {
        conn: conn.clone(),
        fingerprint,
        username: user.username.clone(),
        local,
        streams: Mutex::new(HashMap::new()),
    });
    drop(state);
    if let Ok(mut conns) = shared.conns.lock() {
        conns.insert(id, entry.clone());
    }
    // A removal may have landed between the lookup above and the registration.
    shared.enforce();

    tokio::select! {
        r = control_loop(&shared, &entry, ctl_send, ctl_recv) => {
            match r {
                Ok(()) => conn.close(CloseCode::NORMAL.to_varint(), b"bye"),
                Err(e) if e.connection_error().is_some() => {}
                Err(e) => {
                    debug!("control stream failed: {e}");
                    conn.close(CloseCode::PROTOCOL.to_varint(), b"control stream error");
                }
            }
        }
        () = stream_accept_loop(&shared, &entry) => {}
    }
    let reason = conn.closed().await;
    if let Ok(mut conns) = shared.conns.lock() {
        conns.remove(&id);
    }
    info!(user = %entry.username, "client disconnected: {reason}");
}

async fn control_loop(
    shared: &Shared,
    entry: &ConnEntry,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), FrameError> {
    loop {
        let response = match framed::read_frame::<Request>(&mut recv, proto::MAX_FRAME_LEN).await {
            Ok(Some(req)) => handle_request(shared, entry, req),
            Ok(None) => return Ok(()),
            // The whole frame was consumed, only its content is unknown: say so and go on.
            Err(FrameError::Decode(DecodeError::Malformed(e))) => {
                debug!("undecodable request: {e}");
                Response::Error(ErrorReply {
                    code: ErrorCode::UNKNOWN_REQUEST,
                    message: "this device does not understand the request (it may be older than \
                              the client)"
                        .into(),
                })
            }
            Err(e) => return Err(e),
        };
        framed::write_frame(&mut send, &response, proto::MAX_FRAME_LEN).await?;
    }
}

fn handle_request(shared: &Shared, entry: &ConnEntry, req: Request) -> Response {
    let state = shared.state();
    let Some(user) = state.user_by_fingerprint(&entry.fingerprint) else {
        return Response::Error(ErrorReply {
            code: ErrorCode::FORBIDDEN,
            message: "access revoked".into(),
        });
    };
    match req {
        Request::ListServices => {
            let config = shared.config();
            let services = config
                .services
                .iter()
                .filter(|s| may_see(user, s, entry.local))
                .map(|s| ServiceInfo {
                    id: s.id.clone(),
                    service_type: s.service_type.clone(),
                    metadata: s.metadata.clone(),
                })
                .collect();
            Response::Services(services)
        }
    }
}

async fn stream_accept_loop(shared: &Arc<Shared>, entry: &Arc<ConnEntry>) {
    let mut next_stream = 0u64;
    loop {
        let (send, recv) = tokio::select! {
            s = entry.conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            () = shared.shutdown.cancelled() => {
                // Keep the connection until the drain ends, but take no new tunnels.
                refuse_streams(&entry.conn).await;
                return;
            }
        };
        next_stream += 1;
        let span = info_span!("stream", n = next_stream);
        shared.streams.spawn(
            handle_stream(shared.clone(), entry.clone(), next_stream, send, recv).instrument(span),
        );
    }
}

async fn refuse_streams(conn: &quinn::Connection) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        splice::reject_stream(&mut send, &mut recv, StreamCode::SHUTDOWN);
    }
}

async fn handle_stream(
    shared: Arc<Shared>,
    entry: Arc<ConnEntry>,
    n: u64,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Ok(_permit) = shared.streams_total.clone().try_acquire_owned() else {
        warn!("device-wide tunnel limit reached: refusing a tunnel");
        splice::reject_stream(&mut send, &mut recv, StreamCode::LIMIT_REACHED);
        return;
    };
    let config = shared.config();
    let deadline = Duration::from_secs(config.limits.handshake_timeout_secs);
    let header = tokio::time::timeout(
        deadline,
        framed::read_frame::<StreamOpen>(&mut recv, proto::MAX_STREAM_OPEN_LEN),
    )
    .await;
    let service_id = match header {
        Ok(Ok(Some(StreamOpen::Tunnel { service }))) => service,
        Ok(Ok(None)) => {
            debug!("stream ended before its header");
            splice::reject_stream(&mut send, &mut recv, StreamCode::BAD_HEADER);
            return;
        }
        Ok(Err(e)) => {
            debug!("bad stream header: {e}");
            splice::reject_stream(&mut send, &mut recv, StreamCode::BAD_HEADER);
            return;
        }
        Err(_) => {
            debug!("stream header timed out");
            splice::reject_stream(&mut send, &mut recv, StreamCode::BAD_HEADER);
            return;
        }
    };

    // Re-authorize against the current state on every stream.
    let state = shared.state();
    let Some(user) = state
        .user_by_fingerprint(&entry.fingerprint)
        .filter(|u| u.username == entry.username)
    else {
        splice::reject_stream(&mut send, &mut recv, StreamCode::FORBIDDEN);
        shared.enforce();
        return;
    };
    let Some(service) = config.service(&service_id) else {
        info!(user = %user.username, service = %service_id, "refused: no such service");
        splice::reject_stream(&mut send, &mut recv, StreamCode::NO_SUCH_SERVICE);
        return;
    };
    if !may_connect(user, service, entry.local) {
        info!(user = %user.username, service = %service_id, "refused: forbidden");
        splice::reject_stream(&mut send, &mut recv, StreamCode::FORBIDDEN);
        return;
    }
    let username = user.username.clone();
    drop(state);

    let target = service.target();
    let connect_timeout = Duration::from_secs(config.limits.connect_timeout_secs);
    let tcp = match tokio::time::timeout(connect_timeout, connect_target(&target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            warn!(service = %service_id, target = %target, "cannot reach the service: {e}");
            splice::reject_stream(&mut send, &mut recv, StreamCode::TARGET_UNREACHABLE);
            return;
        }
        Err(_) => {
            warn!(service = %service_id, target = %target, "cannot reach the service: timed out after {connect_timeout:?}");
            splice::reject_stream(&mut send, &mut recv, StreamCode::TARGET_UNREACHABLE);
            return;
        }
    };
    let kill = Arc::new(Kill::child_of(&shared.kill));
    if let Ok(mut streams) = entry.streams.lock() {
        streams.insert(n, (service_id.clone(), kill.clone()));
    }
    debug!(user = %username, service = %service_id, "tunnel open");
    let result = splice::splice(tcp, send, recv, &kill, None).await;
    if let Ok(mut streams) = entry.streams.lock() {
        streams.remove(&n);
    }
    match result {
        Ok(stats) => debug!(
            service = %service_id,
            to_service = stats.quic_to_tcp,
            from_service = stats.tcp_to_quic,
            "tunnel closed"
        ),
        Err(e) => debug!(service = %service_id, "tunnel ended: {e}"),
    }
}

async fn connect_target(target: &crate::config::HostPort) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in target.resolve().await? {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no addresses")))
}

/// Result of probing one service.
#[derive(Debug)]
pub struct Probe {
    /// The service.
    pub service: ServiceConfig,
    /// The address that accepted, or why none did.
    pub outcome: Result<SocketAddr, String>,
}

/// Tries a TCP connection to every service (concurrently), each bounded by the connect timeout.
pub async fn probe_services(config: &DeviceConfig) -> Vec<Probe> {
    let timeout = Duration::from_secs(config.limits.connect_timeout_secs);
    let probes = config.services.iter().cloned().map(|svc| async move {
        let target = svc.target();
        let outcome = match tokio::time::timeout(timeout, connect_target(&target)).await {
            Ok(Ok(tcp)) => tcp.peer_addr().map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("timed out after {timeout:?}")),
        };
        Probe {
            service: svc,
            outcome,
        }
    });
    futures_join_all(probes).await
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.9",
            "172.16.5.5",
            "169.254.1.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:192.168.1.1",
        ] {
            assert!(is_local_addr(a.parse().unwrap()), "{a}");
        }
        for a in [
            "8.8.8.8",
            "100.64.0.1",
            "2001:db8::1",
            "::ffff:8.8.8.8",
            "172.32.0.1",
        ] {
            assert!(!is_local_addr(a.parse().unwrap()), "{a}");
        }
    }
}
