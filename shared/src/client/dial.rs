//! Reaching a device: path selection and the connection handshake.
//!
//! Kind: IO.
//!
//! [`dial`] races the paths of a [`Target`]: its direct addresses first, in order, with a head
//! start of [`DIRECT_HEAD_START`], then its relays in parallel (at once when the direct path
//! fails), and keeps whichever completes. A wrong device key or a refusal by the device itself
//! ends every attempt. Each attempt authenticates both keys (the TLS verifier accepts only the
//! pinned fingerprint) and exchanges `Hello`/`Welcome`, giving a [`Session`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tracing::debug;

use super::relayed::{self, Dialer};
use super::session::{ConnectOptions, Session, SessionPath, connection_error, frame_error};
use super::{ConnectError, KnownDevice, Mismatch};
use crate::config::{HostPort, RelayRef};
use crate::identity::Fingerprint;
use crate::proto::{self, Hello};
use crate::sanitize::Sanitize;
use crate::secret::Secret;
use crate::transport::{self, Identity};
use crate::wire::ControlClient;

/// Where and how to reach a device.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// The device's local name (for messages).
    pub name: &'a str,
    /// Addresses, tried in order.
    pub addresses: &'a [HostPort],
    /// The pinned key, or `None` to trust the first key seen (pairing by address).
    pub pin: Option<Fingerprint>,
    /// Token for remote connections.
    pub sct: Option<&'a Secret>,
    /// Relays the device is attached to (used only with a pin and a device id).
    pub relays: &'a [RelayRef],
    /// The device's id (what a relay knows it by).
    pub device_id: Option<&'a str>,
}

impl<'a> From<&'a KnownDevice> for Target<'a> {
    fn from(d: &'a KnownDevice) -> Self {
        Self {
            name: &d.name,
            addresses: &d.addresses,
            pin: Some(d.fingerprint),
            sct: d.sct.as_ref(),
            relays: &d.relays,
            device_id: d.device_id.as_deref(),
        }
    }
}

/// How long the direct path gets before the relays are tried too.
pub const DIRECT_HEAD_START: Duration = Duration::from_millis(300);

/// Connects to `device`: tries each address in order, authenticates both keys, exchanges
/// `Hello`/`Welcome`.
///
/// # Errors
/// [`ConnectError`]; a fingerprint mismatch or refusal stops at once (no other address is tried).
pub async fn connect(
    dialer: &Dialer,
    identity: &Identity,
    device: &KnownDevice,
    opts: &ConnectOptions,
) -> Result<Session, ConnectError> {
    dial(dialer, identity, &Target::from(device), opts).await
}

/// Connects to `target` by whichever path completes first: its direct addresses (with a head
/// start of [`DIRECT_HEAD_START`]) or its relays (in parallel after that, or at once when the
/// direct path fails). A refusal by the device itself or a wrong device key ends every attempt:
/// another path would meet the same device.
///
/// # Errors
/// As [`connect`]; when every path fails, the errors of all of them.
pub async fn dial(
    dialer: &Dialer,
    identity: &Identity,
    target: &Target<'_>,
    opts: &ConnectOptions,
) -> Result<Session, ConnectError> {
    let relays: &[RelayRef] = match (target.pin, target.device_id) {
        (Some(_), Some(_)) => target.relays,
        _ => &[],
    };
    if relays.is_empty() {
        return connect_to(&dialer.endpoint, identity, target, opts).await;
    }
    let direct = async {
        if target.addresses.is_empty() {
            return Err(ConnectError::Unreachable {
                device: target.name.to_string(),
                reason: "no direct address".into(),
            });
        }
        connect_to(&dialer.endpoint, identity, target, opts).await
    };
    tokio::pin!(direct);
    let mut direct_error = None;
    // The head start: the direct path alone.
    tokio::select! {
        r = &mut direct => match r {
            Ok(s) => return Ok(s),
            Err(e) if decisive(&e) => return Err(e),
            Err(e) => direct_error = Some(e),
        },
        () = tokio::time::sleep(DIRECT_HEAD_START) => {}
    }
    let mut attempts = futures_unordered(
        relays
            .iter()
            .map(|r| dial_relayed(dialer, identity, target, r, opts)),
    );
    let mut failures = Vec::new();
    loop {
        tokio::select! {
            r = &mut direct, if direct_error.is_none() => match r {
                Ok(s) => return Ok(s),
                Err(e) if decisive(&e) => return Err(e),
                Err(e) => direct_error = Some(e),
            },
            r = attempts.join_next(), if !attempts.is_empty() => match r {
                Some(Ok(s)) => return Ok(s),
                Some(Err(e)) if matches!(e, ConnectError::FingerprintMismatch(_) | ConnectError::Refused { .. }) => return Err(e),
                Some(Err(e)) => failures.push(e),
                None => {}
            },
            else => break,
        }
        if direct_error.is_some() && attempts.is_empty() {
            break;
        }
    }
    // Every path failed: a relay's refusal says more than "unreachable".
    if let Some(e) = failures
        .iter()
        .position(|e| matches!(e, ConnectError::RelayRefused { .. }))
    {
        return Err(failures.swap_remove(e));
    }
    let mut reasons: Vec<String> = direct_error.into_iter().map(|e| reason(&e)).collect();
    reasons.extend(failures.iter().map(reason));
    Err(ConnectError::Unreachable {
        device: target.name.to_string(),
        reason: reasons.join("; "),
    })
}

