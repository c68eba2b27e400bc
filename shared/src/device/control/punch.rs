//! `Punch`: a relayed client asks for a direct path. The two ends swap hole-punching candidates
//! over the end-to-end connection (never through the relay, so a relay can neither read nor
//! inject them) and start probing.
//!
//! Kind: IO (starts the probing task).
//!
//! Only for a connection that may tunnel now (`Tunnel:Connect` to some service): a Guest on a
//! relayed (always remote) connection learns none of the device's addresses and makes it probe
//! nothing (issue 18). The client's candidates are cut to acceptable ones
//! ([`crate::transport::punch::acceptable_candidate`]: no loopback unless the relay is on
//! loopback too, none of the device's services).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use tracing::{debug, info};

use super::{Cx, error, forbidden};
use crate::proto::{ErrorCode, MAX_CANDIDATES, Response};
use crate::transport::{path, punch};

/// Takes the client's candidates, answers with the device's and starts probing (once per
/// connection; a later `Punch` only updates the candidates).
pub(super) fn punch(cx: &Cx<'_>, candidates: &[SocketAddr]) -> Response {
    let remote = cx.conn.remote();
    let (true, Some(paths)) = (path::is_virtual(remote), cx.conn.relayed.get()) else {
        return error(
            ErrorCode::BAD_REQUEST,
            "this connection does not go through a relay",
        );
    };
    if !cx.policy().may_tunnel(&cx.facts()) {
        debug!(user = %cx.me(), "a relayed connection that may not tunnel asked to punch");
        return forbidden();
    }
    if !cx.snap.config.transport.hole_punching {
        return error(
            ErrorCode::FORBIDDEN,
            "hole punching is off on this device ([transport] hole_punching = false)",
        );
    }
    let Some(key) = paths.key_of(remote) else {
        return error(ErrorCode::INTERNAL, "the relayed channel is gone");
    };
    let theirs = &candidates[..candidates.len().min(MAX_CANDIDATES)];
    paths.set_candidates(key, theirs);
    if !cx.conn.punching.swap(true, Ordering::Relaxed) {
        info!(user = %cx.me(), candidates = ?theirs, "the client asked for a direct path: probing");
        cx.live.tasks.spawn(punch::drive(
            paths.clone(),
            remote,
            cx.conn.quic.clone(),
            quinn::Side::Server,
            cx.conn.fingerprint.fmt_short(),
        ));
    }
    Response::Punch {
        candidates: cx.live.own_candidates(key.relay),
    }
}
