//! A client connection from the first packet to its end: the connection cap, the TLS handshake
//! (client key proven, [`crate::transport`]), `Hello`, the version check, local or remote, the
//! admission decision of [`crate::authz`] (remote access, token, key), `Welcome`, then the control
//! stream and the tunnel streams until it closes.
//!
//! Kind: IO.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{Instrument, debug, info, info_span, warn};

use super::live::{Conn, Live};
use super::{control, stream};
use crate::authz::Refusal;
use crate::config::DeviceConfig;
use crate::identity::Fingerprint;
use crate::pairing::PasswordFlow;
use crate::proto::{self, CloseCode, Hello, Welcome};
use crate::transport;
use crate::wire::ControlServer;

/// Decrements the in-progress connection count when a handler ends.
struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections on `endpoint` until shutdown, each in its own task.
pub(crate) async fn accept_loop(live: Arc<Live>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            () = live.shutdown.cancelled() => return,
        };
        let max = live.config().limits.max_connections as usize;
        if live.active.fetch_add(1, Ordering::Relaxed) >= max {
            live.active.fetch_sub(1, Ordering::Relaxed);
            warn!(remote = %incoming.remote_address(), max, "connection limit reached: refusing");
            incoming.refuse();
            continue;
        }
        let id = live.next_id();
        let span = info_span!("conn", id, remote = %incoming.remote_address(), peer = tracing::field::Empty);
        live.tasks
            .spawn(handle(live.clone(), incoming, id).instrument(span));
    }
}

/// Completes the handshake and `Hello` within the handshake timeout.
async fn handshake(
    incoming: quinn::Incoming,
    deadline: Duration,
) -> Option<(quinn::Connection, Fingerprint, ControlServer, Hello)> {
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!("handshake refused: {e}");
            return None;
        }
    };
    let conn = match tokio::time::timeout(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!("handshake failed: {e}");
            return None;
        }
        Err(_) => {
            debug!("handshake timed out");
            return None;
        }
    };
    let Some(fingerprint) = transport::peer_fingerprint(&conn) else {
        conn.close(CloseCode::PROTOCOL.to_varint(), b"no client key");
        return None;
    };
    tracing::Span::current().record("peer", tracing::field::display(fingerprint.fmt_short()));
    match tokio::time::timeout(deadline, ControlServer::accept_hello(&conn)).await {
        Ok(Ok((control, hello))) => Some((conn, fingerprint, control, hello)),
        Ok(Err(e)) => {
            debug!("no valid hello: {e}");
            conn.close(CloseCode::PROTOCOL.to_varint(), b"expected hello");
            None
        }
        Err(_) => {
            debug!("hello timed out");
            conn.close(CloseCode::PROTOCOL.to_varint(), b"hello timeout");
            None
        }
    }
}

async fn handle(live: Arc<Live>, incoming: quinn::Incoming, id: u64) {
    let _active = ActiveGuard(&live.active);
    let remote = incoming.remote_address();
    let deadline = Duration::from_secs(live.config().limits.handshake_timeout_secs);
    let Some((quic, fingerprint, mut control, hello)) = handshake(incoming, deadline).await else {
        return;
    };
    let Some((conn, welcome, unpaired_timeout)) = admit(&live, &quic, fingerprint, remote, &hello)
    else {
        return;
    };
    if control.welcome(&welcome).await.is_err() {
        return;
    }
    info!(
        user = welcome.user.as_deref().unwrap_or("(unpaired)"),
        role = %welcome.role,
        local = welcome.local,
        client = hello.client_name.as_deref().unwrap_or("-"),
        "client connected"
    );
    if let Some(timeout) = unpaired_timeout {
        // Keys on no user can only pair: cap how long they may wait (how many may wait is
        // checked at admission).
        live.tasks.spawn(close_if_unpaired(conn.clone(), timeout));
    }
    live.register(id, &conn);

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
    let conn = Arc::new(Conn {
        quic: quic.clone(),
        fingerprint,
        remote,
        local,
        token: if local { None } else { hello.sct.clone() },
        user: Mutex::new(None),
        tunnels: Mutex::new(HashMap::new()),
        flow: Mutex::new(PasswordFlow::default()),
    });
    let who = match snap.policy().admit(&conn.facts(), live.unpaired_count()) {
        Ok(who) => who,
        Err(refusal) => {
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
            client = hello.client_name.as_deref().unwrap_or("-"),
            local = conn.local,
            "refused a client key that is on no user, with no pairing mode usable (add it with \
             `tunnel-device user add NAME --fingerprint {fingerprint}` or invite it)"
        ),
        _ => info!(
            limit = config.limits.max_unpaired_connections,
            "too many connections of unpaired keys: refusing"
        ),
    }
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
