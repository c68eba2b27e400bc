//! One leg of the relay, from the handshake gate to the end: accept (Retry, caps), TLS, the
//! first frame, then a device's attachment or a client's channel, each checked in the order the
//! [`crate::server`] docs give.
//!
//! Kind: IO.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};
use tunnel_core::identity::Fingerprint;
use tunnel_core::jwt;
use tunnel_core::relay::{
    self, DeviceUpdate, LegHello, MAX_CANDIDATES, MAX_FRAME, MAX_TOKENS, RelayCode, RelayEvent,
    TokenHash,
};
use tunnel_core::transport;

use crate::config::RelayConfig;
use crate::hub::{ClientRoute, DeviceLeg, DeviceRoutes, Hub};
use crate::server::{Relay, unix_now};

/// A handshake slot, given back when dropped.
struct Slot {
    relay: Arc<Relay>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut g) = self.relay.gate.lock() {
            g.end(self.source);
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

pub(crate) async fn accept_loop(relay: Arc<Relay>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            () = relay.shutdown.cancelled() => return,
        };
        let limits = relay.config().limits.handshakes();
        let source = incoming.remote_address().ip();
        let validated = incoming.remote_address_validated();
        let incoming = match transport::screen(&relay.gate, incoming, validated, &limits) {
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
            .spawn(leg(relay.clone(), incoming, id, slot).instrument(span));
    }
}

/// Closes a leg with `code`, counted.
fn refuse(relay: &Relay, conn: &quinn::Connection, code: RelayCode) {
    relay.metrics.refusals.inc(code.label());
    conn.close(code.to_varint(), code.describe().as_bytes());
}

/// One leg: handshake, first frame, then a device's or a client's session.
async fn leg(relay: Arc<Relay>, incoming: quinn::Incoming, id: u64, slot: Slot) {
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
        return refuse(&relay, &conn, RelayCode::PROTOCOL);
    };
    // Past the first frame: the handshake slot is free again.
    drop(slot);
    match hello {
        LegHello::Attach {
            version,
            device_id,
            tokens,
            candidates,
        } if version == relay::PROTOCOL_VERSION => {
            let attach = AttachRequest {
                device_id,
                tokens,
                candidates,
            };
            serve_device(&relay, conn, fingerprint, id, send, recv, attach).await;
        }
        LegHello::Connect {
            version,
            device_id,
            channel,
            token,
            candidates,
        } if version == relay::PROTOCOL_VERSION => {
            let request = ConnectRequest {
                device_id,
                channel,
                token,
                candidates,
            };
            serve_client(&relay, conn, fingerprint, send, request).await;
        }
        _ => refuse(&relay, &conn, RelayCode::PROTOCOL),
    }
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

/// What a device's `Attach` asked for.
struct AttachRequest {
    device_id: String,
    tokens: Vec<TokenHash>,
    candidates: Vec<SocketAddr>,
}

/// What a client's `Connect` asked for.
struct ConnectRequest {
    device_id: String,
    channel: u64,
    token: Option<tunnel_core::secret::Secret>,
    candidates: Vec<SocketAddr>,
}

