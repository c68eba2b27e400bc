//! Reaching a device through a relay: the client's leg, its `Connect` (device id and a proof of
//! its token, bound to this leg: the relay never sees the token), checked by the relay before
//! anything is forwarded, and the channel that carries the end-to-end connection behind a
//! virtual address of the client's endpoint.
//!
//! A relay may redirect the client to another relay of its fleet; the client follows only to a
//! relay it knows for the device (one the device itself named, over the end-to-end channel, or
//! one pinned by hand), at most [`relay::MAX_REDIRECTS`] times. Hole-punching candidates are
//! swapped with the device over the end-to-end connection ([`Channel::punch`]), never through
//! the relay.
//!
//! Kind: IO.
//!
//! The channel id is chosen here (random) and kept for the channel's life: when the leg drops
//! (the relay restarted, the network moved), the channel dials the relay again with the same id,
//! so the end-to-end connection keeps its address on both sides and survives if the leg comes
//! back within its idle timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::ConnectError;
use crate::config::{RelayRef, TransportSettings};
use crate::framed::{read_frame, write_frame};
use crate::proto::{Request, Response};
use crate::relay::{self, LegHello, Proof, RelayCode, RelayEvent};
use crate::secret::Secret;
use crate::transport::leg::{self, LegDial, LegPath};
use crate::transport::path::{PathState, Paths, RouteKey};
use crate::transport::punch;
use crate::transport::{self, Identity, RelayVia, TransportError};
use crate::wire::ControlClient;

/// The client's sockets: one endpoint for its connections to devices (direct, or relayed
/// behind virtual addresses) and one for its legs to relays.
#[derive(Debug, Clone)]
pub struct Dialer {
    /// The endpoint of device connections.
    pub endpoint: quinn::Endpoint,
    paths: Paths,
    legs: quinn::Endpoint,
}

impl Dialer {
    /// Binds both sockets on ephemeral ports.
    ///
    /// # Errors
    /// [`TransportError`] when a socket cannot be bound.
    pub fn new(settings: &TransportSettings) -> Result<Self, TransportError> {
        let (endpoint, paths) = transport::client_endpoint_with_paths(settings)?;
        let legs = transport::client_endpoint(settings)?;
        Ok(Self {
            endpoint,
            paths,
            legs,
        })
    }

    /// Closes both endpoints (code `NORMAL`) and waits, at most a second, for their connections
    /// to end.
    pub async fn close(&self) {
        let code = crate::proto::CloseCode::NORMAL.to_varint();
        self.endpoint.close(code, b"client exiting");
        self.legs.close(code, b"client exiting");
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            self.endpoint.wait_idle().await;
            self.legs.wait_idle().await;
        })
        .await;
    }
}

/// What a relayed connection needs to ask for its channel.
pub(crate) struct Ask<'a> {
    pub(crate) device: &'a str,
    pub(crate) device_id: &'a str,
    pub(crate) token: Option<&'a Secret>,
    pub(crate) identity: &'a Identity,
    pub(crate) settings: &'a TransportSettings,
    /// The relays known for the device: the only ones a redirect may lead to.
    pub(crate) relays: &'a [RelayRef],
}

/// An open channel: the virtual address to connect to, kept alive (and re-dialled) until
/// dropped.
#[derive(Debug)]
pub struct Channel {
    /// The virtual address the end-to-end connection uses.
    pub addr: SocketAddr,
    /// The relay it went through when opened (the one asked, or the one that relay redirected
    /// to).
    pub relay: RelayRef,
    key: RouteKey,
    paths: Paths,
    pump: JoinHandle<()>,
    punch: std::sync::Mutex<Option<JoinHandle<()>>>,
    over_tcp: Arc<AtomicBool>,
    /// This end's candidates (found through the relay, told only to the device).
    candidates: Vec<SocketAddr>,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.pump.abort();
        if let Ok(mut p) = self.punch.lock()
            && let Some(p) = p.take()
        {
            p.abort();
        }
        self.paths.unbind(self.key);
    }
}

