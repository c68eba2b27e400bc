//! One leg of the relay, from the handshake gate to the end: accept (Retry, caps), TLS, the
//! first frame, then a device's attachment or a client's channel, each checked in the order the
//! [`crate::server`] docs give.
//!
//! Kind: IO.
//!
//! A stranger learns nothing from a refusal it could not have caused: every refusal before a
//! valid credential counts against its source (and is refused `RATE_LIMITED` once the source's
//! budget is spent); an attach for an id the relay does not serve and one with the wrong key get
//! the same answer; a connect without a valid token is told `TOKEN_REJECTED` or
//! `DEVICE_OFFLINE` whether the device is attached or not (only a client that proved a token
//! learns that its device is offline).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};
use tunnel_core::identity::Fingerprint;
use tunnel_core::jwt;
use tunnel_core::limits::source_key;
use tunnel_core::relay::{
    self, Credential, DeviceUpdate, LegHello, MAX_FRAME, MAX_TOKENS, Proof, RelayCode, RelayEvent,
    TokenEntry,
};
use tunnel_core::transport::{self, tcp::StreamSocket};

use crate::config::RelayConfig;
use crate::hub::{
    ChannelCaps, ChannelInfo, ClientRoute, DeviceLeg, DeviceRoutes, Hub, OpenRefusal, Tokens,
};
use crate::server::{Relay, now, unix_now};

/// A handshake slot, given back when dropped.
struct Slot {
    relay: Arc<Relay>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut g) = self.relay.gate.lock() {
            g.end(&self.source, false);
        }
    }
}

/// A leg counted toward `max_legs`, given back when dropped.
struct LegSlot(Arc<Relay>);

impl Drop for LegSlot {
    fn drop(&mut self) {
        self.0.legs.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP leg's stream, claimed for the leg's QUIC connection and dropped with it (so a stream
/// outlives neither its deadline nor its leg).
struct Claimed {
    socket: Arc<StreamSocket>,
    peer: SocketAddr,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        self.socket.remove(self.peer);
    }
}

/// Accepts legs on `endpoint` until shutdown. `tcp` is the stream socket under the endpoint when
/// it serves TCP legs.
pub(crate) async fn accept_loop(
    relay: Arc<Relay>,
    endpoint: quinn::Endpoint,
    tcp: Option<Arc<StreamSocket>>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            () = relay.shutdown.cancelled() => return,
        };
        let limits = relay.config().limits.handshakes();
        let source = source_key(incoming.remote_address().ip());
        let validated = incoming.remote_address_validated();
        let incoming =
            match transport::screen(&relay.gate, incoming, source, validated, false, &limits) {
                Ok(incoming) => incoming,
                Err(gate) => {
                    if gate != tunnel_core::limits::Gate::Retry {
                        relay.metrics.handshake_failures.inc("gate_refused");
                    }
                    continue;
                }
            };
        let slot = Slot {
            relay: relay.clone(),
            source,
        };
        let id = relay.next_leg.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("leg", id, remote = %incoming.remote_address(), peer = tracing::field::Empty);
        relay
            .tasks
            .spawn(leg(relay.clone(), incoming, id, slot, tcp.clone()).instrument(span));
    }
}

/// Closes a leg with `code`, counted.
fn refuse(relay: &Relay, conn: &quinn::Connection, code: RelayCode) {
    relay.metrics.refusals.inc(code.label());
    conn.close(code.to_varint(), code.describe().as_bytes());
}

