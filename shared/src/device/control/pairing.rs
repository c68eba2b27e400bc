//! Pairing requests: which modes this connection may use, local initial and local open pairing,
//! and the password modes (the PAKE steps, then claiming an invitation or joining with the open
//! password). The PAKE itself is the pure [`crate::pairing::PasswordFlow`]; this module feeds it
//! the clock, the limiter and the channel binding, and turns its outcome into answers.
//!
//! Kind: IO (state writes through `Cx::write`).

use tracing::{info, warn};

use super::{Cx, error, forbidden, user_info};
use crate::authz::{PairingRefusal, Subject};
use crate::config::check_id;
use crate::device::live::now;
use crate::iam::Action;
use crate::pairing::{Channel, EXPORTER_LABEL, Expected, FlowError, PairingMode};
use crate::proto::{ErrorCode, PairingInfo, Response};
use crate::state::Rejection;

/// The gate every pairing mode shares: not paired yet, locality, IAM, switched on.
fn gate(cx: &Cx<'_>, mode: PairingMode) -> Option<Response> {
    let refusal = cx.policy().pairing_gate(&cx.facts(), mode).err()?;
    Some(match refusal {
        PairingRefusal::AlreadyPaired(user) => error(
            ErrorCode::ALREADY_PAIRED,
            format!("this key is already paired as user '{user}'"),
        ),
        PairingRefusal::NeedsLocal(mode) => error(
            ErrorCode::PAIRING_DISABLED,
            format!("{mode} pairing needs a local connection"),
        ),
        PairingRefusal::Forbidden => forbidden(),
        PairingRefusal::Disabled(mode) => error(
            ErrorCode::PAIRING_DISABLED,
            format!("{mode} pairing is switched off on this device"),
        ),
        PairingRefusal::NeedsOpenToken => error(
            ErrorCode::PAIRING_DISABLED,
            "remote password open pairing needs the open pairing token",
        ),
    })
}

/// The modes this connection may use now (`Pairing:Get`).
pub(super) fn info(cx: &Cx<'_>) -> Response {
    if !cx.allow(Action::PairingGet, Subject::None) {
        return forbidden();
    }
    Response::Pairing(PairingInfo {
        modes: cx.policy().usable_modes(&cx.facts()),
        device_id: cx.snap.config.device_id.clone(),
        device_name: cx.snap.config.name.clone(),
    })
}

/// Becomes the first user, with the initial role, exactly once even under races.
pub(super) async fn local_initial(
    cx: &Cx<'_>,
    username: Option<String>,
    key_name: Option<String>,
) -> Response {
    if let Some(r) = gate(cx, PairingMode::LocalInitial) {
        return r;
    }
    let username = username.unwrap_or_else(|| "owner".to_string());
    if let Err(e) = check_id("user name", &username) {
        return error(ErrorCode::BAD_REQUEST, e.0);
    }
    let role = cx.snap.iam.initial_role.clone();
    let fp = cx.conn.fingerprint;
    cx.pair(move |s| {
        // Checked again under the lock: two racing clients get one owner.
        if !s.local_initial_available(&role) {
            return Err(Rejection::FirstUserExists.into());
        }
        s.pairing.initial_done = true;
        s.add_user(&username, &role, fp, key_name)
            .map(|u| user_info(u, true))
    })
    .await
}

/// Becomes a new user with the open-pairing role.
pub(super) async fn local_open(
    cx: &Cx<'_>,
    username: String,
    key_name: Option<String>,
) -> Response {
    if let Some(r) = gate(cx, PairingMode::LocalOpen) {
        return r;
    }
    if let Err(e) = check_id("user name", &username) {
        return error(ErrorCode::BAD_REQUEST, e.0);
    }
    let role = cx.snap.iam.open_pairing_role.clone();
    let fp = cx.conn.fingerprint;
    cx.pair(move |s| {
        s.add_user(&username, &role, fp, key_name)
            .map(|u| user_info(u, true))
    })
    .await
}

/// Key exchanges one source may have started and not yet confirmed, over all its connections.
const MAX_PAKES_PER_SOURCE: usize = 2;

/// The password a key exchange for `username` is tested against.
fn expected(cx: &Cx<'_>, mode: PairingMode, username: &str) -> Expected {
    let state = cx.state();
    if mode == PairingMode::PasswordOpen {
        return Expected::Live(state.pairing.open_password.clone());
    }
    match state.user(username) {
        Some(u) => match (&u.password, &u.claimed) {
            (Some(p), _) => Expected::Live(p.clone()),
            (None, Some(c)) => Expected::Claimed(c.clone()),
            (None, None) => Expected::Unknown,
        },
        None => Expected::Unknown,
    }
}