impl Channel {
    /// Starts hole punching for `conn`, the end-to-end connection in this channel, named
    /// `device` in logs: it asks the device for a direct path on `control` (`Request::Punch`,
    /// this end's candidates for the device's), then probes until the connection or the channel
    /// ends. A device that refuses (the user may not tunnel, punching is off there) or does not
    /// know the request leaves the connection relayed.
    pub(crate) fn punch(
        &self,
        control: Arc<tokio::sync::Mutex<ControlClient>>,
        conn: &quinn::Connection,
        device: &str,
    ) {
        let (paths, addr, key, conn, device) = (
            self.paths.clone(),
            self.addr,
            self.key,
            conn.clone(),
            device.to_string(),
        );
        let ours = Request::Punch {
            candidates: self.candidates.clone(),
        };
        let task = tokio::spawn(async move {
            let answer = control.lock().await.call(&ours).await;
            let theirs = match answer {
                Ok(Some(Response::Punch { candidates })) => candidates,
                Ok(other) => {
                    debug!(%device, answer = ?other, "the device offers no direct path");
                    return;
                }
                Err(e) => {
                    debug!(%device, "asking for a direct path failed: {e}");
                    return;
                }
            };
            paths.set_candidates(key, &theirs);
            punch::drive(paths, addr, conn, quinn::Side::Client, device).await;
        });
        if let Ok(mut p) = self.punch.lock()
            && let Some(old) = p.replace(task)
        {
            old.abort();
        }
    }

    /// Whether its leg rides TCP now (UDP to the relay blocked or too small).
    pub fn over_tcp(&self) -> bool {
        self.over_tcp.load(Ordering::Relaxed)
    }

    /// The path the connection takes now (relayed, or direct to a punched address).
    pub fn state(&self) -> PathState {
        self.paths.state(self.addr).unwrap_or(PathState::Relayed)
    }
}

/// Dials `relay`, asks it for a channel to the device, and waits until the leg can carry inner
/// packets; follows redirects to relays known for the device.
async fn dial(
    dialer: &Dialer,
    req: &Ask<'_>,
    relay: &RelayRef,
    channel: u64,
) -> Result<Leg, ConnectError> {
    let mut at = relay.clone();
    for _ in 0..=relay::MAX_REDIRECTS {
        match dial_one(dialer, req, &at, channel).await? {
            Ok(leg) => return Ok(leg),
            Err(next) => {
                if !req.relays.iter().any(|r| r.fingerprint == next.fingerprint) {
                    return Err(ConnectError::Unreachable {
                        device: req.device.to_string(),
                        reason: format!(
                            "relay {} redirected to relay {} (key {}), which is not one of this \
                             device's relays; nothing was sent there. Connect once through a \
                             relay this client knows (the device then tells it all of its \
                             relays), or pair again with a pairing string that names it",
                            at.addr,
                            next.addr,
                            next.fingerprint.fmt_short()
                        ),
                    });
                }
                info!(from = %at.addr, to = %next.addr, "the relay sent this client to another relay of its fleet");
                at = next;
            }
        }
    }
    Err(ConnectError::Unreachable {
        device: req.device.to_string(),
        reason: format!(
            "via relay {}: more than {} redirects between relays",
            relay.addr,
            relay::MAX_REDIRECTS
        ),
    })
}

