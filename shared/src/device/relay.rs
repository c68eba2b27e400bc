//! The device's legs to its relays (`[[relay]]` in `device.toml`): attach, keep the NAT mapping
//! open, upload token hashes (owners' marked) whenever they change, learn which credential
//! opened each channel, carry relayed datagrams to and from the one server endpoint, and
//! reconnect with backoff. The device's own hole-punching candidates are found through each
//! leg's relay but never told to it: they go end to end, to clients that may tunnel
//! ([`super::control`], `Request::Punch`).
//!
//! Kind: IO.
//!
//! A relayed client arrives at the device's ordinary endpoint from a virtual address
//! ([`crate::transport::path`]), so the handshake, `Hello`, the token gate and IAM are exactly
//! those of a direct client, and the connection is remote (a relay is not trusted with access
//! decisions). The relay is pinned like a device: a leg to a relay with another key fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::live::Live;
use crate::config::{RelayAttach, RelayRef};
use crate::framed::{read_frame, write_frame};
use crate::identity::Fingerprint;
use crate::relay::{self, DeviceUpdate, LegHello, RelayCode, RelayEvent, TokenEntry, TokenHash};
use crate::state::DeviceState;
use crate::transport::leg::{self, LegDial, LegError, LegPath};
use crate::transport::path::{Paths, RouteKey};
use crate::transport::punch;
use crate::transport::{Identity, RelayVia};

/// One relay's state, as the ready file and the logs show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayStatus {
    /// The relay's address as configured.
    pub addr: String,
    /// `connecting`, `attached`, or `refused: …` / `failed: …` (retrying).
    pub state: String,
    /// This device's address as the relay sees it (once attached).
    pub observed: Option<SocketAddr>,
}

/// The relays' states, shared with the ready-file writer.
#[derive(Debug, Default)]
pub(crate) struct Statuses {
    map: Mutex<Vec<RelayStatus>>,
    changed: tokio::sync::Notify,
}

impl Statuses {
    fn set(&self, addr: &str, state: String, observed: Option<SocketAddr>) {
        if let Ok(mut m) = self.map.lock() {
            let s = RelayStatus {
                addr: addr.to_string(),
                state,
                observed,
            };
            match m.iter_mut().find(|r| r.addr == addr) {
                Some(r) if *r == s => return,
                Some(r) => *r = s,
                None => m.push(s),
            }
        }
        self.changed.notify_one();
    }

    fn remove(&self, addr: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.retain(|r| r.addr != addr);
        }
        self.changed.notify_one();
    }

    /// The states now.
    pub(crate) fn all(&self) -> Vec<RelayStatus> {
        self.map.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Resolves at the next change.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// Every token that may reach the device now, as its relays are told: each user's (marked
/// when the user has `owner_role`), and the open-pairing token while password open pairing is
/// on.
pub(crate) fn token_entries(state: &DeviceState, owner_role: &str) -> Vec<TokenEntry> {
    let mut v: Vec<TokenEntry> = state
        .users
        .iter()
        .map(|u| TokenEntry {
            hash: TokenHash::of(&u.sct),
            owner: u.role == owner_role,
        })
        .collect();
    if state.pairing.password_open {
        v.push(TokenEntry {
            hash: TokenHash::of(&state.pairing.open_sct),
            owner: false,
        });
    }
    v.sort_by_key(|e| e.hash.0);
    v
}

/// What the relay legs share.
pub(crate) struct Legs {
    pub(crate) live: Arc<Live>,
    pub(crate) identity: Arc<Identity>,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) paths: Paths,
    pub(crate) statuses: Arc<Statuses>,
}

