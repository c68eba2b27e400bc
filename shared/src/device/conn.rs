//! A client connection from the first packet to its end: the handshake gate (Retry under load,
//! caps per source and in total, [`crate::limits`]), the TLS handshake (client key proven,
//! [`crate::transport`]), `Hello`, the version check, local or remote, the admission decision of
//! [`crate::authz`] (remote access, token, key, connection caps), `Welcome`, then the control
//! stream and the tunnel streams until it closes.
//!
//! Kind: IO.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{Instrument, debug, info, info_span};

use super::live::{Live, now};
use super::{control, stream};
use crate::authz::{self, ConnFacts, Refusal};
use crate::config::{DeviceConfig, NetworkSettings};
use crate::identity::Fingerprint;
use crate::limits::{Gate, TokenBucket};
use crate::pairing::PasswordFlow;
use crate::proto::{self, CloseCode, Hello, Welcome};
use crate::relay::Credential;
use crate::secret::Secret;
use crate::splice::Kill;
use crate::transport::{self, path::Paths};
use crate::wire::ControlServer;

/// Longest client name kept (for logs); longer ones are cut.
pub(crate) const MAX_CLIENT_NAME: usize = 64;

/// State-changing requests a connection may make in a burst, and per second after it.
const WRITES_BURST: f64 = 10.0;
const WRITES_PER_SEC: f64 = 1.0;

/// One client connection past `Hello`.
pub(crate) struct Conn {
    /// The QUIC connection.
    pub(crate) quic: quinn::Connection,
    /// The key proven in the handshake.
    pub(crate) fingerprint: Fingerprint,
    /// Local or remote (DESIGN §6) as last computed from the current source address.
    local: AtomicBool,
    /// The token the connection holds: presented in `Hello`, or its user's own once it paired or
    /// rotated it here.
    token: Mutex<Option<Secret>>,
    /// Whether its `Hello` held a JWT valid for this device.
    jwt: bool,
    /// The user this key belongs to (set at hello, updated when it pairs).
    pub(crate) user: Mutex<Option<String>>,
    /// Open tunnels: id → (service, kill switch).
    pub(crate) tunnels: Mutex<HashMap<u64, (String, Arc<Kill>)>>,
    /// Password pairing in progress on this connection.
    pub(crate) flow: Mutex<PasswordFlow>,
    /// State-changing requests (writes of `state.json`) this connection may still make.
    writes: Mutex<TokenBucket>,
    /// The device's path socket, for a relayed connection (to tell a punched path).
    pub(crate) relayed: std::sync::OnceLock<Paths>,
    /// Whether hole punching runs for it (started by the client's first `Punch`).
    pub(crate) punching: AtomicBool,
}

impl Conn {
    /// Whether its `Hello` held a JWT valid for this device.
    pub(crate) fn admitted_by_jwt(&self) -> bool {
        self.jwt
    }

    fn new(
        quic: quinn::Connection,
        fingerprint: Fingerprint,
        local: bool,
        token: Option<Secret>,
        jwt: bool,
        now: Instant,
    ) -> Self {
        Self {
            quic,
            fingerprint,
            local: AtomicBool::new(local),
            token: Mutex::new(token),
            jwt,
            user: Mutex::new(None),
            tunnels: Mutex::new(HashMap::new()),
            flow: Mutex::new(PasswordFlow::default()),
            writes: Mutex::new(TokenBucket::new(WRITES_BURST, WRITES_PER_SEC, now)),
            relayed: std::sync::OnceLock::new(),
            punching: AtomicBool::new(false),
        }
    }

