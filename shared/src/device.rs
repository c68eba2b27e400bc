//! The device: accepts client connections, authenticates them, answers control requests
//! (pairing, services, user management), and splices authorized data streams to configured
//! services.
//!
//! Kind: IO. Entry point: [`run`]. Control requests are in [`control`]; management commands that
//! work on the files (init, users, services, pairing switches) are in [`admin`].
//!
//! Per connection, in order: TLS handshake (client key proven, [`transport`]) → control stream →
//! `Hello` → version check → local or remote (DESIGN §6) → the remote-access switch → for remote
//! connections a valid server-connect token (constant-time, before any IAM work) → the key is
//! looked up in the *current* users (a key on no user has the unpaired role, which can only pair;
//! when no pairing mode is usable it is closed with [`CloseCode::UNKNOWN_KEY`]) → `Welcome`.
//! Per data stream: header → `Tunnel:Connect` evaluated against the current state, IAM and
//! service → TCP connect to the target → splice.
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
pub mod control;

use std::collections::HashMap;
use std::net::SocketAddr;
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
use crate::framed;
use crate::fsutil::{self, FileStamp, LockFile};
use crate::iam::{self, Action, Attrs, IamConfig, IamError, Value};
use crate::identity::{self, Fingerprint, KeyFileError};
use crate::pairing::{AttemptLimiter, LimiterConfig, PairingMode};
use crate::proto::{self, CloseCode, Hello, StreamCode, StreamOpen, Welcome};
use crate::secret::Secret;
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

    /// `iam.toml` (optional).
    pub fn iam_path(&self) -> PathBuf {
        self.dir.join("iam.toml")
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

    /// Loads `iam.toml`, or the built-in IAM when there is none.
    ///
    /// # Errors
    /// [`IamError`] naming the line.
    pub fn load_iam(&self) -> Result<IamConfig, IamError> {
        IamConfig::load(&self.iam_path())
    }

    /// Loads the state and IAM and checks that every user's role exists.
    ///
    /// # Errors
    /// [`DeviceError`] naming the file and the user.
    pub fn load_checked(&self) -> Result<(DeviceState, IamConfig), DeviceError> {
        let state = self.state_store().load()?;
        let iam = self.load_iam()?;
        check_user_roles(&iam, &state).map_err(|message| IamError {
            path: self.state_path().display().to_string(),
            message,
        })?;
        Ok((state, iam))
    }
}

fn check_user_roles(iam: &IamConfig, state: &DeviceState) -> Result<(), String> {
    iam::check_roles(
        iam,
        state
            .users
            .iter()
            .map(|u| (u.username.as_str(), u.role.as_str())),
    )
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
    /// `iam.toml` is invalid, or a user has a role it does not define.
    #[error(transparent)]
    Iam(#[from] IamError),
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
            | Self::Iam(_)
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

/// Everything the connection tasks share.
pub(crate) struct Shared {
    home: DeviceHome,
    store: StateStore,
    pub(crate) fingerprint: Fingerprint,
    config: RwLock<Arc<DeviceConfig>>,
    state: RwLock<Arc<DeviceState>>,
    iam: RwLock<Arc<IamConfig>>,
    /// The state file as we last wrote it, so the watcher does not reload our own writes.
    written: Mutex<Option<FileStamp>>,
    pub(crate) limiter: Mutex<AttemptLimiter>,
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

/// One client connection.
pub(crate) struct ConnEntry {
    pub(crate) conn: quinn::Connection,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) remote: SocketAddr,
    pub(crate) local: bool,
    /// The token presented in `Hello` (a remote connection must keep a valid one).
    pub(crate) sct: Option<Secret>,
    /// The user this key belongs to (set at hello, updated when it pairs).
    pub(crate) user: Mutex<Option<String>>,
    pub(crate) streams: Mutex<HashMap<u64, (String, Arc<Kill>)>>,
    pub(crate) auth: Mutex<control::PasswordAuth>,
}

/// Who a connection is, per the current state.
pub(crate) struct Who<'a> {
    pub(crate) user: Option<&'a User>,
    pub(crate) role: String,
}

/// Outcome of [`Shared::tunnel_check`].
pub(crate) struct TunnelCheck {
    /// Whether IAM allows the tunnel.
    pub(crate) allowed: bool,
    /// The service, if it exists.
    pub(crate) service: Option<ServiceConfig>,
    /// Who asked, for logs.
    pub(crate) user: String,
}

/// Decrements the in-progress connection count when a handler ends.
struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read()
        .map_or_else(|p| p.into_inner().clone(), |g| g.clone())
}