/// One leg: handshake, first frame, then a device's or a client's session.
async fn leg(
    relay: Arc<Relay>,
    incoming: quinn::Incoming,
    id: u64,
    slot: Slot,
    tcp: Option<Arc<StreamSocket>>,
) {
    let timeout = Duration::from_secs(relay.config().limits.handshake_timeout_secs);
    let conn = match incoming.accept() {
        Ok(c) => match tokio::time::timeout(timeout, c).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                relay.metrics.handshake_failures.inc("tls");
                return debug!("handshake failed: {e}");
            }
            Err(_) => {
                relay.metrics.handshake_failures.inc("timeout");
                return debug!("handshake timed out");
            }
        },
        Err(e) => {
            relay.metrics.handshake_failures.inc("refused");
            return debug!("handshake refused: {e}");
        }
    };
    // Over TCP: the stream carries this leg now, and goes with it.
    let _claimed = tcp.map(|socket| {
        let peer = conn.remote_address();
        socket.claim(peer);
        Claimed { socket, peer }
    });
    let Some(fingerprint) = transport::peer_fingerprint(&conn) else {
        return refuse(&relay, &conn, RelayCode::PROTOCOL);
    };
    tracing::Span::current().record("peer", tracing::field::display(fingerprint.fmt_short()));
    let max = usize::try_from(relay.config().limits.max_legs).unwrap_or(usize::MAX);
    if relay.legs.fetch_add(1, Ordering::Relaxed) >= max {
        relay.legs.fetch_sub(1, Ordering::Relaxed);
        info!(limit = max, "leg limit reached: refusing");
        return refuse(&relay, &conn, RelayCode::BUSY);
    }
    let _leg = LegSlot(relay.clone());
    let first = tokio::time::timeout(timeout, async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let hello: LegHello = tunnel_core::framed::read_frame(&mut recv, MAX_FRAME)
            .await
            .ok()??;
        Some((send, recv, hello))
    })
    .await;
    let Ok(Some((send, recv, hello))) = first else {
        debug!("no valid first frame");
        relay.failed(conn.remote_address().ip());
        return refuse(&relay, &conn, RelayCode::PROTOCOL);
    };
    // Past the first frame: the handshake slot is free again.
    drop(slot);
    let streams = Control { send, recv };
    match hello {
        LegHello::Attach {
            version,
            device_id,
            tokens,
        } if version == relay::PROTOCOL_VERSION => {
            serve_device(&relay, conn, fingerprint, id, streams, device_id, tokens).await;
        }
        LegHello::Connect {
            version,
            device_id,
            channel,
            proof,
        } if version == relay::PROTOCOL_VERSION => {
            let request = ConnectRequest {
                device_id,
                channel,
                proof,
            };
            serve_client(&relay, conn, fingerprint, streams, request).await;
        }
        _ => {
            relay.failed(conn.remote_address().ip());
            refuse(&relay, &conn, RelayCode::PROTOCOL);
        }
    }
}

/// A leg's control stream.
struct Control {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

async fn answer(send: &mut quinn::SendStream, event: &RelayEvent) -> bool {
    tunnel_core::framed::write_frame(send, event, MAX_FRAME)
        .await
        .is_ok()
}

async fn refuse_with(
    relay: &Relay,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: RelayCode,
) {
    // Counted before the peer hears of it.
    relay.metrics.refusals.inc(code.label());
    let _ = answer(send, &RelayEvent::Refused { code }).await;
    let _ = send.finish();
    // Give the answer a moment to leave before the close discards it.
    let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
    conn.close(code.to_varint(), code.describe().as_bytes());
}

/// [`refuse_with`] for a party that proved nothing: the refusal counts against its source.
async fn refuse_stranger(
    relay: &Relay,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: RelayCode,
) {
    relay.failed(conn.remote_address().ip());
    refuse_with(relay, conn, send, code).await;
}

/// What a client's `Connect` asked for.
struct ConnectRequest {
    device_id: String,
    channel: u64,
    proof: Proof,
}

async fn serve_device(
    relay: &Arc<Relay>,
    conn: quinn::Connection,
    fingerprint: Fingerprint,
    leg_id: u64,
    control: Control,
    device_id: String,
    tokens: Vec<TokenEntry>,
) {
    let Control { mut send, recv } = control;
    let source = conn.remote_address().ip();
    if !relay.may_try(source) {
        debug!(device = %device_id, "attach refused: too many failures from this source");
        return refuse_stranger(relay, &conn, &mut send, RelayCode::RATE_LIMITED).await;
    }
    if let Some(code) = attach_refusal(&relay.config(), &device_id, fingerprint, &tokens) {
        if code == RelayCode::UNKNOWN_DEVICE {
            relay.warn_attach(&device_id, fingerprint);
        } else {
            info!(device = %device_id, "refused an attach: {code}");
        }
        return refuse_stranger(relay, &conn, &mut send, code).await;
    }
    let Some(hub) = relay.hub_or_new(&device_id) else {
        return;
    };
    let (events, mut events_rx) = mpsc::channel(1024);
    let leg = DeviceLeg {
        id: leg_id,
        conn: conn.clone(),
        events,
    };
    let (old, revoked) = hub.attach(leg, tokens);
    if let Some(old) = old {
        old.conn.close(RelayCode::REPLACED.to_varint(), b"replaced");
    }
    close_revoked(relay, &hub, &revoked);
    if !answer(
        &mut send,
        &RelayEvent::Attached {
            observed: conn.remote_address(),
        },
    )
    .await
    {
        hub.detach(leg_id);
        return;
    }
    info!(device = %device_id, "device attached");
    announce(relay, &hub);
    relay
        .tasks
        .spawn(read_updates(relay.clone(), hub.clone(), conn.clone(), recv));
    let mut routes = DeviceRoutes::new();
    loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(d) => routes.forward(&hub, &conn, d, &relay.counters),
                Err(_) => break,
            },
            Some(ev) = events_rx.recv() => {
                if !answer(&mut send, &ev).await {
                    break;
                }
            }
            () = relay.shutdown.cancelled() => break,
        }
    }
    hub.detach(leg_id);
    if hub.device().is_none()
        && let Some(r) = relay.registry.clone()
    {
        let id = device_id.clone();
        relay.tasks.spawn(async move {
            if let Err(e) = r.withdraw(&id).await {
                debug!(device = %id, "cannot withdraw the device from the registry: {e}");
            }
        });
    }
    relay.forget_if_idle(&hub);
    info!(device = %device_id, reason = %close_reason(&conn), "device detached");
}