    /// `direct`, `relayed`, or `punched` (relayed at first, direct through NAT now).
    pub(crate) fn path_label(&self) -> &'static str {
        let remote = self.remote();
        if !transport::path::is_virtual(remote) {
            return "direct";
        }
        match self.relayed.get().and_then(|p| p.state(remote)) {
            Some(transport::path::PathState::Direct(_)) => "punched",
            _ => "relayed",
        }
    }

    /// Where its packets come from now (QUIC migration can change it).
    pub(crate) fn remote(&self) -> SocketAddr {
        self.quic.remote_address()
    }

    /// Recomputes local or remote from the current source address; `Some(local)` when it
    /// changed.
    pub(crate) fn update_locality(&self, network: &NetworkSettings) -> Option<bool> {
        let local = network.is_local(self.remote().ip());
        (self.local.swap(local, Ordering::Relaxed) != local).then_some(local)
    }

    /// The facts the authorization core decides on.
    pub(crate) fn facts(&self) -> ConnFacts<'_> {
        ConnFacts {
            fingerprint: &self.fingerprint,
            local: self.is_local(),
            token: self.token.lock().ok().and_then(|t| t.clone()),
            jwt: self.jwt,
        }
    }

    /// Whether it is local (as last computed).
    pub(crate) fn is_local(&self) -> bool {
        self.local.load(Ordering::Relaxed)
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

    /// Records the token the connection now holds (its user's own, after pairing or rotation).
    pub(crate) fn set_token(&self, token: Secret) {
        if let Ok(mut t) = self.token.lock() {
            *t = Some(token);
        }
    }

    /// Takes one state-changing request from its budget; `Err(wait)` when it is spent.
    pub(crate) fn take_write(&self, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.writes.lock().map_err(|_| Duration::from_secs(1))?;
        if bucket.try_take(now) {
            Ok(())
        } else {
            Err(bucket.wait(now))
        }
    }

    /// Lets it open as many tunnel streams as the limits allow (it starts with the control
    /// stream only, so a key on no user cannot open any).
    pub(crate) fn allow_tunnels(&self, max: u32) {
        self.quic
            .set_max_concurrent_bi_streams(quinn::VarInt::from_u32(max));
    }

    /// Closes the connection with the refusal's code.
    pub(crate) fn close(&self, refusal: Refusal) {
        self.quic
            .close(refusal.code.to_varint(), refusal.reason.as_bytes());
    }
}

/// A handshake slot of one of the gates, given back when dropped (the handshake ended one way
/// or another).
struct HandshakeSlot {
    live: Arc<Live>,
    source: Source,
}

/// What a handshake counts against: its address (direct), or the credential its relay admitted
/// the channel with (relayed), and whether that is an owner's.
#[derive(Clone, Copy)]
enum Source {
    Direct(IpAddr),
    Relayed(Credential, bool),
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        match self.source {
            Source::Direct(ip) => {
                if let Ok(mut g) = self.live.handshakes.lock() {
                    g.end(&ip, false);
                }
            }
            Source::Relayed(c, owner) => {
                if let Ok(mut g) = self.live.relayed_handshakes.lock() {
                    g.end(&c, owner);
                }
            }
        }
    }
}

/// The credential of a channel whose relay has not said what admitted it (its `ChannelOpened`
/// is still on the way): such channels share one budget.
const UNKNOWN_CREDENTIAL: Credential = Credential([0; 32]);

/// Screens a new connection with its gate: a direct one by its address, a relayed one by the
/// credential that opened its channel, with a quarter of the relayed slots kept for owners.
fn screen(
    live: &Live,
    incoming: quinn::Incoming,
    paths: Option<&Paths>,
) -> Result<(quinn::Incoming, Source), Gate> {
    let limits = live.config().limits.handshakes();
    let remote = incoming.remote_address();
    let validated = incoming.remote_address_validated();
    if !transport::path::is_virtual(remote) {
        let source = crate::limits::source_key(remote.ip());
        return transport::screen(
            &live.handshakes,
            incoming,
            source,
            validated,
            false,
            &limits,
        )
        .map(|i| (i, Source::Direct(source)));
    }
    let credential = paths
        .and_then(|p| p.key_of(remote))
        .and_then(|k| live.channel_credential(k))
        .unwrap_or(UNKNOWN_CREDENTIAL);
    let owner = live.is_owner_credential(&credential);
    let limits = crate::limits::HandshakeLimits {
        reserved: limits.total / 4,
        ..limits
    };
    transport::screen(
        &live.relayed_handshakes,
        incoming,
        credential,
        validated,
        owner,
        &limits,
    )
    .map(|i| (i, Source::Relayed(credential, owner)))
}

