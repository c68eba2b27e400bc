//! The running device's shared state: the current configuration, state and IAM (swapped whole on
//! every change), the registry of live connections and their tunnels, the limits, and the
//! application of [`authz`] decisions (closing connections, resetting tunnels).
//!
//! Kind: IO (state writes on a blocking thread; closes QUIC connections).
//!
//! Every change goes through [`Live::update_state`] (locked, atomic) or a reload, and ends in
//! [`Live::enforce`]: the pure core says what no longer holds, this module does it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::home::{DeviceHome, check_user_roles};
use crate::authz::{self, ConnFacts, Enforcement, LiveConn, Policy, Verdict, Who};
use crate::config::DeviceConfig;
use crate::fsutil::FileStamp;
use crate::iam::{self, IamConfig};
use crate::identity::Fingerprint;
use crate::pairing::{AttemptLimiter, LimiterConfig, PasswordFlow};
use crate::proto::{CloseCode, StreamCode};
use crate::secret::Secret;
use crate::splice::Kill;
use crate::state::{DeviceState, Rejection, StateError, StateStore};

/// Everything the connection tasks share.
pub(crate) struct Live {
    home: DeviceHome,
    store: StateStore,
    /// This device's key.
    pub(crate) fingerprint: Fingerprint,
    config: RwLock<Arc<DeviceConfig>>,
    state: RwLock<Arc<DeviceState>>,
    iam: RwLock<Arc<IamConfig>>,
    /// The state file as we last wrote it, so the watcher does not reload our own writes.
    written: Mutex<Option<FileStamp>>,
    /// Failed password attempts, per source and overall.
    pub(crate) limiter: Mutex<AttemptLimiter>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Connections being handled (handshake included), for the connection cap.
    pub(crate) active: AtomicUsize,
    /// Device-wide tunnel permits.
    pub(crate) streams_total: Arc<Semaphore>,
    /// Cancelled at the shutdown signal: stop accepting.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled after the drain deadline: end every splice.
    pub(crate) kill: CancellationToken,
    /// Connection tasks and helpers.
    pub(crate) tasks: TaskTracker,
    /// Tunnel tasks (drained separately at shutdown).
    pub(crate) streams: TaskTracker,
}

/// One client connection past `Hello`.
pub(crate) struct Conn {
    /// The QUIC connection.
    pub(crate) quic: quinn::Connection,
    /// The key proven in the handshake.
    pub(crate) fingerprint: Fingerprint,
    /// Where it came from.
    pub(crate) remote: SocketAddr,
    /// Local or remote (DESIGN §6), decided at `Hello`.
    pub(crate) local: bool,
    /// The token presented in `Hello` (a remote connection must keep a valid one).
    pub(crate) token: Option<Secret>,
    /// The user this key belongs to (set at hello, updated when it pairs).
    pub(crate) user: Mutex<Option<String>>,
    /// Open tunnels: id → (service, kill switch).
    pub(crate) tunnels: Mutex<HashMap<u64, (String, Arc<Kill>)>>,
    /// Password pairing in progress on this connection.
    pub(crate) flow: Mutex<PasswordFlow>,
}

impl Conn {
    /// The facts the authorization core decides on.
    pub(crate) fn facts(&self) -> ConnFacts<'_> {
        ConnFacts {
            fingerprint: &self.fingerprint,
            local: self.local,
            token: self.token.as_ref(),
        }
    }

    /// The user it was welcomed (or paired) as.
    pub(crate) fn user(&self) -> Option<String> {
        self.user.lock().ok().and_then(|u| u.clone())
    }

    /// Records the user this key now is.
    pub(crate) fn set_user(&self, user: Option<String>) {
        if let Ok(mut u) = self.user.lock() {
            *u = user;
        }
    }

    /// Closes the connection with the refusal's code.
    pub(crate) fn close(&self, refusal: authz::Refusal) {
        self.quic
            .close(refusal.code.to_varint(), refusal.reason.as_bytes());
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

/// The clock, read at the IO edge (the limiter and the pairing flow are pure).
pub(crate) fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// One consistent view of the policy, owned (so it can be held across awaits).
pub(crate) struct Snapshot {
    pub(crate) state: Arc<DeviceState>,
    pub(crate) iam: Arc<IamConfig>,
    pub(crate) config: Arc<DeviceConfig>,
}

impl Snapshot {
    /// The authorization core over this view.
    pub(crate) fn policy(&self) -> Policy<'_> {
        Policy::new(&self.state, &self.iam, &self.config)
    }
}

/// Logs a decision at debug (DESIGN §7) and returns whether it allows.
pub(crate) fn log_verdict(who: &Who<'_>, local: bool, verdict: &Verdict) -> bool {
    let attr = |name| {
        verdict
            .attrs
            .get(name)
            .map(ToString::to_string)
            .unwrap_or_default()
    };
    debug!(
        user = who.user.map_or("-", |u| u.username.as_str()),
        role = %who.role,
        action = %verdict.action,
        service = %attr(iam::attr::TUNNEL_SERVICE_ID),
        target = %attr(iam::attr::IAM_USERNAME),
        local,
        "iam: {}",
        verdict.decision
    );
    verdict.allowed
}