/// Why an attach is refused: an id `relay.toml` does not serve *with this key* (one answer for
/// both, so an attach is no way to learn which ids the relay serves), or too many tokens.
fn attach_refusal(
    config: &RelayConfig,
    device_id: &str,
    fingerprint: Fingerprint,
    tokens: &[TokenEntry],
) -> Option<RelayCode> {
    match config.device(device_id) {
        Some(d) if d.fingerprint == fingerprint => {
            (tokens.len() > MAX_TOKENS).then_some(RelayCode::PROTOCOL)
        }
        _ => Some(RelayCode::UNKNOWN_DEVICE),
    }
}

/// Closes the client legs of channels whose token the device no longer accepts.
fn close_revoked(relay: &Relay, hub: &Hub, revoked: &[quinn::Connection]) {
    if revoked.is_empty() {
        return;
    }
    info!(
        device = %hub.id,
        channels = revoked.len(),
        "the device no longer accepts the token of some channels: closing them"
    );
    for conn in revoked {
        refuse(relay, conn, RelayCode::TOKEN_REJECTED);
    }
}

/// Tells the fleet's registry (if any) that `hub`'s device is attached here, with its tokens;
/// on its own task, so a slow registry never holds up a leg.
fn announce(relay: &Arc<Relay>, hub: &Arc<Hub>) {
    let Some(r) = relay.registry.clone() else {
        return;
    };
    let hub = hub.clone();
    relay.tasks.spawn(async move {
        if let Err(e) = r.announce(&hub.id, &hub.tokens().entries).await {
            warn!(
                device = %hub.id,
                "cannot record the device in the fleet's registry ({e}); it is served here, but \
                 other relays cannot redirect clients to it"
            );
        }
    });
}

/// The device's later frames on its control stream: token updates, applied at once (channels
/// a removed token opened are closed).
async fn read_updates(
    relay: Arc<Relay>,
    hub: Arc<Hub>,
    conn: quinn::Connection,
    mut recv: quinn::RecvStream,
) {
    loop {
        match tunnel_core::framed::read_frame::<DeviceUpdate>(&mut recv, MAX_FRAME).await {
            Ok(Some(DeviceUpdate::Tokens(t))) if t.len() <= MAX_TOKENS => {
                debug!(tokens = t.len(), "tokens updated");
                let revoked = hub.set_tokens(t);
                close_revoked(&relay, &hub, &revoked);
                announce(&relay, &hub);
            }
            Ok(Some(DeviceUpdate::Tokens(_))) | Err(_) => {
                refuse(&relay, &conn, RelayCode::PROTOCOL);
                return;
            }
            Ok(None) => return,
        }
    }
}