/// Accepts connections on `endpoint` until shutdown, each in its own task, after its handshake
/// gate ([`screen`]): a Retry for unproven sources under load, caps per source and in total.
///
/// A connection that arrives through a relay (from a virtual address) is accepted with
/// `relayed`, the server configuration whose packets fit in relay legs. Its address proves
/// nothing (the relay gives every channel one), so it counts against the credential that
/// opened its channel, in a gate of its own, and gets a Retry under load like a direct one.
pub(crate) async fn accept_loop(
    live: Arc<Live>,
    endpoint: quinn::Endpoint,
    relayed: Arc<quinn::ServerConfig>,
    paths: Option<Paths>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            () = live.shutdown.cancelled() => return,
        };
        let via_relay = transport::path::is_virtual(incoming.remote_address());
        let (incoming, source) = match screen(&live, incoming, paths.as_ref()) {
            Ok(screened) => screened,
            Err(gate) => {
                live.count_refused_handshake(gate == Gate::Retry);
                if gate != Gate::Retry {
                    live.metrics.handshake_failures.inc(if via_relay {
                        "relayed_gate_refused"
                    } else {
                        "gate_refused"
                    });
                }
                continue;
            }
        };
        let slot = HandshakeSlot {
            live: live.clone(),
            source,
        };
        let id = live.next_id();
        let span = info_span!("conn", id, remote = %incoming.remote_address(), peer = tracing::field::Empty);
        live.tasks.spawn(
            handle(
                live.clone(),
                incoming,
                via_relay.then(|| relayed.clone()),
                id,
                slot,
                paths.clone(),
            )
            .instrument(span),
        );
    }
}

/// Completes the handshake and `Hello` within the handshake timeout.
async fn handshake(
    incoming: quinn::Incoming,
    relayed: Option<Arc<quinn::ServerConfig>>,
    deadline: Duration,
    failures: &crate::metrics::Counts,
) -> Option<(quinn::Connection, Fingerprint, ControlServer, Hello)> {
    let accepted = match relayed {
        Some(cfg) => incoming.accept_with(cfg),
        None => incoming.accept(),
    };
    let connecting = match accepted {
        Ok(c) => c,
        Err(e) => {
            debug!("handshake refused: {e}");
            failures.inc("refused");
            return None;
        }
    };
    let conn = match tokio::time::timeout(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!("handshake failed: {e}");
            failures.inc("tls");
            return None;
        }
        Err(_) => {
            debug!("handshake timed out");
            failures.inc("timeout");
            return None;
        }
    };
    let Some(fingerprint) = transport::peer_fingerprint(&conn) else {
        failures.inc("no_key");
        conn.close(CloseCode::PROTOCOL.to_varint(), b"no client key");
        return None;
    };
    tracing::Span::current().record("peer", tracing::field::display(fingerprint.fmt_short()));
    match tokio::time::timeout(deadline, ControlServer::accept_hello(&conn)).await {
        Ok(Ok((control, hello))) => Some((conn, fingerprint, control, hello)),
        Ok(Err(e)) => {
            debug!("no valid hello: {e}");
            failures.inc("no_hello");
            conn.close(CloseCode::PROTOCOL.to_varint(), b"expected hello");
            None
        }
        Err(_) => {
            debug!("hello timed out");
            failures.inc("hello_timeout");
            conn.close(CloseCode::PROTOCOL.to_varint(), b"hello timeout");
            None
        }
    }
}

