//! The running device's shared state: the current configuration, state and IAM (swapped whole on
//! every change), the registry of live connections and their tunnels, the limits, and the
//! application of [`crate::authz`] decisions (closing connections, resetting tunnels).
//!
//! Kind: IO (state writes on a blocking thread; closes QUIC connections).
//!
//! Every change goes through [`Live::update_state`] (locked, atomic) or a reload, and ends in
//! [`Live::enforce`]: the pure core says what no longer holds, this module does it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::conn::Conn;
use super::home::{DeviceHome, check_user_roles};
use crate::authz::{Enforcement, LiveConn, Policy, Verdict, Who};
use crate::config::DeviceConfig;
use crate::fsutil::FileStamp;
use crate::iam::{self, IamConfig};
use crate::identity::Fingerprint;
use crate::limits::{HandshakeGate, source_key};
use crate::pairing::{AttemptLimiter, LimiterConfig};
use crate::proto::{CloseCode, StreamCode};
use crate::relay::{Credential, TokenHash};
use crate::state::{DeviceState, Rejection, StateError, StateStore};
use crate::transport::path::RouteKey;

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
    /// Direct QUIC handshakes in flight, per source and in total.
    pub(crate) handshakes: Mutex<HandshakeGate>,
    /// Relayed QUIC handshakes in flight, per credential the relay admitted the channel with
    /// and in total, a quarter of the slots kept for owners' credentials: a gate of their own,
    /// so that relayed floods never take the direct path's slots (issue 18).
    pub(crate) relayed_handshakes: Mutex<HandshakeGate<Credential>>,
    /// What admitted each relayed channel, as its relay said when it opened.
    channel_credentials: Mutex<HashMap<RouteKey, Credential>>,
    /// Relayed channels on which a key paired with the token that opened the channel (an
    /// invitation's, which pairing replaces with the user's own): the relay keeps that token's
    /// hash (its credential, in `channel_credentials`) while the channel is open and the key is
    /// still a user's, so that its own success does not cut the pairing connection.
    handed_over: Mutex<HashMap<RouteKey, Fingerprint>>,
    /// The credentials of owners' tokens (recomputed at every change of state or IAM).
    owner_credentials: RwLock<Arc<HashSet<Credential>>>,
    /// This device's own hole-punching candidates, per relay it attached to (what it tells a
    /// client that may use them).
    own_candidates: Mutex<HashMap<Fingerprint, Vec<SocketAddr>>>,
    /// Handshakes refused by the gate since the last summary, and when that was logged.
    refused: Mutex<(u64, u64, Instant)>,
    /// Tunnel streams per user (pending headers included).
    user_streams: Mutex<HashMap<String, usize>>,
    /// Service names resolved for tunnels.
    pub(crate) resolver: super::resolve::Resolver,
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
    /// The identity provider's keys (`[jwt]`), if configured.
    jwt: RwLock<Option<Arc<crate::jwt::JwtVerifier>>>,
    /// Bumped at every change of the state (the relay legs upload new token hashes).
    state_version: tokio::sync::watch::Sender<u64>,
    /// Bumped at every change of the configuration (the relay legs follow `[[relay]]`).
    config_version: tokio::sync::watch::Sender<u64>,
    /// What the device counts (exported with `[metrics] listen`).
    pub(crate) metrics: super::metrics::DeviceMetrics,
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
pub(crate) fn now() -> Instant {
    Instant::now()
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
            written: Mutex::new(None),
            limiter: Mutex::new(AttemptLimiter::new(LimiterConfig::default(), now())),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            handshakes: Mutex::new(HandshakeGate::default()),
            relayed_handshakes: Mutex::new(HandshakeGate::default()),
            channel_credentials: Mutex::new(HashMap::new()),
            handed_over: Mutex::new(HashMap::new()),
            owner_credentials: RwLock::new(Arc::new(owner_credentials(&state, &iam))),
            own_candidates: Mutex::new(HashMap::new()),
            refused: Mutex::new((0, 0, now())),
            user_streams: Mutex::new(HashMap::new()),
            resolver: super::resolve::Resolver::default(),
            shutdown,
            kill: CancellationToken::new(),
            tasks: TaskTracker::new(),
            streams: TaskTracker::new(),
            jwt: RwLock::new(None),
            state_version: tokio::sync::watch::Sender::new(0),
            config_version: tokio::sync::watch::Sender::new(0),
            metrics: super::metrics::DeviceMetrics::default(),
            state: RwLock::new(Arc::new(state)),
            iam: RwLock::new(Arc::new(iam)),
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
        self.config_version.send_modify(|v| *v += 1);
    }

    pub(crate) fn set_state(&self, state: DeviceState) {
        write(
            &self.owner_credentials,
            Arc::new(owner_credentials(&state, &self.iam())),
        );
        write(&self.state, Arc::new(state));
        self.state_version.send_modify(|v| *v += 1);
    }

    /// Whether `credential` (a relayed channel's) is an owner's token.
    pub(crate) fn is_owner_credential(&self, credential: &Credential) -> bool {
        read(&self.owner_credentials).contains(credential)
    }

    /// Records what admitted a relayed channel (its relay's `ChannelOpened`).
    pub(crate) fn channel_opened(&self, key: RouteKey, credential: Credential) {
        if let Ok(mut m) = self.channel_credentials.lock() {
            if m.len() >= crate::transport::path::MAX_ROUTES {
                // A relay opening more channels than the socket holds routes: forget the
                // oldest guesses rather than grow (unknown channels get the strictest budget).
                m.clear();
            }
            m.insert(key, credential);
        }
    }

    /// Forgets a relayed channel (its relay's `ChannelClosed`).
    pub(crate) fn channel_closed(&self, key: RouteKey) {
        if let Ok(mut m) = self.channel_credentials.lock() {
            m.remove(&key);
        }
        let handed = self
            .handed_over
            .lock()
            .is_ok_and(|mut m| m.remove(&key).is_some());
        if handed {
            // The relays may forget the token it kept.
            self.state_version.send_modify(|v| *v += 1);
        }
    }

    /// Before `fingerprint` pairs on the relayed channel `key`: the token that opened the
    /// channel stays with its relay while the channel lasts and the key is a user's.
    pub(crate) fn pairing_on_channel(&self, key: RouteKey, fingerprint: Fingerprint) {
        if self.channel_credential(key).is_some()
            && let Ok(mut m) = self.handed_over.lock()
            && m.len() < crate::transport::path::MAX_ROUTES
        {
            m.insert(key, fingerprint);
        }
    }

    /// The token hashes of channels whose key paired on them and is a user's in `state`.
    pub(crate) fn handed_over_tokens(&self, state: &DeviceState) -> Vec<TokenHash> {
        let Ok(m) = self.handed_over.lock() else {
            return Vec::new();
        };
        m.iter()
            .filter(|(_, fp)| state.user_by_fingerprint(fp).is_some())
            .filter_map(|(key, _)| self.channel_credential(*key))
            .map(|c| TokenHash(c.0))
            .collect()
    }

    /// What admitted the relayed channel `key`, if its relay said.
    pub(crate) fn channel_credential(&self, key: RouteKey) -> Option<Credential> {
        self.channel_credentials.lock().ok()?.get(&key).copied()
    }

    /// Records this device's candidates as found toward `relay`.
    pub(crate) fn set_own_candidates(&self, relay: Fingerprint, candidates: Vec<SocketAddr>) {
        if let Ok(mut m) = self.own_candidates.lock() {
            m.insert(relay, candidates);
        }
    }

    /// This device's candidates toward `relay` (none before it attached, or with punching off).
    pub(crate) fn own_candidates(&self, relay: Fingerprint) -> Vec<SocketAddr> {
        self.own_candidates
            .lock()
            .ok()
            .and_then(|m| m.get(&relay).cloned())
            .unwrap_or_default()
    }

    /// The JWT verifier of `[jwt]`.
    pub(crate) fn jwt(&self) -> Option<Arc<crate::jwt::JwtVerifier>> {
        read(&self.jwt)
    }

    pub(crate) fn set_jwt(&self, jwt: Option<crate::jwt::JwtVerifier>) {
        write(&self.jwt, jwt.map(Arc::new));
    }

    /// Changes whenever the state changes.
    pub(crate) fn state_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.state_version.subscribe()
    }

    /// Changes whenever the configuration changes.
    pub(crate) fn config_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.config_version.subscribe()
    }

    pub(crate) fn set_iam(&self, iam: IamConfig) {
        write(
            &self.owner_credentials,
            Arc::new(owner_credentials(&self.state(), &iam)),
        );
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

    pub(crate) fn conns(&self) -> Vec<Arc<Conn>> {
        self.conns.lock().map_or_else(
            |p| p.into_inner().values().cloned().collect(),
            |g| g.values().cloned().collect(),
        )
    }

    /// Connections past `Hello` (the established-connection cap counts these only).
    pub(crate) fn established(&self) -> usize {
        self.conns.lock().map_or(0, |c| c.len())
    }

    /// Key exchanges started and not yet confirmed on connections from `source`'s address (an
    /// IPv4 address or an IPv6 /64).
    pub(crate) fn pakes_in_flight(&self, source: IpAddr) -> usize {
        let key = source_key(source);
        self.conns()
            .iter()
            .filter(|c| source_key(c.remote().ip()) == key)
            .filter(|c| c.flow.lock().is_ok_and(|f| f.is_pending()))
            .count()
    }

    /// Counts a handshake the gate turned away (retried or dropped) and logs a summary at most
    /// every 10 s, so a flood shows in the log without filling it.
    pub(crate) fn count_refused_handshake(&self, retried: bool) {
        let Ok(mut r) = self.refused.lock() else {
            return;
        };
        if retried {
            r.0 += 1;
        } else {
            r.1 += 1;
        }
        let t = now();
        if t.saturating_duration_since(r.2) >= Duration::from_secs(10) {
            warn!(
                retried = r.0,
                dropped = r.1,
                in_flight = self.handshakes.lock().map_or(0, |g| g.in_flight()),
                relayed_in_flight = self.relayed_handshakes.lock().map_or(0, |g| g.in_flight()),
                "many handshakes at once: sources asked to prove their address (QUIC Retry) or \
                 dropped at the per-source or total cap"
            );
            *r = (0, 0, t);
        }
    }

    /// Takes one of `user`'s tunnel slots (the per-user cap); `None` when they are all used.
    pub(crate) fn user_stream(self: &Arc<Self>, user: &str, cap: usize) -> Option<UserStream> {
        let mut map = self.user_streams.lock().ok()?;
        let n = map.entry(user.to_string()).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(UserStream {
            live: self.clone(),
            user: user.to_string(),
        })
    }

    /// Re-checks `conn` before it is served: its source address may have moved (QUIC migration)
    /// from a local to a remote network. Returns whether it may go on (false: it was closed).
    pub(crate) fn recheck(&self, conn: &Conn) -> bool {
        let snap = self.snapshot();
        if let Some(local) = conn.update_locality(&snap.config.network) {
            info!(
                remote = %conn.remote(),
                local,
                "the connection moved to another address: re-checking it as {}",
                if local { "local" } else { "remote" }
            );
            Self::apply(&snap.policy(), conn);
        }
        conn.quic.close_reason().is_none()
    }

    /// Live connections of `user` (over all its keys).
    pub(crate) fn user_connections(&self, user: &str) -> usize {
        self.conns()
            .iter()
            .filter(|c| c.user.lock().is_ok_and(|u| u.as_deref() == Some(user)))
            .count()
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
    /// adopts the new state, runs `adopt` on the result (a connection that just paired or rotated
    /// its token records its new user and token there), and re-checks every connection. On error
    /// nothing changed; a change that changes nothing writes nothing and re-checks nothing.
    ///
    /// # Errors
    /// `change`'s error, a role the IAM does not define, or IO.
    pub(crate) async fn update_state<R: Send + 'static>(
        &self,
        change: impl FnOnce(&mut DeviceState) -> Result<R, StateError> + Send + 'static,
        adopt: impl FnOnce(&R),
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
        let updated = out?;
        if updated.changed {
            if let Ok(mut w) = self.written.lock() {
                *w = stamp;
            }
            self.set_state(updated.state);
        }
        adopt(&updated.value);
        if updated.changed {
            self.enforce();
        }
        Ok(updated.value)
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
        conn.update_locality(&policy.config.network);
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

/// The credentials (token hashes) of the tokens of users with the owner role.
fn owner_credentials(state: &DeviceState, iam: &IamConfig) -> HashSet<Credential> {
    state
        .users
        .iter()
        .filter(|u| u.role == iam.initial_role)
        .map(|u| Credential::token(&TokenHash::of(&u.sct)))
        .collect()
}

/// One of a user's tunnel slots; given back when dropped.
pub(crate) struct UserStream {
    live: Arc<Live>,
    user: String,
}

impl Drop for UserStream {
    fn drop(&mut self) {
        if let Ok(mut map) = self.live.user_streams.lock()
            && let Some(n) = map.get_mut(&self.user)
        {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}