/// One relay: its leg and its answer, `Ok(Err(next))` when it redirects to another relay.
async fn dial_one(
    dialer: &Dialer,
    req: &Ask<'_>,
    relay: &RelayRef,
    channel: u64,
) -> Result<Result<Leg, RelayRef>, ConnectError> {
    let name = relay.addr.to_string();
    let failed = |reason: String| ConnectError::Unreachable {
        device: req.device.to_string(),
        reason: format!("via relay {name}: {reason}"),
    };
    let target = relay
        .addr
        .resolve()
        .await
        .map_err(|e| failed(e.to_string()))?
        .into_iter()
        .next()
        .ok_or_else(|| failed("no address".into()))?;
    let settings = req.settings;
    let dial = LegDial {
        udp: &dialer.legs,
        identity: req.identity,
        relay: relay.fingerprint,
        target,
        settings,
    };
    let mut via = settings.relay_via;
    // Why UDP was given up after it connected (then TCP is tried).
    let mut udp_too_small: Option<String> = None;
    loop {
        // The reflexive address of the socket that would carry a direct path, found while the
        // leg connects.
        let (connected, candidates) = tokio::join!(leg::connect(&dial, via), async {
            if settings.hole_punching {
                punch::own_candidates(&dialer.paths, target).await
            } else {
                Vec::new()
            }
        });
        let (conn, path) = connected.map_err(|e| match &udp_too_small {
            Some(mtu) => failed(format!("{mtu}; and over TCP: {e}")),
            None => failed(e.to_string()),
        })?;
        let (send, recv) = match ask(&conn, req, &name, channel).await? {
            Answer::Connected(send, recv) => (send, recv),
            Answer::Redirect(next) => return Ok(Err(next)),
        };
        match leg::wait_for_mtu(&conn).await {
            Ok(()) => {
                debug!(relay = %name, %path, "leg connected");
                return Ok(Ok(Leg {
                    conn,
                    _control: (send, recv),
                    candidates,
                    path,
                    at: relay.clone(),
                }));
            }
            // A UDP path too small for a full inner packet: the same leg over TCP.
            Err(e) if via == RelayVia::Auto && path == LegPath::Udp => {
                info!(relay = %name, "{e}; trying TCP");
                via = RelayVia::Tcp;
                udp_too_small = Some(e);
            }
            Err(e) => return Err(failed(e)),
        }
    }
}
/// A leg with its channel open: the connection, its control stream, and this end's candidate
/// addresses as found through it.
struct Leg {
    conn: quinn::Connection,
    /// The control stream, held open for the channel's life.
    _control: (quinn::SendStream, quinn::RecvStream),
    candidates: Vec<SocketAddr>,
    /// What the leg rides on.
    path: LegPath,
    /// The relay it reached (another than the one asked when that one redirected).
    at: RelayRef,
}

/// What a relay said to `Connect`.
enum Answer {
    /// The channel is open: the control stream.
    Connected(quinn::SendStream, quinn::RecvStream),
    /// The device is attached to this other relay of the fleet.
    Redirect(RelayRef),
}

/// Sends `Connect` (with a proof of the token, never the token) on the leg and reads the
/// relay's answer.
async fn ask(
    conn: &quinn::Connection,
    req: &Ask<'_>,
    name: &str,
    channel: u64,
) -> Result<Answer, ConnectError> {
    let failed = |reason: String| ConnectError::Unreachable {
        device: req.device.to_string(),
        reason: format!("via relay {name}: {reason}"),
    };
    let refused = |code| ConnectError::RelayRefused {
        device: req.device.to_string(),
        relay: name.to_string(),
        code,
    };
    let binding = leg::binding(conn, req.device_id, channel)
        .ok_or_else(|| failed("cannot derive the leg's channel binding".into()))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(e.to_string()))?;
    let hello = LegHello::Connect {
        version: relay::PROTOCOL_VERSION,
        device_id: req.device_id.to_string(),
        channel,
        proof: Proof::for_token(req.token, &binding),
    };
    write_frame(&mut send, &hello, relay::MAX_FRAME)
        .await
        .map_err(|e| failed(e.to_string()))?;
    match read_frame::<RelayEvent>(&mut recv, relay::MAX_FRAME).await {
        Ok(Some(RelayEvent::Connected { .. })) => Ok(Answer::Connected(send, recv)),
        Ok(Some(RelayEvent::Redirect { addr, fingerprint })) => match addr.parse() {
            Ok(addr) => Ok(Answer::Redirect(RelayRef { addr, fingerprint })),
            Err(e) => Err(failed(format!("the relay redirected to '{addr}': {e}"))),
        },
        Ok(Some(RelayEvent::Refused { code })) => Err(refused(code)),
        Ok(_) => Err(failed("unexpected answer".into())),
        Err(e) => Err(match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                refused(RelayCode::from_varint(c.error_code))
            }
            _ => failed(e.to_string()),
        }),
    }
}

