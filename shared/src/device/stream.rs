//! Tunnel streams: header, `Tunnel:Connect` against the current policy, TCP connect to the
//! service's target, splice; and the self-test probe of every service.
//!
//! Kind: IO.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{Instrument, debug, info, info_span, warn};

use super::conn::Conn;
use super::live::{Live, log_verdict};
use super::resolve::Resolver;
use crate::config::{DeviceConfig, ServiceConfig};
use crate::proto::{StreamCode, StreamOpen};
use crate::splice::{self, Kill};
use crate::wire;

/// Accepts tunnel streams of `conn` until it closes or the device shuts down (then new streams
/// are refused with [`StreamCode::SHUTDOWN`] while live ones drain).
pub(crate) async fn accept_loop(live: &Arc<Live>, conn: &Arc<Conn>) {
    let mut next = 0u64;
    loop {
        let (send, recv) = tokio::select! {
            s = conn.quic.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            () = live.shutdown.cancelled() => {
                // Keep the connection until the drain ends, but take no new tunnels.
                refuse_all(live, &conn.quic).await;
                return;
            }
        };
        next += 1;
        let span = info_span!("stream", n = next);
        live.streams
            .spawn(handle(live.clone(), conn.clone(), next, send, recv).instrument(span));
    }
}

async fn refuse_all(live: &Live, quic: &quinn::Connection) {
    while let Ok((mut send, mut recv)) = quic.accept_bi().await {
        reject(live, &mut send, &mut recv, StreamCode::SHUTDOWN);
    }
}

/// Resets a tunnel stream with `code`, counted.
fn reject(
    live: &Live,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    code: StreamCode,
) {
    live.metrics.reset_sent(code);
    splice::reject_stream(send, recv, code);
}

/// Reads the header within `deadline`; `None` (stream already reset) when there is none.
async fn read_header(
    live: &Live,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    deadline: Duration,
) -> Option<String> {
    match tokio::time::timeout(deadline, wire::read_tunnel_header(recv)).await {
        Ok(Ok(Some(StreamOpen::Tunnel { service }))) => Some(service),
        outcome => {
            match outcome {
                Ok(Ok(None)) => debug!("stream ended before its header"),
                Ok(Err(e)) => debug!("bad stream header: {e}"),
                _ => debug!("stream header timed out"),
            }
            reject(live, send, recv, StreamCode::BAD_HEADER);
            None
        }
    }
}

async fn handle(
    live: Arc<Live>,
    conn: Arc<Conn>,
    n: u64,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let limits = live.config().limits.clone();
    // Every stream counts against its user's cap from the moment it opens, header or not, so
    // one key cannot hold thousands of silent streams; unpaired keys get no tunnel streams at all
    // (QUIC stream credit).
    let user = conn.user().unwrap_or_default();
    let Some(_user_slot) = live.user_stream(&user, limits.max_streams_per_user as usize) else {
        debug!(%user, "per-user tunnel limit reached: refusing a tunnel");
        reject(&live, &mut send, &mut recv, StreamCode::LIMIT_REACHED);
        return;
    };
    let deadline = Duration::from_secs(limits.header_timeout_secs);
    let Some(service_id) = read_header(&live, &mut send, &mut recv, deadline).await else {
        return;
    };
    // Its address may have moved since the connection was admitted.
    if !live.recheck(&conn) {
        reject(&live, &mut send, &mut recv, StreamCode::FORBIDDEN);
        return;
    }

    // Re-authorize against the current state, IAM and services on every stream.
    let (service, user) = match authorize(&live, &conn, &service_id) {
        Ok(ok) => ok,
        Err(code) => {
            reject(&live, &mut send, &mut recv, code);
            return;
        }
    };
    // Only an authorized tunnel takes one of the device-wide permits.
    let Ok(_permit) = live.streams_total.clone().try_acquire_owned() else {
        warn!("device-wide tunnel limit reached: refusing a tunnel");
        reject(&live, &mut send, &mut recv, StreamCode::LIMIT_REACHED);
        return;
    };

    let target = service.target();
    let connect_timeout = Duration::from_secs(limits.connect_timeout_secs);
    let tcp = match tokio::time::timeout(connect_timeout, live.resolver.connect(&target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            warn!(service = %service_id, target = %target, "cannot reach the service: {e}");
            reject(&live, &mut send, &mut recv, StreamCode::TARGET_UNREACHABLE);
            return;
        }
        Err(_) => {
            warn!(service = %service_id, target = %target, "cannot reach the service: timed out after {connect_timeout:?}");
            reject(&live, &mut send, &mut recv, StreamCode::TARGET_UNREACHABLE);
            return;
        }
    };
    let kill = Arc::new(Kill::child_of(&live.kill));
    if let Ok(mut tunnels) = conn.tunnels.lock() {
        tunnels.insert(n, (service_id.clone(), kill.clone()));
    }
    // A revocation may have landed while we connected, before this tunnel was registered (and so
    // seen by `enforce`): check this one tunnel again now that it is.
    if live
        .snapshot()
        .policy()
        .tunnel(&conn.facts(), &service_id)
        .0
        .is_err()
    {
        info!(%user, service = %service_id, "access changed while connecting: resetting the tunnel");
        kill.kill(StreamCode::FORBIDDEN);
    }
    debug!(%user, service = %service_id, "tunnel open");
    let counted = live.metrics.tunnel_opened(&service_id, &user);
    let result = splice::splice(tcp, send, recv, &kill, Some(&counted.0.bytes)).await;
    drop(counted);
    if let Ok(mut tunnels) = conn.tunnels.lock() {
        tunnels.remove(&n);
    }
    match result {
        Ok(stats) => debug!(
            service = %service_id,
            to_service = stats.quic_to_tcp,
            from_service = stats.tcp_to_quic,
            "tunnel closed"
        ),
        Err(e) => {
            match e.peer_code() {
                Some(code) => live.metrics.reset_received(code),
                None => live.metrics.reset_sent(e.local_code()),
            }
            debug!(service = %service_id, "tunnel ended: {e}");
        }
    }
}

/// `Tunnel:Connect` for `service_id` against the current policy: the service and who asked, or
/// the code to reset the stream with.
fn authorize(
    live: &Live,
    conn: &Conn,
    service_id: &str,
) -> Result<(ServiceConfig, String), StreamCode> {
    let snap = live.snapshot();
    let policy = snap.policy();
    let who = policy.who(&conn.fingerprint);
    let (outcome, verdict) = policy.tunnel(&conn.facts(), service_id);
    log_verdict(&who, conn.is_local(), &verdict);
    let user = who.name().to_string();
    match outcome {
        Ok(s) => Ok((s.clone(), user)),
        Err(code) => {
            info!(%user, service = %service_id, "tunnel refused: {code}");
            Err(code)
        }
    }
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
    let resolver = Arc::new(Resolver::default());
    let timeout = Duration::from_secs(config.limits.connect_timeout_secs);
    let handles: Vec<_> = config
        .services
        .iter()
        .cloned()
        .map(|svc| {
            let resolver = resolver.clone();
            tokio::spawn(async move {
                let target = svc.target();
                let outcome = match tokio::time::timeout(timeout, resolver.connect(&target)).await {
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