fn close_reason(conn: &quinn::Connection) -> String {
    conn.close_reason()
        .map_or_else(|| "-".to_string(), |r| r.to_string())
}

/// What admitted a client's channel.
#[derive(Debug, Clone, Copy)]
struct Admitted {
    credential: Credential,
    owner: bool,
    /// For a JWT: when it expires (unix seconds); the channel ends then.
    jwt_expires: Option<u64>,
}

/// Checks `proof` for `device_id` on the leg of `binding`: a MAC against `tokens` (the hashes the
/// device uploaded; none known, nothing passes), or a JWT valid for the device.
fn check_proof(
    relay: &Relay,
    device_id: &str,
    tokens: Option<&Tokens>,
    proof: &Proof,
    binding: &[u8; 32],
) -> Option<Admitted> {
    match proof {
        Proof::None => None,
        Proof::Mac { key, mac } => tokens?.verify(*key, binding, mac).map(|e| Admitted {
            credential: Credential::token(&e.hash),
            owner: e.owner,
            jwt_expires: None,
        }),
        Proof::Jwt(token) if jwt::looks_like_jwt(token.expose()) => {
            let verifier = relay.jwt.read().ok().and_then(|j| j.clone())?;
            match verifier.verify(token.expose(), device_id, unix_now()) {
                Ok(claims) => Some(Admitted {
                    credential: Credential::jwt(
                        verifier.issuer(),
                        claims.subject.as_deref(),
                        token,
                    ),
                    owner: false,
                    jwt_expires: Some(claims.expires),
                }),
                Err(e) => {
                    info!(device = %device_id, "JWT refused: {e}");
                    None
                }
            }
        }
        Proof::Jwt(_) => None,
    }
}

/// A client asks for a device not attached here: with a fleet, the registry says where it is
/// (its entry signed by the relay it names); the proof is checked against the tokens there
/// before the client learns anything, then the client is sent to that relay. `Err` is the
/// refusal and whether it counts against the source.
async fn redirect(
    relay: &Relay,
    device_id: &str,
    proof: &Proof,
    binding: &[u8; 32],
) -> Result<RelayEvent, (RelayCode, bool)> {
    let Some(registry) = &relay.registry else {
        return Err((RelayCode::DEVICE_OFFLINE, true));
    };
    let entry = match registry.lookup(device_id).await {
        Ok(Some(e)) if e.relay != registry.me() => e,
        Ok(_) => {
            info!(device = %device_id, "connect refused: the device is not attached here or elsewhere in the fleet");
            return Err((RelayCode::DEVICE_OFFLINE, true));
        }
        Err(e) => {
            warn!(
                device = %device_id,
                "connect refused: the device is not attached here, and the fleet's registry \
                 cannot be asked where it is: {e}"
            );
            return Err((RelayCode::REGISTRY_UNAVAILABLE, false));
        }
    };
    let tokens = crate::hub::tokens_of(entry.tokens);
    if check_proof(relay, device_id, Some(&tokens), proof, binding).is_none() {
        info!(device = %device_id, "connect refused: token rejected (checked against the registry)");
        return Err((RelayCode::TOKEN_REJECTED, true));
    }
    info!(device = %device_id, to = %entry.addr, "client redirected to the relay the device is attached to");
    Ok(RelayEvent::Redirect {
        addr: entry.addr,
        fingerprint: entry.relay,
    })
}