/// A failure no other path can cure: the device's key is wrong, or the device refused us.
fn decisive(e: &ConnectError) -> bool {
    matches!(
        e,
        ConnectError::FingerprintMismatch(_)
            | ConnectError::Refused { .. }
            | ConnectError::Protocol { .. }
    )
}

fn reason(e: &ConnectError) -> String {
    match e {
        ConnectError::Unreachable { reason, .. } | ConnectError::Protocol { reason, .. } => {
            reason.clone()
        }
        other => other.to_string(),
    }
}

/// Runs the relayed attempts concurrently on the current task.
fn futures_unordered<F>(futs: impl Iterator<Item = F>) -> Attempts<F>
where
    F: Future<Output = Result<Session, ConnectError>>,
{
    Attempts {
        futs: futs.map(Box::pin).collect(),
    }
}

/// A small set of futures polled together, first result first (no spawning: they borrow).
struct Attempts<F> {
    futs: Vec<std::pin::Pin<Box<F>>>,
}

impl<F> Attempts<F>
where
    F: Future<Output = Result<Session, ConnectError>>,
{
    fn is_empty(&self) -> bool {
        self.futs.is_empty()
    }

    async fn join_next(&mut self) -> Option<Result<Session, ConnectError>> {
        if self.futs.is_empty() {
            return None;
        }
        Some(
            std::future::poll_fn(|cx| {
                for i in 0..self.futs.len() {
                    if let std::task::Poll::Ready(r) = self.futs[i].as_mut().poll(cx) {
                        drop(self.futs.swap_remove(i));
                        return std::task::Poll::Ready(r);
                    }
                }
                std::task::Poll::Pending
            })
            .await,
        )
    }
}

/// One relayed attempt: a channel through `relay`, then the end-to-end handshake in it.
async fn dial_relayed(
    dialer: &Dialer,
    identity: &Identity,
    target: &Target<'_>,
    relay: &RelayRef,
    opts: &ConnectOptions,
) -> Result<Session, ConnectError> {
    let req = relayed::Ask {
        device: target.name,
        device_id: target.device_id.unwrap_or_default(),
        token: target.sct,
        identity,
        settings: &opts.transport,
        relays: target.relays,
    };
    let channel = tokio::time::timeout(opts.timeout, relayed::open(dialer, &req, relay))
        .await
        .map_err(|_| ConnectError::Unreachable {
            device: target.name.to_string(),
            reason: format!(
                "via relay {}: no answer within {:?} over UDP or TCP (is the relay running, \
                 and its port open to this network? A relay leg also needs a path MTU of at \
                 least 1280 bytes)",
                relay.addr, opts.timeout
            ),
        })??;
    let mut session = connect_addr(
        &dialer.endpoint,
        identity,
        target,
        &relay.addr,
        channel.addr,
        opts,
        true,
    )
    .await?;
    session.path = SessionPath::Relayed {
        relay: channel.relay.addr.to_string(),
    };
    if opts.transport.hole_punching {
        channel.punch(session.control.clone(), &session.conn, target.name);
    }
    session.channel = Some(Arc::new(channel));
    Ok(session)
}