impl Live {
    /// The shared state of a device that starts with these files.
    pub(crate) fn new(
        home: DeviceHome,
        fingerprint: Fingerprint,
        config: DeviceConfig,
        state: DeviceState,
        iam: IamConfig,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store: home.state_store(),
            home,
            fingerprint,
            streams_total: Arc::new(Semaphore::new(
                usize::try_from(config.limits.max_streams_total).unwrap_or(usize::MAX),
            )),
            config: RwLock::new(Arc::new(config)),
            state: RwLock::new(Arc::new(state)),
            iam: RwLock::new(Arc::new(iam)),
            written: Mutex::new(None),
            limiter: Mutex::new(AttemptLimiter::new(LimiterConfig::default(), now())),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            shutdown,
            kill: CancellationToken::new(),
            tasks: TaskTracker::new(),
            streams: TaskTracker::new(),
        }
    }

    pub(crate) fn home(&self) -> &DeviceHome {
        &self.home
    }

    pub(crate) fn store(&self) -> &StateStore {
        &self.store
    }

    pub(crate) fn config(&self) -> Arc<DeviceConfig> {
        read(&self.config)
    }

    pub(crate) fn state(&self) -> Arc<DeviceState> {
        read(&self.state)
    }

    pub(crate) fn iam(&self) -> Arc<IamConfig> {
        read(&self.iam)
    }

    /// The current state, IAM and configuration, together.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            state: self.state(),
            iam: self.iam(),
            config: self.config(),
        }
    }

    pub(crate) fn set_config(&self, config: DeviceConfig) {
        write(&self.config, Arc::new(config));
    }

    pub(crate) fn set_state(&self, state: DeviceState) {
        write(&self.state, Arc::new(state));
    }

    pub(crate) fn set_iam(&self, iam: IamConfig) {
        write(&self.iam, Arc::new(iam));
    }

    /// The stamp of the state file as this device last wrote it.
    pub(crate) fn written(&self) -> Option<FileStamp> {
        self.written.lock().ok().and_then(|w| *w)
    }

    /// A fresh connection id.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn conns(&self) -> Vec<Arc<Conn>> {
        self.conns.lock().map_or_else(
            |p| p.into_inner().values().cloned().collect(),
            |g| g.values().cloned().collect(),
        )
    }

    /// Live connections of keys on no user.
    pub(crate) fn unpaired_count(&self) -> usize {
        self.conns()
            .iter()
            .filter(|c| c.user.lock().is_ok_and(|u| u.is_none()))
            .count()
    }

    /// Registers a connection past `Hello`, then re-checks it (a removal may have landed between
    /// its admission and now).
    pub(crate) fn register(&self, id: u64, conn: &Arc<Conn>) {
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(id, conn.clone());
        }
        self.enforce_one(conn);
    }

    pub(crate) fn unregister(&self, id: u64) {
        if let Ok(mut conns) = self.conns.lock() {
            conns.remove(&id);
        }
    }

    /// Applies `change` to `state.json` (locked read-modify-write, on a blocking thread), then
    /// adopts the new state and re-checks every connection. On error nothing changed.
    ///
    /// # Errors
    /// `change`'s error, a role the IAM does not define, or IO.
    pub(crate) async fn update_state<R: Send + 'static>(
        &self,
        change: impl FnOnce(&mut DeviceState) -> Result<R, StateError> + Send + 'static,
    ) -> Result<R, StateError> {
        let store = self.store.clone();
        let iam = self.iam();
        let result = tokio::task::spawn_blocking(move || {
            let out = store.update(|s| {
                let r = change(s)?;
                check_user_roles(&iam, s).map_err(Rejection::Role)?;
                Ok(r)
            });
            (out, FileStamp::of(store.path()))
        })
        .await;
        let (out, stamp) = result.map_err(|e| StateError::Io {
            path: self.store.path().to_owned(),
            source: std::io::Error::other(format!("the state update task failed: {e}")),
        })?;
        let (state, value) = out?;
        if let Ok(mut w) = self.written.lock() {
            *w = stamp;
        }
        self.set_state(state);
        self.enforce();
        Ok(value)
    }

    /// Re-checks every live connection and tunnel against the current state, IAM and config.
    pub(crate) fn enforce(&self) {
        let snap = self.snapshot();
        for conn in self.conns() {
            Self::apply(&snap.policy(), &conn);
        }
    }

    /// Re-checks one connection and its tunnels, as [`Live::enforce`] does for all.
    pub(crate) fn enforce_one(&self, conn: &Conn) {
        Self::apply(&self.snapshot().policy(), conn);
    }

    fn apply(policy: &Policy<'_>, conn: &Conn) {
        let tunnels: Vec<(u64, String)> = conn
            .tunnels
            .lock()
            .map(|t| t.iter().map(|(id, (svc, _))| (*id, svc.clone())).collect())
            .unwrap_or_default();
        let user = conn.user();
        let live = LiveConn {
            facts: conn.facts(),
            user: user.as_deref(),
            tunnels: &tunnels,
        };
        for action in policy.enforce(&live) {
            match action {
                Enforcement::Close(refusal) => {
                    let why = match refusal.code {
                        CloseCode::REVOKED => "access removed",
                        CloseCode::SCT_REJECTED => "server-connect token no longer valid",
                        CloseCode::REMOTE_DISABLED => "remote access switched off",
                        _ => "no longer allowed",
                    };
                    info!(
                        user = user.as_deref().unwrap_or("(unpaired)"),
                        peer = %conn.fingerprint.fmt_short(),
                        "{why}: closing the connection"
                    );
                    conn.close(refusal);
                }
                Enforcement::Adopt(name) => conn.set_user(Some(name)),
                Enforcement::Reset { tunnel, code } => {
                    let kill = conn
                        .tunnels
                        .lock()
                        .ok()
                        .and_then(|t| t.get(&tunnel).map(|(svc, k)| (svc.clone(), k.clone())));
                    if let Some((service, kill)) = kill {
                        if code == StreamCode::NO_SUCH_SERVICE {
                            info!(%service, "service removed: resetting its tunnel");
                        } else {
                            info!(%service, role = %policy.who(&conn.fingerprint).role, "access to the service removed: resetting the tunnel");
                        }
                        kill.kill(code);
                    }
                }
            }
        }
    }
}