/// Opens a channel to the device through `relay`.
///
/// # Errors
/// [`ConnectError::RelayRefused`] with the relay's code, or [`ConnectError::Unreachable`].
pub(crate) async fn open(
    dialer: &Dialer,
    req: &Ask<'_>,
    relay: &RelayRef,
) -> Result<Channel, ConnectError> {
    // Any id but the probe's.
    let channel = rand::random::<u64>() >> 1;
    let leg = dial(dialer, req, relay, channel).await?;
    let key = RouteKey {
        relay: relay.fingerprint,
        channel,
    };
    let addr = dialer
        .paths
        .bind(key, &leg.conn)
        .ok_or_else(|| ConnectError::Unreachable {
            device: req.device.to_string(),
            reason: "too many relayed channels in this process".into(),
        })?;
    let leg_datagram = leg.conn.max_datagram_size().unwrap_or(0);
    debug!(relay = %relay.addr, channel, %addr, leg_datagram, over = %leg.path, "relayed channel open");
    let redial = Redial {
        dialer: dialer.clone(),
        device: req.device.to_string(),
        device_id: req.device_id.to_string(),
        token: req.token.cloned(),
        identity: Arc::new(
            Identity::new(req.identity.secret_key().clone()).map_err(|e| {
                ConnectError::Unreachable {
                    device: req.device.to_string(),
                    reason: e.to_string(),
                }
            })?,
        ),
        settings: req.settings.clone(),
        relay: relay.clone(),
        relays: req.relays.to_vec(),
    };
    let over_tcp = Arc::new(AtomicBool::new(leg.path == LegPath::Tcp));
    let at = leg.at.clone();
    let candidates = leg.candidates.clone();
    let pump = tokio::spawn(pump(
        dialer.paths.clone(),
        key,
        addr,
        leg,
        redial,
        over_tcp.clone(),
    ));
    Ok(Channel {
        addr,
        over_tcp,
        relay: at,
        key,
        paths: dialer.paths.clone(),
        pump,
        punch: std::sync::Mutex::new(None),
        candidates,
    })
}

/// What re-dialling a leg takes.
struct Redial {
    dialer: Dialer,
    device: String,
    device_id: String,
    token: Option<Secret>,
    identity: Arc<Identity>,
    settings: TransportSettings,
    relay: RelayRef,
    relays: Vec<RelayRef>,
}

/// Carries the relay's datagrams for `key` to quinn; when the leg drops, dials again with the
/// same channel (until the channel is dropped, which aborts this task).
async fn pump(
    paths: Paths,
    key: RouteKey,
    addr: SocketAddr,
    mut leg: Leg,
    redial: Redial,
    over_tcp: Arc<AtomicBool>,
) {
    loop {
        over_tcp.store(leg.path == LegPath::Tcp, Ordering::Relaxed);
        let conn = leg.conn.clone();
        while let Ok(d) = conn.read_datagram().await {
            match relay::split_tag(&d) {
                Some((ch, _)) if ch == key.channel => {
                    paths.deliver(addr, d.slice(relay::TAG_LEN..));
                }
                _ => {}
            }
        }
        warn!(relay = %redial.relay.addr, "lost the relay leg; dialling it again");
        let mut backoff = Duration::from_millis(100);
        leg = loop {
            tokio::time::sleep(backoff).await;
            let req = Ask {
                device: &redial.device,
                device_id: &redial.device_id,
                token: redial.token.as_ref(),
                identity: &redial.identity,
                settings: &redial.settings,
                relays: &redial.relays,
            };
            match dial(&redial.dialer, &req, &redial.relay, key.channel).await {
                Ok(l) => break l,
                Err(e) if e.is_fatal() => {
                    warn!("the relay refused the channel again: {e}");
                    return;
                }
                Err(e) => {
                    debug!("re-dial failed: {e}");
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        if paths.bind(key, &leg.conn).is_none() {
            return;
        }
        info!(relay = %redial.relay.addr, "relay leg back; the connection continues");
    }
}