/// Keeps one leg per `[[relay]]` of the current configuration, starting and stopping legs as
/// `device.toml` changes, until shutdown.
pub(crate) async fn supervise(legs: Arc<Legs>, mut config_changed: watch::Receiver<u64>) {
    let mut running: HashMap<(String, Fingerprint), CancellationToken> = HashMap::new();
    // With `relay_attach = "one"`: the list being worked through, and its task.
    let mut one: Option<(Vec<RelayRef>, CancellationToken)> = None;
    loop {
        let config = legs.live.config();
        let wanted: Vec<RelayRef> = config.relays.clone();
        let single = config.network.relay_attach == RelayAttach::One;
        if (!single || one.as_ref().is_some_and(|(list, _)| *list != wanted))
            && let Some((list, stop)) = one.take()
        {
            stop.cancel();
            for r in list {
                legs.statuses.remove(&r.addr.to_string());
            }
        }
        if single {
            for ((addr, _), stop) in running.drain() {
                stop.cancel();
                legs.statuses.remove(&addr);
            }
            if one.is_none() && !wanted.is_empty() {
                let stop = legs.live.shutdown.child_token();
                for r in &wanted {
                    legs.statuses
                        .set(&r.addr.to_string(), "standby".into(), None);
                }
                legs.live.tasks.spawn(keep_attached_one(
                    legs.clone(),
                    wanted.clone(),
                    stop.clone(),
                ));
                one = Some((wanted, stop));
            }
            tokio::select! {
                r = config_changed.changed() => if r.is_err() { return },
                () = legs.live.shutdown.cancelled() => return,
            }
            continue;
        }
        running.retain(|(addr, fp), stop| {
            let keep = wanted
                .iter()
                .any(|r| r.addr.to_string() == *addr && r.fingerprint == *fp);
            if !keep {
                stop.cancel();
                legs.statuses.remove(addr);
            }
            keep
        });
        for r in wanted {
            let key = (r.addr.to_string(), r.fingerprint);
            if running.contains_key(&key) {
                continue;
            }
            let stop = legs.live.shutdown.child_token();
            running.insert(key, stop.clone());
            legs.statuses
                .set(&r.addr.to_string(), "connecting".into(), None);
            let span = info_span!("relay", addr = %r.addr);
            legs.live
                .tasks
                .spawn(keep_attached(legs.clone(), r, stop).instrument(span));
        }
        tokio::select! {
            r = config_changed.changed() => if r.is_err() { return },
            () = legs.live.shutdown.cancelled() => return,
        }
    }
}

/// Attaches to `relay` and stays attached, reconnecting with backoff (200 ms doubling to 30 s,
/// with jitter) until `stop`.
async fn keep_attached(legs: Arc<Legs>, relay: RelayRef, stop: CancellationToken) {
    let addr = relay.addr.to_string();
    let mut backoff = Duration::from_millis(200);
    loop {
        let outcome = tokio::select! {
            r = attach_once(&legs, &relay, &addr) => r,
            () = stop.cancelled() => return,
        };
        let wait = match outcome {
            Ok(()) => {
                // It was attached: start over quickly.
                backoff = Duration::from_millis(200);
                backoff
            }
            Err(state) => {
                legs.statuses.set(&addr, state, None);
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                w
            }
        };
        let jitter = Duration::from_millis(rand::random::<u64>() % 200);
        tokio::select! {
            () = tokio::time::sleep(wait + jitter) => {}
            () = stop.cancelled() => return,
        }
        legs.statuses.set(&addr, "connecting".into(), None);
    }
}