async fn serve_client(
    relay: &Arc<Relay>,
    conn: quinn::Connection,
    fingerprint: Fingerprint,
    control: Control,
    request: ConnectRequest,
) {
    let Control { mut send, recv } = control;
    let ConnectRequest {
        device_id,
        channel,
        proof,
    } = request;
    let device_id = device_id.as_str();
    let source = conn.remote_address().ip();
    let config = relay.config();
    let limits = &config.limits;
    if !relay.may_try(source) {
        info!(device = %device_id, "connect refused: too many failures from this source");
        return refuse_stranger(relay, &conn, &mut send, RelayCode::RATE_LIMITED).await;
    }
    let binding = transport::leg::binding(&conn, device_id, channel);
    let (Some(binding), false) = (binding, channel == relay::PROBE_CHANNEL) else {
        return refuse_stranger(relay, &conn, &mut send, RelayCode::PROTOCOL).await;
    };
    let hub = config.device(device_id).and_then(|_| relay.hub(device_id));
    let tokens = hub.as_ref().map(|h| h.tokens()).filter(|t| !t.is_empty());
    let admitted = check_proof(relay, device_id, tokens.as_deref(), &proof, &binding);
    let attached = hub.filter(|h| h.device().is_some());
    let (Some(hub), Some(admitted)) = (attached, admitted) else {
        let known = tokens.is_some();
        let here = Here {
            served: config.device(device_id).is_some(),
            tokens_known: known,
            admitted,
        };
        return elsewhere(relay, &conn, &mut send, device_id, here, &proof, &binding).await;
    };
    let caps = ChannelCaps::from_limits(limits);
    if !relay.take_client_slot(fingerprint, limits.max_channels_per_client) {
        info!(device = %device_id, "connect refused: this key holds too many channels");
        return refuse_with(relay, &conn, &mut send, RelayCode::BUSY).await;
    }
    let info = ChannelInfo {
        conn: conn.clone(),
        credential: admitted.credential,
        owner: admitted.owner,
        jwt: admitted.jwt_expires.is_some(),
    };
    if let Err(why) = hub.open(channel, info, caps) {
        relay.give_client_slot(fingerprint);
        let code = match why {
            OpenRefusal::InUse => RelayCode::CHANNEL_IN_USE,
            OpenRefusal::Revoked => RelayCode::TOKEN_REJECTED,
            OpenRefusal::Busy => {
                info!(device = %device_id, owner = admitted.owner, "connect refused: channel limit reached");
                RelayCode::BUSY
            }
        };
        return refuse_with(relay, &conn, &mut send, code).await;
    }
    // The device hears which credential opened the channel before the client may send a packet.
    hub.opened(channel, admitted.credential);
    if answer(
        &mut send,
        &RelayEvent::Connected {
            observed: conn.remote_address(),
        },
    )
    .await
    {
        info!(device = %device_id, channel, "client connected");
        carry(relay, &hub, &conn, channel, recv, admitted.jwt_expires).await;
    }
    hub.close(channel);
    relay.give_client_slot(fingerprint);
    relay.forget_if_idle(&hub);
    info!(device = %device_id, channel, reason = %close_reason(&conn), "client disconnected");
}

/// What the relay knows here of a device a client asked for, when it cannot open the channel.
struct Here {
    /// `relay.toml` serves it.
    served: bool,
    /// Its token hashes are known (it attached since the relay started).
    tokens_known: bool,
    /// The client's proof, if it was valid.
    admitted: Option<Admitted>,
}