/// The first PAKE message, for an invited user or ("") the open-pairing password. It spends one
/// of the source's attempts; a confirmed exchange gives it back.
pub(super) fn pake_start(cx: &Cx<'_>, username: String, msg: &[u8]) -> Response {
    let mode = if username.is_empty() {
        PairingMode::PasswordOpen
    } else {
        PairingMode::PasswordInvite
    };
    if let Some(r) = gate(cx, mode) {
        return r;
    }
    let ip = cx.conn.remote().ip();
    let restarting = cx.conn.flow.lock().is_ok_and(|f| f.is_pending());
    if !restarting && cx.live.pakes_in_flight(ip) >= MAX_PAKES_PER_SOURCE {
        info!(%ip, "pairing refused: too many key exchanges in flight from this address");
        return error(
            ErrorCode::TOO_MANY_ATTEMPTS,
            "too many key exchanges in flight from your address; finish one first",
        );
    }
    let mut exporter = [0u8; 32];
    if cx
        .conn
        .quic
        .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .is_err()
    {
        return error(
            ErrorCode::INTERNAL,
            "cannot bind the key exchange to the connection",
        );
    }
    let expected = expected(cx, mode, &username);
    let ch = Channel {
        client: &cx.conn.fingerprint,
        device: &cx.live.fingerprint,
        exporter: &exporter,
    };
    let outcome = match (cx.live.limiter.lock(), cx.conn.flow.lock()) {
        (Ok(mut limiter), Ok(mut flow)) => {
            flow.start(&mut limiter, ip, now(), username, expected, ch, msg)
        }
        _ => return error(ErrorCode::INTERNAL, "the device failed internally"),
    };
    match outcome {
        Ok(reply) => Response::PakeReply { msg: reply },
        Err(e @ FlowError::TooManyAttempts { .. }) => {
            info!(%ip, "pairing password attempt refused: too many attempts");
            error(ErrorCode::TOO_MANY_ATTEMPTS, e.to_string())
        }
        Err(e) => error(ErrorCode::BAD_REQUEST, e.to_string()),
    }
}

/// The client's key confirmation: on success the device proves it knows the password too.
pub(super) fn pake_confirm(cx: &Cx<'_>, mac: &[u8]) -> Response {
    let ip = cx.conn.remote().ip();
    let outcome = match (cx.live.limiter.lock(), cx.conn.flow.lock()) {
        (Ok(mut limiter), Ok(mut flow)) => flow
            .confirm(&mut limiter, ip, now(), mac)
            .map(|m| (m, flow.proven().map(|p| p.username.clone()))),
        _ => return error(ErrorCode::INTERNAL, "the device failed internally"),
    };
    match outcome {
        Ok((device_mac, user)) => {
            info!(user = %user.unwrap_or_default(), "pairing password verified");
            Response::PakeConfirmed {
                mac: device_mac.to_vec(),
            }
        }
        Err(FlowError::NotStarted) => {
            error(ErrorCode::NOT_AUTHENTICATED, "start the key exchange first")
        }
        Err(e @ FlowError::AlreadyClaimed { .. }) => {
            info!(%ip, "a client proved the password of an invitation that was already used");
            error(ErrorCode::INVITATION_USED, e.to_string())
        }
        Err(e) => {
            if let FlowError::WrongPassword { username } = &e {
                warn!(%ip, user = %username, "wrong pairing password (or an intercepted connection)");
            }
            error(ErrorCode::WRONG_PASSWORD, e.to_string())
        }
    }
}

/// What the PAKE proved on this connection: `(user, password)`, the user "" for open pairing.
fn proven(cx: &Cx<'_>) -> Option<(String, crate::secret::Secret)> {
    let flow = cx.conn.flow.lock().ok()?;
    flow.proven()
        .map(|p| (p.username.clone(), p.password.clone()))
}

/// Claims the invitation the PAKE authenticated.
pub(super) async fn password_invite(cx: &Cx<'_>, key_name: Option<String>) -> Response {
    let Some((username, password)) = proven(cx).filter(|(u, _)| !u.is_empty()) else {
        return error(
            ErrorCode::NOT_AUTHENTICATED,
            "prove the invitation password first",
        );
    };
    if let Some(r) = gate(cx, PairingMode::PasswordInvite) {
        return r;
    }
    let fp = cx.conn.fingerprint;
    cx.pair(move |s| {
        if s.user(&username).and_then(|u| u.password.as_ref()) != Some(&password) {
            return Err(Rejection::InvitationChanged.into());
        }
        s.claim_invite(&username, fp, key_name)
            .map(|u| user_info(u, true))
    })
    .await
}

/// Becomes a new user with the open-pairing role after an open-password PAKE.
pub(super) async fn password_open(
    cx: &Cx<'_>,
    username: String,
    key_name: Option<String>,
) -> Response {
    let Some((_, password)) = proven(cx).filter(|(u, _)| u.is_empty()) else {
        return error(
            ErrorCode::NOT_AUTHENTICATED,
            "prove the open pairing password first",
        );
    };
    if let Some(r) = gate(cx, PairingMode::PasswordOpen) {
        return r;
    }
    if let Err(e) = check_id("user name", &username) {
        return error(ErrorCode::BAD_REQUEST, e.0);
    }
    let role = cx.snap.iam.open_pairing_role.clone();
    let fp = cx.conn.fingerprint;
    cx.pair(move |s| {
        if s.pairing.open_password != password {
            return Err(Rejection::OpenPasswordChanged.into());
        }
        s.add_user(&username, &role, fp, key_name)
            .map(|u| user_info(u, true))
    })
    .await
}