fn write<T>(lock: &RwLock<T>, value: T) {
    match lock.write() {
        Ok(mut g) => *g = value,
        Err(p) => *p.into_inner() = value,
    }
}

impl Shared {
    pub(crate) fn config(&self) -> Arc<DeviceConfig> {
        read(&self.config)
    }

    pub(crate) fn state(&self) -> Arc<DeviceState> {
        read(&self.state)
    }

    pub(crate) fn iam(&self) -> Arc<IamConfig> {
        read(&self.iam)
    }

    pub(crate) fn home(&self) -> &DeviceHome {
        &self.home
    }

    pub(crate) fn set_config(&self, config: DeviceConfig) {
        write(&self.config, Arc::new(config));
    }

    fn unpaired_count(&self) -> usize {
        self.conns()
            .iter()
            .filter(|c| c.user.lock().is_ok_and(|u| u.is_none()))
            .count()
    }

    fn conns(&self) -> Vec<Arc<ConnEntry>> {
        self.conns.lock().map_or_else(
            |p| p.into_inner().values().cloned().collect(),
            |g| g.values().cloned().collect(),
        )
    }

    /// Applies `change` to `state.json` (locked read-modify-write, on a blocking thread), then
    /// adopts the new state and re-checks every connection. On error nothing changed.
    pub(crate) async fn update_state<R: Send + 'static>(
        &self,
        change: impl FnOnce(&mut DeviceState) -> Result<R, StateError> + Send + 'static,
    ) -> Result<R, StateError> {
        let store = self.store.clone();
        let iam = self.iam();
        let result = tokio::task::spawn_blocking(move || {
            let out = store.update(|s| {
                let r = change(s)?;
                check_user_roles(&iam, s).map_err(StateError::Rejected)?;
                Ok(r)
            });
            (out, FileStamp::of(store.path()))
        })
        .await;
        let (out, stamp) =
            result.map_err(|e| StateError::Rejected(format!("state update failed: {e}")))?;
        let (state, value) = out?;
        if let Ok(mut w) = self.written.lock() {
            *w = stamp;
        }
        write(&self.state, Arc::new(state));
        self.enforce();
        Ok(value)
    }

    /// Who `entry` is under `state`.
    pub(crate) fn who<'a>(state: &'a DeviceState, iam: &IamConfig, entry: &ConnEntry) -> Who<'a> {
        let user = state.user_by_fingerprint(&entry.fingerprint);
        Who {
            role: user.map_or_else(|| iam.unpaired_role.clone(), |u| u.role.clone()),
            user,
        }
    }

    /// The attributes every request of `entry` carries.
    pub(crate) fn base_attrs(entry: &ConnEntry, who: &Who<'_>) -> Attrs {
        let mut a = Attrs::new();
        a.insert(iam::attr::CONNECTION_IS_LOCAL, Value::Bool(entry.local));
        a.insert(
            iam::attr::CONNECTION_FINGERPRINT,
            Value::Str(entry.fingerprint.to_string()),
        );
        if let Some(u) = who.user {
            a.insert(
                iam::attr::CONNECTION_USERNAME,
                Value::Str(u.username.clone()),
            );
        }
        a
    }

    /// Attributes of a tunnel action on service `id` (which may name no service).
    pub(crate) fn service_attrs(
        mut base: Attrs,
        id: &str,
        service: Option<&ServiceConfig>,
    ) -> Attrs {
        base.insert(iam::attr::TUNNEL_SERVICE_ID, Value::Str(id.to_string()));
        if let Some(s) = service {
            base.insert(
                iam::attr::TUNNEL_SERVICE_TYPE,
                Value::Str(s.service_type.clone()),
            );
        }
        base
    }

    /// Evaluates `action`, logging the decision at debug.
    pub(crate) fn authorize(
        iam: &IamConfig,
        entry: &ConnEntry,
        who: &Who<'_>,
        action: Action,
        attrs: &Attrs,
    ) -> bool {
        let d = iam.decide(&who.role, action, attrs);
        debug!(
            user = who.user.map_or("-", |u| u.username.as_str()),
            role = %who.role,
            %action,
            service = %attrs.get(iam::attr::TUNNEL_SERVICE_ID).map(ToString::to_string).unwrap_or_default(),
            target = %attrs.get(iam::attr::IAM_USERNAME).map(ToString::to_string).unwrap_or_default(),
            local = entry.local,
            "iam: {d}"
        );
        d.allowed
    }

    /// Pairing modes `entry` could use now.
    pub(crate) fn usable_modes(
        state: &DeviceState,
        iam: &IamConfig,
        entry: &ConnEntry,
    ) -> Vec<PairingMode> {
        let who = Self::who(state, iam, entry);
        if who.user.is_some() {
            return Vec::new();
        }
        let attrs = Self::base_attrs(entry, &who);
        PairingMode::ALL
            .into_iter()
            .filter(|&m| state.pairing.enabled(m))
            .filter(|&m| !m.local_only() || entry.local)
            .filter(|&m| {
                m != PairingMode::LocalInitial || state.local_initial_available(&iam.initial_role)
            })
            .filter(|&m| {
                m != PairingMode::PasswordOpen
                    || entry.local
                    || entry.sct.as_ref() == Some(&state.pairing.open_sct)
            })
            .filter(|&m| iam.decide(&who.role, m.action(), &attrs).allowed)
            .collect()
    }

    /// Whether `entry` may open a tunnel to `service_id` now, against the current state, IAM
    /// and services. Cheap: one lookup per table, no copies of the connection tables.
    pub(crate) fn tunnel_check(&self, entry: &ConnEntry, service_id: &str) -> TunnelCheck {
        let state = self.state();
        let config = self.config();
        let iam = self.iam();
        let who = Self::who(&state, &iam, entry);
        let service = config.service(service_id);
        let attrs = Self::service_attrs(Self::base_attrs(entry, &who), service_id, service);
        TunnelCheck {
            allowed: Self::authorize(&iam, entry, &who, Action::TunnelConnect, &attrs),
            service: service.cloned(),
            user: who
                .user
                .map_or("(unpaired)", |u| u.username.as_str())
                .to_string(),
        }
    }

    /// Re-checks every live connection and tunnel against the current state, IAM and config.
    pub(crate) fn enforce(&self) {
        let state = self.state();
        let config = self.config();
        let iam = self.iam();
        for entry in self.conns() {
            Self::enforce_on(&state, &config, &iam, &entry);
        }
    }

    /// Re-checks one connection and its tunnels, as [`Shared::enforce`] does for all.
    pub(crate) fn enforce_one(&self, entry: &ConnEntry) {
        Self::enforce_on(&self.state(), &self.config(), &self.iam(), entry);
    }

    fn enforce_on(state: &DeviceState, config: &DeviceConfig, iam: &IamConfig, entry: &ConnEntry) {
        let current = state
            .user_by_fingerprint(&entry.fingerprint)
            .map(|u| u.username.clone());
        let previous = entry.user.lock().map(|g| g.clone()).unwrap_or_default();
        match (&previous, &current) {
            (Some(prev), cur) if cur.as_ref() != Some(prev) => {
                info!(user = %prev, peer = %entry.fingerprint.fmt_short(), "access removed: closing the connection");
                entry
                    .conn
                    .close(CloseCode::REVOKED.to_varint(), b"access revoked");
                return;
            }
            (None, Some(_)) => {
                if let Ok(mut u) = entry.user.lock() {
                    u.clone_from(&current);
                }
            }
            _ => {}
        }
        if !entry.local {
            if !config.network.remote_access {
                entry.conn.close(
                    CloseCode::REMOTE_DISABLED.to_varint(),
                    b"remote access disabled",
                );
                return;
            }
            if !entry.sct.as_ref().is_some_and(|t| state.sct_valid(t)) {
                info!(peer = %entry.fingerprint.fmt_short(), "server-connect token no longer valid: closing the connection");
                entry
                    .conn
                    .close(CloseCode::SCT_REJECTED.to_varint(), b"token revoked");
                return;
            }
        }
        let who = Self::who(state, iam, entry);
        let base = Self::base_attrs(entry, &who);
        let streams = entry.streams.lock().map(|g| g.clone()).unwrap_or_default();
        for (service_id, kill) in streams.values() {
            let svc = config.service(service_id);
            if svc.is_none() {
                info!(service = %service_id, "service removed: resetting its tunnel");
                kill.kill(StreamCode::NO_SUCH_SERVICE);
                continue;
            }
            let attrs = Self::service_attrs(base.clone(), service_id, svc);
            if !Self::authorize(iam, entry, &who, Action::TunnelConnect, &attrs) {
                info!(service = %service_id, role = %who.role, "access to the service removed: resetting the tunnel");
                kill.kill(StreamCode::FORBIDDEN);
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
    // Stamped before loading: a change written while we start is then seen by the watcher.
    let stamps = Stamps::of(&home);
    let config = home.load_config()?;
    let (state, iam) = home.load_checked()?;
    let store = home.state_store();
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
        config.limits.max_connections,
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
        iam = %iam.source.as_ref().map_or_else(|| "built-in".to_string(), |p| p.display().to_string()),
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

    let announcer = if config.network.mdns {
        match bound.first() {
            Some(addr) => {
                match crate::discovery::Announcer::start(
                    &config.device_id,
                    &config.name,
                    &identity.fingerprint(),
                    addr.port(),
                ) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        warn!("cannot announce the device on the LAN (mDNS): {e}");
                        None
                    }
                }
            }
            None => None,
        }
    } else {
        None
    };

    let shared = Arc::new(Shared {
        home,
        store,
        fingerprint: identity.fingerprint(),
        streams_total: Arc::new(Semaphore::new(
            usize::try_from(config.limits.max_streams_total).unwrap_or(usize::MAX),
        )),
        config: RwLock::new(Arc::new(config)),
        state: RwLock::new(Arc::new(state)),
        iam: RwLock::new(Arc::new(iam)),
        written: Mutex::new(None),
        limiter: Mutex::new(AttemptLimiter::new(LimiterConfig::default(), clock_now())),
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
        .spawn(watch_files(shared.clone(), stamps, opts.reload_interval));
    for ep in &endpoints {
        shared.tasks.spawn(accept_loop(shared.clone(), ep.clone()));
    }

    shutdown.cancelled().await;
    info!("shutting down: no new connections or tunnels");
    drop(announcer);
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

/// The clock, read at the IO edge (the limiter itself is pure).
pub(crate) fn clock_now() -> std::time::Instant {
    std::time::Instant::now()
}

fn write_ready_file(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let mut json = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    json.push(b'\n');
    fsutil::write_atomic(path, &json, 0o644)
}

/// The versions of the three files a device watches.
struct Stamps {
    state: Option<FileStamp>,
    config: Option<FileStamp>,
    iam: Option<FileStamp>,
}

impl Stamps {
    fn of(home: &DeviceHome) -> Self {
        Self {
            state: FileStamp::of(&home.state_path()),
            config: FileStamp::of(&home.config_path()),
            iam: FileStamp::of(&home.iam_path()),
        }
    }
}

async fn watch_files(shared: Arc<Shared>, stamps: Stamps, interval: Duration) {
    let state_path = shared.store.path().to_owned();
    let config_path = shared.home.config_path();
    let iam_path = shared.home.iam_path();
    let Stamps {
        state: mut state_stamp,
        config: mut config_stamp,
        iam: mut iam_stamp,
    } = stamps;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.shutdown.cancelled() => return,
        }
        let mut changed = false;
        let stamp = FileStamp::of(&state_path);
        let ours = shared.written.lock().ok().and_then(|w| *w);
        if stamp != state_stamp {
            state_stamp = stamp;
            if stamp.is_some() && stamp == ours {
                // Our own write, already adopted.
            } else {
                match shared.store.load() {
                    Ok(state) => match check_user_roles(&shared.iam(), &state) {
                        Ok(()) => {
                            info!(users = state.users.len(), "state.json changed: reloaded");
                            write(&shared.state, Arc::new(state));
                            changed = true;
                        }
                        Err(e) => error!(
                            "state.json changed but cannot be used, keeping the previous access list: {e}"
                        ),
                    },
                    Err(e) => error!(
                        "state.json changed but cannot be used, keeping the previous access list: {e}"
                    ),
                }
            }
        }
        let stamp = FileStamp::of(&iam_path);
        if stamp != iam_stamp {
            iam_stamp = stamp;
            match shared.home.load_iam() {
                Ok(iam) => match check_user_roles(&iam, &shared.state()) {
                    Ok(()) => {
                        info!(source = %iam.source.as_ref().map_or_else(|| "built-in".to_string(), |p| p.display().to_string()), "iam.toml changed: reloaded");
                        write(&shared.iam, Arc::new(iam));
                        changed = true;
                    }
                    Err(e) => error!(
                        "iam.toml changed but cannot be used, keeping the previous policies: {e}"
                    ),
                },
                Err(e) => error!(
                    "iam.toml changed but cannot be used, keeping the previous policies: {e}"
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
                    next.network = new.network;
                    info!(
                        services = next.services.len(),
                        "device.toml changed: services, name and network policy reloaded"
                    );
                    shared.set_config(next);
                    changed = true;
                }
                Err(e) => error!(
                    "device.toml changed but cannot be used, keeping the previous settings: {e}"
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
    let deadline = Duration::from_secs(shared.config().limits.handshake_timeout_secs);
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
    let config = shared.config();
    let local = config.network.is_local(remote.ip());
    let state = shared.state();
    if !local {
        if !config.network.remote_access {
            info!("refused a remote connection: remote_access is off");
            conn.close(
                CloseCode::REMOTE_DISABLED.to_varint(),
                b"remote access disabled",
            );
            return;
        }
        // Before any IAM work: a remote connection needs a valid token.
        if !hello.sct.as_ref().is_some_and(|t| state.sct_valid(t)) {
            info!(
                presented = hello.sct.is_some(),
                "refused a remote connection without a valid server-connect token"
            );
            conn.close(
                CloseCode::SCT_REJECTED.to_varint(),
                b"server-connect token required",
            );
            return;
        }
    }
    let iam = shared.iam();
    let entry = Arc::new(ConnEntry {
        conn: conn.clone(),
        fingerprint,
        remote,
        local,
        sct: if local { None } else { hello.sct.clone() },
        user: Mutex::new(None),
        streams: Mutex::new(HashMap::new()),
        auth: Mutex::new(control::PasswordAuth::default()),
    });
    let who = Shared::who(&state, &iam, &entry);
    let unpaired = who.user.is_none();
    if unpaired && Shared::usable_modes(&state, &iam, &entry).is_empty() {
        info!(
            fingerprint = %fingerprint,
            client = hello.client_name.as_deref().unwrap_or("-"),
            local,
            "refused a client key that is on no user, with no pairing mode usable (add it with \
             `tunnel-device user add NAME --fingerprint {fingerprint}` or invite it)"
        );
        conn.close(CloseCode::UNKNOWN_KEY.to_varint(), b"unknown client key");
        return;
    }
    if unpaired && shared.unpaired_count() >= config.limits.max_unpaired_connections as usize {
        info!(
            limit = config.limits.max_unpaired_connections,
            "too many connections of unpaired keys: refusing"
        );
        conn.close(
            CloseCode::BUSY.to_varint(),
            b"too many unpaired connections",
        );
        return;
    }
    let welcome = Welcome {
        version: proto::PROTOCOL_VERSION,
        device_id: config.device_id.clone(),
        device_name: config.name.clone(),
        user: who.user.map(|u| u.username.clone()),
        role: who.role.clone(),
        local,
    };
    if let Ok(mut u) = entry.user.lock() {
        u.clone_from(&welcome.user);
    }
    if framed::write_frame(&mut ctl_send, &welcome, proto::MAX_FRAME_LEN)
        .await
        .is_err()
    {
        return;
    }
    info!(
        user = welcome.user.as_deref().unwrap_or("(unpaired)"),
        role = %welcome.role,
        local,
        client = hello.client_name.as_deref().unwrap_or("-"),
        "client connected"
    );
    drop(state);
    if unpaired {
        // Keys on no user can only pair: cap how long they may wait (how many may wait is
        // checked before the welcome).
        let timeout = Duration::from_secs(config.limits.unpaired_timeout_secs);
        let (c, e) = (conn.clone(), entry.clone());
        shared.tasks.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(timeout) => {
                    if e.user.lock().map_or(true, |u| u.is_none()) {
                        info!("an unpaired key did not pair in {timeout:?}: closing");
                        c.close(CloseCode::PROTOCOL.to_varint(), b"pairing timeout");
                    }
                }
                _ = c.closed() => {}
            }
        });
    }
    if let Ok(mut conns) = shared.conns.lock() {
        conns.insert(id, entry.clone());
    }
    // A removal may have landed between the lookup above and the registration.
    shared.enforce_one(&entry);

    tokio::select! {
        r = control::serve(&shared, &entry, ctl_send, ctl_recv) => {
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
    let user = entry.user.lock().ok().and_then(|u| u.clone());
    info!(
        user = user.as_deref().unwrap_or("(unpaired)"),
        "client disconnected: {reason}"
    );
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

    // Re-authorize against the current state, IAM and services on every stream.
    let check = shared.tunnel_check(&entry, &service_id);
    let user = check.user;
    // Whether a service exists is only revealed to those who may connect to that id.
    let Some(service) = check.service.filter(|_| check.allowed) else {
        let code = if check.allowed {
            StreamCode::NO_SUCH_SERVICE
        } else {
            StreamCode::FORBIDDEN
        };
        info!(%user, service = %service_id, "tunnel refused: {code}");
        splice::reject_stream(&mut send, &mut recv, code);
        return;
    };

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
    // A revocation may have landed while we connected, before this tunnel was registered
    // (and so seen by `enforce`): check this one tunnel again.
    let again = shared.tunnel_check(&entry, &service_id);
    if !again.allowed || again.service.is_none() {
        info!(%user, service = %service_id, "access changed while connecting: resetting the tunnel");
        kill.kill(StreamCode::FORBIDDEN);
    }
    debug!(%user, service = %service_id, "tunnel open");
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
    let handles: Vec<_> = config
        .services
        .iter()
        .cloned()
        .map(|svc| {
            tokio::spawn(async move {
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
            })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(p) = h.await {
            out.push(p);
        }
    }
    out
}