async fn handle(
    live: Arc<Live>,
    incoming: quinn::Incoming,
    relayed: Option<Arc<quinn::ServerConfig>>,
    id: u64,
    slot: HandshakeSlot,
    paths: Option<Paths>,
) {
    let remote = incoming.remote_address();
    let deadline = Duration::from_secs(live.config().limits.handshake_timeout_secs);
    let Some((quic, fingerprint, mut control, hello)) = handshake(
        incoming,
        relayed,
        deadline,
        &live.metrics.handshake_failures,
    )
    .await
    else {
        return;
    };
    let Some((conn, welcome, unpaired_timeout)) = admit(&live, &quic, fingerprint, remote, &hello)
    else {
        return;
    };
    if control.welcome(&welcome).await.is_err() {
        return;
    }
    // Past hello: the connection now counts toward the established-connection cap, not the
    // handshakes in flight.
    drop(slot);
    if welcome.user.is_some() {
        conn.allow_tunnels(live.config().limits.max_streams_per_connection);
    }
    info!(
        user = welcome.user.as_deref().unwrap_or("(unpaired)"),
        role = %welcome.role,
        local = welcome.local,
        path = if transport::path::is_virtual(remote) { "relayed" } else { "direct" },
        client = %client_name(&hello),
        "client connected"
    );
    if let Some(timeout) = unpaired_timeout {
        // Keys on no user can only pair: cap how long they may wait (how many may wait is
        // checked at admission).
        live.tasks.spawn(close_if_unpaired(conn.clone(), timeout));
    }
    live.register(id, &conn);
    live.metrics.sampler.observe(&quic);
    if let Some(p) = paths
        && transport::path::is_virtual(remote)
    {
        // Hole punching starts when the client asks for it (`Request::Punch`), if it may
        // tunnel on this connection.
        let _ = conn.relayed.set(p);
    }

    tokio::select! {
        r = control::serve(&live, &conn, control) => match r {
            Ok(()) => quic.close(CloseCode::NORMAL.to_varint(), b"bye"),
            Err(e) if e.connection_error().is_some() => {}
            Err(e) => {
                debug!("control stream failed: {e}");
                quic.close(CloseCode::PROTOCOL.to_varint(), b"control stream error");
            }
        },
        () = stream::accept_loop(&live, &conn) => {}
    }
    let reason = quic.closed().await;
    live.unregister(id);
    info!(
        user = conn.user().as_deref().unwrap_or("(unpaired)"),
        "client disconnected: {reason}"
    );
}

/// The version check and the admission decision; on success the connection, its `Welcome` and,
/// for an unpaired key, how long it may stay without pairing. A refusal closes the connection.
fn admit(
    live: &Live,
    quic: &quinn::Connection,
    fingerprint: Fingerprint,
    remote: SocketAddr,
    hello: &Hello,
) -> Option<(Arc<Conn>, Welcome, Option<Duration>)> {
    if hello.version != proto::PROTOCOL_VERSION {
        live.metrics.handshake_failures.inc("version");
        info!(
            client_version = hello.version,
            "incompatible client version"
        );
        quic.close(
            CloseCode::VERSION.to_varint(),
            format!("device speaks protocol {}", proto::PROTOCOL_VERSION).as_bytes(),
        );
        return None;
    }
    let snap = live.snapshot();
    let local = snap.config.network.is_local(remote.ip());
    // The token is kept even on a local connection: it is needed if the connection moves to a
    // remote address.
    let jwt = hello
        .sct
        .as_ref()
        .is_some_and(|t| jwt_valid(live, t, &snap.config.device_id));
    let conn = Arc::new(Conn::new(
        quic.clone(),
        fingerprint,
        local,
        hello.sct.clone(),
        jwt,
        now(),
    ));
    let policy = snap.policy();
    let load = authz::Load {
        established: live.established(),
        unpaired: live.unpaired_count(),
        of_user: policy
            .who(&fingerprint)
            .user
            .map_or(0, |u| live.user_connections(&u.username)),
    };
    let admitted = policy.admit(&conn.facts(), load);
    let who = match admitted {
        Ok(who) => who,
        Err(refusal) => {
            count_refusal(live, refusal, hello);
            log_refusal(refusal, hello, &conn, &snap.config);
            conn.close(refusal);
            return None;
        }
    };
    let welcome = Welcome {
        version: proto::PROTOCOL_VERSION,
        device_id: snap.config.device_id.clone(),
        device_name: snap.config.name.clone(),
        user: who.user.map(|u| u.username.clone()),
        role: who.role.to_string(),
        local,
    };
    conn.set_user(welcome.user.clone());
    let unpaired_timeout = welcome
        .user
        .is_none()
        .then(|| Duration::from_secs(snap.config.limits.unpaired_timeout_secs));
    Some((conn, welcome, unpaired_timeout))
}