/// Connects directly to one of `target`'s addresses (no relays).
///
/// # Errors
/// As [`connect`].
pub async fn connect_to(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    target: &Target<'_>,
    opts: &ConnectOptions,
) -> Result<Session, ConnectError> {
    let mut failures = Vec::new();
    for hp in target.addresses {
        let addrs = match hp.resolve().await {
            Ok(a) => a,
            Err(e) => {
                failures.push(format!("{hp}: {e}"));
                continue;
            }
        };
        for addr in addrs {
            match connect_addr(endpoint, identity, target, hp, addr, opts, false).await {
                Ok(s) => return Ok(s),
                // A device that answered and refused, or broke the protocol, will not do better
                // at another address.
                Err(
                    e @ (ConnectError::FingerprintMismatch(_)
                    | ConnectError::Refused { .. }
                    | ConnectError::Protocol { .. }),
                ) => {
                    return Err(e);
                }
                Err(e) => {
                    debug!(%addr, "connect failed: {e}");
                    let reason = match e {
                        ConnectError::Unreachable { reason, .. }
                        | ConnectError::Protocol { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    failures.push(format!("{addr}: {reason}"));
                }
            }
        }
    }
    Err(ConnectError::Unreachable {
        device: target.name.to_string(),
        reason: failures.join("; "),
    })
}

/// One handshake with `addr`; `relayed` when `addr` is a relayed channel (whose packets must
/// fit in the leg's datagrams).
async fn connect_addr(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    target: &Target<'_>,
    hp: &HostPort,
    addr: std::net::SocketAddr,
    opts: &ConnectOptions,
    relayed: bool,
) -> Result<Session, ConnectError> {
    let name = target.name;
    let unreachable = |reason: String| ConnectError::Unreachable {
        device: name.to_string(),
        reason,
    };
    let (mut cfg, observed) =
        transport::client_config(identity, proto::ALPN, target.pin, &opts.transport)
            .map_err(|e| unreachable(e.to_string()))?;
    if relayed {
        // The leg may still be discovering its size: the inner connection probes up to the
        // largest leg, as the device's does.
        cfg.transport_config(Arc::new(transport::relayed_transport_config(
            &opts.transport,
            0,
        )));
    }
    let connecting = endpoint
        .connect_with(cfg, addr, transport::SERVER_NAME)
        .map_err(|e| unreachable(e.to_string()))?;
    let seen = || observed.lock().ok().and_then(|g| *g);
    let mismatch = || {
        let expected = target.pin?;
        seen().filter(|fp| *fp != expected).map(|actual| {
            ConnectError::FingerprintMismatch(Box::new(Mismatch {
                device: name.to_string(),
                addr: hp.clone(),
                expected,
                actual,
            }))
        })
    };
    let me = identity.fingerprint();
    let handshake = async {
        let conn = connecting
            .await
            .map_err(|e| mismatch().unwrap_or_else(|| connection_error(name, &e, Some(me))))?;
        let device_fingerprint = seen()
            .or(target.pin)
            .ok_or_else(|| unreachable("no device key seen".into()))?;
        let hello = Hello {
            version: proto::PROTOCOL_VERSION,
            sct: target.sct.cloned(),
            client_name: opts.client_name.clone(),
        };
        let (control, welcome) = ControlClient::hello(&conn, &hello)
            .await
            .map_err(|e| frame_error(name, &e, me))?;
        let mut welcome = welcome.ok_or_else(|| ConnectError::Protocol {
            device: name.to_string(),
            reason: "the device closed the control stream before welcome".into(),
        })?;
        welcome.sanitize();
        Ok(Session {
            conn,
            welcome,
            addr,
            host_port: hp.clone(),
            device_fingerprint,
            client_fingerprint: me,
            path: SessionPath::Direct,
            control: Arc::new(Mutex::new(control)),
            device: name.to_string(),
            channel: None,
        })
    };
    match tokio::time::timeout(opts.timeout, handshake).await {
        Ok(r) => r,
        Err(_) => Err(mismatch()
            .unwrap_or_else(|| unreachable(format!("no answer within {:?}", opts.timeout)))),
    }
}