async fn serve_device(
    relay: &Arc<Relay>,
    conn: quinn::Connection,
    fingerprint: Fingerprint,
    leg_id: u64,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    attach: AttachRequest,
) {
    let AttachRequest {
        device_id,
        tokens,
        candidates,
    } = attach;
    if let Some(code) = attach_refusal(
        &relay.config(),
        &device_id,
        fingerprint,
        &tokens,
        &candidates,
    ) {
        if code == RelayCode::WRONG_KEY {
            warn!(
                device = %device_id,
                "refused an attach: this key is not the one relay.toml has for the device id"
            );
        } else {
            info!(device = %device_id, "refused an attach: {code}");
        }
        return refuse_with(relay, &conn, &mut send, code).await;
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
    if let Some(old) = hub.attach(leg, tokens, candidates) {
        old.conn.close(RelayCode::REPLACED.to_varint(), b"replaced");
    }
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

/// Why an attach is refused: an id `relay.toml` does not serve, a key that is not the one it
/// names for the id, too many token hashes or candidates.
fn attach_refusal(
    config: &RelayConfig,
    device_id: &str,
    fingerprint: Fingerprint,
    tokens: &[TokenHash],
    candidates: &[SocketAddr],
) -> Option<RelayCode> {
    match config.device(device_id) {
        None => Some(RelayCode::UNKNOWN_DEVICE),
        Some(d) if d.fingerprint != fingerprint => Some(RelayCode::WRONG_KEY),
        Some(_) if tokens.len() > MAX_TOKENS || candidates.len() > MAX_CANDIDATES => {
            Some(RelayCode::PROTOCOL)
        }
        Some(_) => None,
    }
}

/// The device's later frames on its control stream: token updates, applied at once.
/// Tells the fleet's registry (if any) that `hub`'s device is attached here, with its tokens;
/// on its own task, so a slow registry never holds up a leg.
fn announce(relay: &Arc<Relay>, hub: &Arc<Hub>) {
    let Some(r) = relay.registry.clone() else {
        return;
    };
    let hub = hub.clone();
    relay.tasks.spawn(async move {
        if let Err(e) = r.announce(&hub.id, &hub.tokens()).await {
            warn!(
                device = %hub.id,
                "cannot record the device in the fleet's registry ({e}); it is served here, but \
                 other relays cannot redirect clients to it"
            );
        }
    });
}

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
                hub.set_tokens(t);
                announce(&relay, &hub);
            }
            Ok(Some(DeviceUpdate::Candidates(c))) if c.len() <= MAX_CANDIDATES => {
                debug!(candidates = ?c, "candidates updated");
                hub.set_candidates(c);
            }
            Ok(Some(DeviceUpdate::Tokens(_) | DeviceUpdate::Candidates(_))) | Err(_) => {
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

/// Whether `token` may reach `device_id`: its hash is one of `tokens` (what the device
/// uploaded), or it is a JWT valid for the device.
fn token_ok(
    relay: &Relay,
    device_id: &str,
    tokens: &[TokenHash],
    token: Option<&tunnel_core::secret::Secret>,
) -> bool {
    let Some(token) = token else {
        return false;
    };
    if jwt::looks_like_jwt(token.expose()) {
        let verifier = relay.jwt.read().ok().and_then(|j| j.clone());
        return match verifier {
            Some(v) => match v.verify(token.expose(), device_id, unix_now()) {
                Ok(_) => true,
                Err(e) => {
                    info!(device = %device_id, "JWT refused: {e}");
                    false
                }
            },
            None => false,
        };
    }
    TokenHash::of(token).is_in(tokens.iter())
}

/// A client asks for a device not attached here: with a fleet, the registry says where it is;
/// the token is checked against the hashes there before the client learns anything, then the
/// client is sent to that relay. `Err` is the refusal.
async fn redirect(
    relay: &Relay,
    device_id: &str,
    token: Option<&tunnel_core::secret::Secret>,
    source: IpAddr,
) -> Result<RelayEvent, RelayCode> {
    let Some(registry) = &relay.registry else {
        info!(device = %device_id, "connect refused: the device is not attached");
        return Err(RelayCode::DEVICE_OFFLINE);
    };
    let entry = match registry.lookup(device_id).await {
        Ok(Some(e)) if e.relay != registry.me() => e,
        Ok(_) => {
            info!(device = %device_id, "connect refused: the device is not attached here or elsewhere in the fleet");
            return Err(RelayCode::DEVICE_OFFLINE);
        }
        Err(e) => {
            warn!(
                device = %device_id,
                "connect refused: the device is not attached here, and the fleet's registry \
                 cannot be asked where it is: {e}"
            );
            return Err(RelayCode::REGISTRY_UNAVAILABLE);
        }
    };
    if !token_ok(relay, device_id, &entry.tokens, token) {
        relay.failed(source);
        info!(device = %device_id, "connect refused: token rejected (checked against the registry)");
        return Err(RelayCode::TOKEN_REJECTED);
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
    mut send: quinn::SendStream,
    request: ConnectRequest,
) {
    let ConnectRequest {
        device_id,
        channel,
        token,
        candidates,
    } = request;
    let (device_id, token) = (device_id.as_str(), token.as_ref());
    let source = conn.remote_address().ip();
    let config = relay.config();
    let limits = &config.limits;
    if channel == relay::PROBE_CHANNEL || candidates.len() > MAX_CANDIDATES {
        return refuse_with(relay, &conn, &mut send, RelayCode::PROTOCOL).await;
    }
    if !relay.may_try(source) {
        info!(device = %device_id, "connect refused: too many failures from this source");
        return refuse_with(relay, &conn, &mut send, RelayCode::RATE_LIMITED).await;
    }
    if config.device(device_id).is_none() {
        relay.failed(source);
        info!(device = %device_id, "connect refused: no such device");
        return refuse_with(relay, &conn, &mut send, RelayCode::UNKNOWN_DEVICE).await;
    }
    let Some(hub) = relay.hub(device_id).filter(|h| h.device().is_some()) else {
        match redirect(relay, device_id, token, source).await {
            Ok(to) => {
                if answer(&mut send, &to).await {
                    let _ = send.finish();
                    // Let the answer reach the client before the leg closes.
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                }
                relay.metrics.redirects.fetch_add(1, Ordering::Relaxed);
                conn.close(RelayCode::NORMAL.to_varint(), b"redirected");
            }
            Err(code) => refuse_with(relay, &conn, &mut send, code).await,
        }
        return;
    };
    if !token_ok(relay, device_id, &hub.tokens(), token) {
        relay.failed(source);
        info!(device = %device_id, presented = token.is_some(), "connect refused: token rejected");
        return refuse_with(relay, &conn, &mut send, RelayCode::TOKEN_REJECTED).await;
    }
    let per_device = usize::try_from(limits.max_channels_per_device).unwrap_or(usize::MAX);
    if hub.channel_count() >= per_device
        || !relay.take_client_slot(fingerprint, limits.max_channels_per_client)
    {
        info!(device = %device_id, "connect refused: channel limit reached");
        return refuse_with(relay, &conn, &mut send, RelayCode::BUSY).await;
    }
    if !hub.open(channel, &conn) {
        relay.give_client_slot(fingerprint);
        return refuse_with(relay, &conn, &mut send, RelayCode::CHANNEL_IN_USE).await;
    }
    // The device hears of the client's candidates before the client hears of the device's, so
    // both start probing at about the same time.
    hub.opened(channel, candidates);
    if answer(
        &mut send,
        &RelayEvent::Connected {
            observed: conn.remote_address(),
            peer: hub.candidates(),
        },
    )
    .await
    {
        info!(device = %device_id, channel, "client connected");
        let mut route = ClientRoute::new(channel);
        loop {
            tokio::select! {
                d = conn.read_datagram() => match d {
                    Ok(d) => route.forward(&hub, &conn, d, &relay.counters),
                    Err(_) => break,
                },
                () = relay.shutdown.cancelled() => break,
            }
        }
    }
    hub.close(channel);
    relay.give_client_slot(fingerprint);
    relay.forget_if_idle(&hub);
    info!(device = %device_id, channel, reason = %close_reason(&conn), "client disconnected");
}