/// Attaches to one of `relays` at a time, in list order: the first that works, and when its leg
/// is lost, the next (a relay that died is skipped at once; the fleet's registry tells clients
/// where the device went). A full round of failures backs off (200 ms doubling to 30 s).
async fn keep_attached_one(legs: Arc<Legs>, relays: Vec<RelayRef>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    for i in 0.. {
        let Some(relay) = relays.get(i % relays.len().max(1)) else {
            return;
        };
        let addr = relay.addr.to_string();
        legs.statuses.set(&addr, "connecting".into(), None);
        let span = info_span!("relay", addr = %relay.addr);
        let outcome = tokio::select! {
            r = attach_once(&legs, relay, &addr).instrument(span) => r,
            () = stop.cancelled() => return,
        };
        let wait = match outcome {
            Ok(()) => {
                backoff = Duration::from_millis(200);
                legs.statuses.set(&addr, "standby".into(), None);
                Duration::ZERO
            }
            Err(state) => {
                legs.statuses.set(&addr, state, None);
                if (i + 1) % relays.len() == 0 {
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    w
                } else {
                    Duration::ZERO
                }
            }
        };
        let jitter = Duration::from_millis(rand::random::<u64>() % 200);
        tokio::select! {
            () = tokio::time::sleep(wait + jitter) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// A leg that is attached: the connection, its control stream, what the relay sees of us, and
/// the token hashes uploaded.
struct Attached {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    observed: SocketAddr,
    tokens: Vec<TokenEntry>,
    target: SocketAddr,
    candidates: Vec<SocketAddr>,
    path: LegPath,
}

/// The tokens to upload now: [`token_entries`], and the tokens that opened channels on which
/// their key has since paired (see [`Live::pairing_on_channel`]).
fn current_tokens(live: &Live) -> Vec<TokenEntry> {
    let state = live.state();
    let mut v = token_entries(&state, &live.iam().initial_role);
    for hash in live.handed_over_tokens(&state) {
        if !v.iter().any(|e| e.hash == hash) {
            v.push(TokenEntry { hash, owner: false });
        }
    }
    v
}

/// How often the device checks its reflexive address (a NAT may move it).
const CANDIDATES_REFRESH: Duration = Duration::from_secs(60);

/// The device's candidates toward `relay` (none with hole punching off).
async fn candidates(legs: &Legs, relay: SocketAddr) -> Vec<SocketAddr> {
    if legs.live.config().transport.hole_punching {
        punch::own_candidates(&legs.paths, relay).await
    } else {
        Vec::new()
    }
}

/// Connects to `relay` (pinned) and attaches. `Err(state)` says why not.
async fn attach(
    legs: &Legs,
    relay: &RelayRef,
    addr: &str,
    via: RelayVia,
) -> Result<Attached, String> {
    let target = relay
        .addr
        .resolve()
        .await
        .map_err(|e| format!("failed: cannot resolve {addr}: {e}"))?
        .into_iter()
        .next()
        .ok_or_else(|| format!("failed: {addr} has no address"))?;
    let config = legs.live.config();
    let settings = &config.transport;
    let dial = LegDial {
        udp: &legs.endpoint,
        identity: &legs.identity,
        relay: relay.fingerprint,
        target,
        settings,
    };
    let (connected, candidates) = tokio::join!(leg::connect(&dial, via), candidates(legs, target));
    let (conn, path) = connected.map_err(|e| match e {
        LegError::WrongKey { actual, expected } => format!(
            "refused: the relay presented key {}, not the pinned {}; check the fingerprint in \
             device.toml",
            actual.fmt_short(),
            expected.fmt_short()
        ),
        LegError::Failed(e) => format!("failed: {e}"),
    })?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("failed: {e}"))?;
    let tokens = current_tokens(&legs.live);
    let hello = LegHello::Attach {
        version: relay::PROTOCOL_VERSION,
        device_id: config.device_id.clone(),
        tokens: tokens.clone(),
    };
    write_frame(&mut send, &hello, relay::MAX_FRAME)
        .await
        .map_err(|e| format!("failed: {e}"))?;
    match read_frame::<RelayEvent>(&mut recv, relay::MAX_FRAME).await {
        Ok(Some(RelayEvent::Attached { observed })) => Ok(Attached {
            conn,
            send,
            recv,
            observed,
            tokens,
            target,
            candidates,
            path,
        }),
        Ok(Some(RelayEvent::Refused { code })) => {
            warn!("the relay refused to attach this device: {code}");
            Err(format!("refused: {code}"))
        }
        Ok(_) => Err("failed: unexpected answer".into()),
        Err(e) => Err(format!("failed: {}", leg_error(&conn, &e.to_string()))),
    }
}

/// [`attach`], then the proof that the leg carries full inner packets; a UDP leg that does not
/// is attached again over TCP (with `relay_via = "auto"`).
async fn attach_checked(legs: &Legs, relay: &RelayRef, addr: &str) -> Result<Attached, String> {
    let mut via = legs.live.config().transport.relay_via;
    let mut udp_too_small: Option<String> = None;
    loop {
        let attached = attach(legs, relay, addr, via)
            .await
            .map_err(|e| match &udp_too_small {
                Some(mtu) => format!("{e} (over UDP: {mtu})"),
                None => e,
            })?;
        match leg::wait_for_mtu(&attached.conn).await {
            Ok(()) => return Ok(attached),
            Err(e) if via == RelayVia::Auto && attached.path == LegPath::Udp => {
                info!("{e}; attaching over TCP");
                via = RelayVia::Tcp;
                udp_too_small = Some(e);
            }
            Err(e) => return Err(format!("failed: {e}")),
        }
    }
}

/// One leg's life: connect, attach, serve until it ends. `Ok` when it was attached (and then
/// lost), `Err(state)` when it never got there.
async fn attach_once(legs: &Legs, relay: &RelayRef, addr: &str) -> Result<(), String> {
    let Attached {
        conn,
        mut send,
        recv,
        observed,
        mut tokens,
        target,
        candidates: mut announced,
        path,
    } = attach_checked(legs, relay, addr).await?;
    info!(%observed, candidates = ?announced, over = %path, "attached to the relay");
    legs.live
        .set_own_candidates(relay.fingerprint, announced.clone());
    let state = match path {
        LegPath::Udp => "attached",
        LegPath::Tcp => "attached over TCP",
    };
    legs.statuses.set(addr, state.into(), Some(observed));

    // The relay's later events on their own task: read_frame is not cancel safe, so it is never
    // raced against the others.
    let relay_fp = relay.fingerprint;
    let events = tokio::spawn(relay_events(
        legs.live.clone(),
        legs.paths.clone(),
        relay_fp,
        recv,
    ));
    let mut state_changed = legs.live.state_changed();
    let mut channels: HashMap<u64, SocketAddr> = HashMap::new();
    // The reflexive address is re-checked on its own task: a STUN round trip must not hold up
    // the datagrams.
    let (found_tx, mut found) = tokio::sync::mpsc::channel::<Vec<SocketAddr>>(1);
    let refresh = tokio::spawn(recheck_candidates(
        legs.paths.clone(),
        target,
        legs.live.config().transport.hole_punching,
        found_tx,
    ));
    loop {
        tokio::select! {
            Some(now) = found.recv() => {
                if !now.is_empty() && now != announced {
                    info!(candidates = ?now, "this device's addresses changed");
                    legs.live.set_own_candidates(relay_fp, now.clone());
                    announced = now;
                }
            }
            d = conn.read_datagram() => {
                let Ok(d) = d else { break };
                deliver(&legs.paths, &conn, relay_fp, &mut channels, d);
            }
            r = state_changed.changed() => {
                if r.is_err() { break }
                let now = current_tokens(&legs.live);
                if now != tokens {
                    debug!(tokens = now.len(), "uploading the new token hashes");
                    if write_frame(&mut send, &DeviceUpdate::Tokens(now.clone()), relay::MAX_FRAME)
                        .await
                        .is_err()
                    {
                        break;
                    }
                    tokens = now;
                }
            }
        }
    }
    events.abort();
    refresh.abort();
    let reason = leg_error(&conn, "leg ended");
    warn!("lost the relay: {reason}; reconnecting");
    Ok(())
}

/// The relay's events after the attach: channels that open (with what admitted them) and
/// close.
async fn relay_events(
    live: Arc<Live>,
    paths: Paths,
    relay: Fingerprint,
    mut recv: quinn::RecvStream,
) {
    while let Ok(Some(ev)) = read_frame::<RelayEvent>(&mut recv, relay::MAX_FRAME).await {
        match ev {
            RelayEvent::ChannelClosed { channel } => {
                debug!(channel, "relayed channel closed");
                let key = RouteKey { relay, channel };
                paths.unbind(key);
                live.channel_closed(key);
            }
            RelayEvent::ChannelOpened {
                channel,
                credential,
            } => {
                debug!(channel, ?credential, "relayed channel opened");
                live.channel_opened(RouteKey { relay, channel }, credential);
            }
            _ => {}
        }
    }
}

/// Every [`CANDIDATES_REFRESH`], finds the device's candidates again and hands them to `found`
/// (nothing with hole punching off).
async fn recheck_candidates(
    paths: Paths,
    relay: SocketAddr,
    punching: bool,
    found: tokio::sync::mpsc::Sender<Vec<SocketAddr>>,
) {
    if !punching {
        return;
    }
    let mut every = tokio::time::interval(CANDIDATES_REFRESH);
    every.tick().await;
    loop {
        every.tick().await;
        let now = punch::own_candidates(&paths, relay).await;
        if found.send(now).await.is_err() {
            return;
        }
    }
}

/// Hands a datagram from the relay to quinn as coming from its channel's virtual address
/// (bound on first sight: the relay forwards only channels it admitted).
fn deliver(
    paths: &Paths,
    leg: &quinn::Connection,
    relay: Fingerprint,
    channels: &mut HashMap<u64, SocketAddr>,
    datagram: bytes::Bytes,
) {
    let Some((channel, _)) = relay::split_tag(&datagram) else {
        return;
    };
    let addr = match channels.get(&channel) {
        Some(a) => *a,
        None => {
            if channels.len() >= 1024 {
                // Forget channels that closed meanwhile.
                channels.retain(|ch, _| {
                    paths
                        .addr_of(RouteKey {
                            relay,
                            channel: *ch,
                        })
                        .is_some()
                });
            }
            // First datagram of the channel on this leg: route its answers over this leg.
            let Some(a) = paths.bind(RouteKey { relay, channel }, leg) else {
                return;
            };
            channels.insert(channel, a);
            a
        }
    };
    paths.deliver(addr, datagram.slice(relay::TAG_LEN..));
}

fn leg_error(conn: &quinn::Connection, fallback: &str) -> String {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            RelayCode::from_varint(c.error_code).describe().to_string()
        }
        Some(e) => e.to_string(),
        None => fallback.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn token_hashes_cover_users_and_the_open_token_only_while_on() {
        let mut s = DeviceState::new_device();
        s.add_user("alice", "Standard", Fingerprint::from_bytes([1; 32]), None)
            .unwrap();
        s.add_user("olga", "Owner", Fingerprint::from_bytes([2; 32]), None)
            .unwrap();
        let alice = s.user("alice").unwrap().sct.clone();
        let olga = s.user("olga").unwrap().sct.clone();
        let open = s.pairing.open_sct.clone();
        s.pairing.password_open = false;
        let entries = token_entries(&s, "Owner");
        let h: Vec<TokenHash> = entries.iter().map(|e| e.hash).collect();
        assert!(TokenHash::of(&alice).is_in(&h));
        assert!(!TokenHash::of(&open).is_in(&h));
        assert!(!TokenHash::of(&Secret::new("guess")).is_in(&h));
        let owner = |t: &Secret| {
            entries
                .iter()
                .find(|e| e.hash == TokenHash::of(t))
                .unwrap()
                .owner
        };
        assert!(owner(&olga) && !owner(&alice));
        s.pairing.password_open = true;
        let entries = token_entries(&s, "Owner");
        assert!(
            entries
                .iter()
                .any(|e| e.hash == TokenHash::of(&open) && !e.owner)
        );
    }
}