/// Whether `token` is a JWT of the device's identity provider valid for it now (`[jwt]` in
/// `device.toml`); why not is logged.
fn jwt_valid(live: &Live, token: &Secret, device_id: &str) -> bool {
    if !crate::jwt::looks_like_jwt(token.expose()) {
        return false;
    }
    let Some(verifier) = live.jwt() else {
        debug!("a JWT was presented, but device.toml has no [jwt]");
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match verifier.verify(token.expose(), device_id, now) {
        Ok(claims) => {
            debug!(
                subject = claims.subject.as_deref().unwrap_or("-"),
                "valid JWT"
            );
            true
        }
        Err(e) => {
            info!("refused a JWT: {e}");
            false
        }
    }
}

/// Counts an admission refusal by reason: token refusals apart from the others.
fn count_refusal(live: &Live, refusal: Refusal, hello: &Hello) {
    let m = &live.metrics;
    match refusal.code {
        CloseCode::SCT_REJECTED => m.token_failures.inc(match &hello.sct {
            None => "missing",
            Some(t) if crate::jwt::looks_like_jwt(t.expose()) => "jwt_invalid",
            Some(_) => "invalid",
        }),
        CloseCode::REMOTE_DISABLED => m.handshake_failures.inc("remote_disabled"),
        CloseCode::UNKNOWN_KEY => m.handshake_failures.inc("unknown_key"),
        _ if refusal.reason == authz::TOO_MANY_CONNECTIONS => {
            m.handshake_failures.inc("connection_limit");
        }
        _ if refusal.reason == authz::TOO_MANY_OF_USER => {
            m.handshake_failures.inc("user_connection_limit");
        }
        _ => m.handshake_failures.inc("unpaired_limit"),
    }
}

fn log_refusal(refusal: Refusal, hello: &Hello, conn: &Conn, config: &DeviceConfig) {
    let fingerprint = conn.fingerprint;
    match refusal.code {
        CloseCode::REMOTE_DISABLED => {
            info!("refused a remote connection: remote_access is off");
        }
        CloseCode::SCT_REJECTED => info!(
            presented = hello.sct.is_some(),
            "refused a remote connection without a valid server-connect token"
        ),
        CloseCode::UNKNOWN_KEY => info!(
            fingerprint = %fingerprint,
            client = %client_name(hello),
            local = conn.is_local(),
            "refused a client key that is on no user, with no pairing mode usable (add it with \
             `tunnel-device user add NAME --fingerprint {fingerprint}` or invite it)"
        ),
        _ if refusal.reason == authz::TOO_MANY_CONNECTIONS => info!(
            limit = config.limits.max_connections,
            owners_only = config.limits.owner_reserve(),
            "connection limit reached (the last slots are kept for owners): refusing"
        ),
        _ if refusal.reason == authz::TOO_MANY_OF_USER => info!(
            limit = config.limits.max_connections_per_user,
            "this user's connection limit reached: refusing"
        ),
        _ => info!(
            limit = config.limits.max_unpaired_connections,
            "too many connections of unpaired keys: refusing"
        ),
    }
}

/// The client's self-chosen name, for logs only: cut to [`MAX_CLIENT_NAME`] characters and with
/// control characters escaped, so a peer cannot forge log lines or flood the log.
fn client_name(hello: &Hello) -> String {
    hello.client_name.as_deref().map_or_else(
        || "-".to_string(),
        |n| {
            crate::sanitize::text(&n.chars().take(MAX_CLIENT_NAME).collect::<String>()).into_owned()
        },
    )
}

async fn close_if_unpaired(conn: Arc<Conn>, timeout: Duration) {
    tokio::select! {
        () = tokio::time::sleep(timeout) => {
            if conn.user().is_none() {
                info!("an unpaired key did not pair in {timeout:?}: closing");
                conn.quic.close(CloseCode::PROTOCOL.to_varint(), b"pairing timeout");
            }
        }
        _ = conn.quic.closed() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9: a 65,000-character client name was logged whole, raw.
    #[test]
    fn client_names_are_cut_and_escaped_for_logs() {
        let hello = |name: Option<String>| Hello {
            version: 1,
            sct: None,
            client_name: name,
        };
        let long = client_name(&hello(Some("x".repeat(65_000))));
        assert_eq!(long.chars().count(), MAX_CLIENT_NAME);
        let evil = client_name(&hello(Some("\x1b[2Jlaptop\n".into())));
        assert_eq!(evil, "\\u{1b}[2Jlaptop\\u{a}");
        assert_eq!(client_name(&hello(None)), "-");
    }
}