/// A connect this relay cannot serve: a wrong token (or an id not served) is refused
/// `TOKEN_REJECTED`, counted; a device attached elsewhere in the fleet gets the client
/// redirected; otherwise the device is offline (counted unless the client proved a token).
async fn elsewhere(
    relay: &Relay,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    device_id: &str,
    here: Here,
    proof: &Proof,
    binding: &[u8; 32],
) {
    if here.tokens_known && here.admitted.is_none() {
        info!(device = %device_id, "connect refused: token rejected");
        return refuse_stranger(relay, conn, send, RelayCode::TOKEN_REJECTED).await;
    }
    if !here.served {
        // No token is valid for a device this relay does not serve: the same answer as a
        // wrong token, so a stranger cannot tell which ids are served.
        info!(device = %device_id, "connect refused: no such device");
        return refuse_stranger(relay, conn, send, RelayCode::TOKEN_REJECTED).await;
    }
    match redirect(relay, device_id, proof, binding).await {
        Ok(to) => {
            if answer(send, &to).await {
                let _ = send.finish();
                // Let the answer reach the client before the leg closes.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            }
            relay.metrics.redirects.fetch_add(1, Ordering::Relaxed);
            conn.close(RelayCode::NORMAL.to_varint(), b"redirected");
        }
        Err((code, true)) if here.admitted.is_none() => {
            refuse_stranger(relay, conn, send, code).await;
        }
        Err((code, _)) => refuse_with(relay, conn, send, code).await,
    }
}

/// A client's channel until its leg ends: its datagrams to the device, its control stream
/// watched (nothing more may come on it: whatever does closes the leg, so a client cannot make
/// the relay buffer it), and a JWT's expiry.
async fn carry(
    relay: &Relay,
    hub: &Hub,
    conn: &quinn::Connection,
    channel: u64,
    mut recv: quinn::RecvStream,
    jwt_expires: Option<u64>,
) {
    let mut route = ClientRoute::new(channel, now());
    let expiry = jwt_expires.map(|exp| {
        let left = Duration::from_secs(exp.saturating_sub(unix_now()));
        tokio::time::Instant::now() + left
    });
    let mut watching = true;
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(d) => route.forward(hub, conn, d, &relay.counters, now()),
                Err(_) => return,
            },
            r = recv.read(&mut scratch), if watching => match r {
                Ok(Some(_)) => {
                    debug!("a frame after Connect: closing the leg");
                    return refuse(relay, conn, RelayCode::PROTOCOL);
                }
                // Finished or reset: nothing more can come.
                Ok(None) | Err(_) => watching = false,
            },
            () = sleep_until(expiry), if expiry.is_some() => {
                info!("the client's JWT expired: closing its channel");
                return refuse(relay, conn, RelayCode::TOKEN_REJECTED);
            }
            () = relay.shutdown.cancelled() => return,
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Attach refusals warned about recently (one warning per id, reason and minute).
#[derive(Debug, Default)]
pub(crate) struct AttachWarnings(Mutex<HashMap<String, Instant>>);

impl AttachWarnings {
    /// Whether to warn about `what` (an id and a reason) now (else log at debug).
    pub(crate) fn due(&self, what: &str, at: Instant) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return false;
        };
        if m.len() >= 1024 {
            m.retain(|_, t| at.saturating_duration_since(*t) < Duration::from_secs(60));
            if m.len() >= 1024 {
                m.clear();
            }
        }
        match m.get(what) {
            Some(t) if at.saturating_duration_since(*t) < Duration::from_secs(60) => false,
            _ => {
                m.insert(what.to_string(), at);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_core::relay::TokenHash;

    #[test]
    fn an_attach_tells_a_stranger_nothing() {
        let fp = |b| Fingerprint::from_bytes([b; 32]);
        let config = RelayConfig::from_toml(&format!(
            "[[device]]\nid = \"cam\"\nfingerprint = \"{}\"\n",
            fp(1)
        ))
        .unwrap();
        let none: [TokenEntry; 0] = [];
        assert_eq!(attach_refusal(&config, "cam", fp(1), &none), None);
        assert_eq!(
            attach_refusal(&config, "cam", fp(2), &none),
            Some(RelayCode::UNKNOWN_DEVICE),
            "a wrong key"
        );
        assert_eq!(
            attach_refusal(&config, "other", fp(2), &none),
            Some(RelayCode::UNKNOWN_DEVICE),
            "an id not served"
        );
        let many = vec![
            TokenEntry {
                hash: TokenHash([0; 32]),
                owner: false
            };
            MAX_TOKENS + 1
        ];
        assert_eq!(
            attach_refusal(&config, "cam", fp(1), &many),
            Some(RelayCode::PROTOCOL)
        );
    }

    #[test]
    fn attach_warnings_come_once_a_minute_per_id() {
        let w = AttachWarnings::default();
        let t = Instant::now();
        assert!(w.due("cam", t));
        assert!(!w.due("cam", t + Duration::from_secs(30)));
        assert!(w.due("cam2", t));
        assert!(w.due("cam", t + Duration::from_secs(61)));
    }
}
