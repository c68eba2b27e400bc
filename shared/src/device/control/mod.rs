//! Control requests on a device connection: one dispatcher over five areas, [`services`],
//! [`pairing`], [`users`], [`settings`] and [`punch`]. Every request is authorized by IAM against the
//! *current* state ([`crate::authz`]); changes go through `Cx::write` (rate-limited per
//! connection, then `Live::update_state`: locked, atomic)
//! and are re-enforced on every live connection.
//!
//! Kind: IO (state reads and writes through `Live`).
//!
//! Answers never carry another user's password or token: a user's token appears only in answers
//! about the caller's own user, and a password only in the invitation the caller just created.

mod pairing;
mod punch;
mod services;
mod settings;
mod users;

use std::sync::Arc;

use tracing::{debug, info, warn};

use super::conn::Conn;
use super::live::{Live, Snapshot, log_verdict, now};
use crate::authz::{ConnFacts, Policy, Subject};
use crate::iam::Action;
use crate::proto::{ErrorCode, ErrorReply, Request, Response, UserInfo};
use crate::state::{DeviceState, Rejection, StateError, User};
use crate::wire::{ControlServer, FrameError, Incoming};

/// Serves control requests until the client finishes the stream (Ok) or it breaks (Err).
pub(crate) async fn serve(
    live: &Arc<Live>,
    conn: &Arc<Conn>,
    mut control: ControlServer,
) -> Result<(), FrameError> {
    loop {
        let response = match control.next_request().await? {
            Some(Incoming::Request(req)) => {
                let pairing = matches!(
                    req,
                    Request::PairLocalInitial { .. }
                        | Request::PairLocalOpen { .. }
                        | Request::PakeStart { .. }
                        | Request::PakeConfirm { .. }
                        | Request::PairPasswordInvite { .. }
                        | Request::PairPasswordOpen { .. }
                );
                let response = handle(live, conn, req).await;
                if let (true, Response::Error(e)) = (pairing, &response) {
                    live.metrics.pairing_failures.inc(e.code.label());
                }
                response
            }
            Some(Incoming::Unknown(e)) => {
                debug!("undecodable request: {e}");
                error(
                    ErrorCode::UNKNOWN_REQUEST,
                    "this device does not understand the request (it may be older than the client)",
                )
            }
            None => return Ok(()),
        };
        control.respond(&response).await?;
    }
}

async fn handle(live: &Arc<Live>, conn: &Arc<Conn>, req: Request) -> Response {
    // Its address may have moved since the last request: re-check it as it is now.
    if !live.recheck(conn) {
        return error(ErrorCode::FORBIDDEN, "this connection is no longer allowed");
    }
    let cx = Cx {
        live,
        conn,
        snap: live.snapshot(),
    };
    match req {
        Request::ListServices => services::list(&cx),
        Request::GetService { id } => services::get(&cx, &id),
        Request::GetMe => users::me(&cx),
        Request::PairingGet => pairing::info(&cx),
        Request::PairLocalInitial { username, key_name } => {
            pairing::local_initial(&cx, username, key_name).await
        }
        Request::PairLocalOpen { username, key_name } => {
            pairing::local_open(&cx, username, key_name).await
        }
        Request::PakeStart { username, msg } => pairing::pake_start(&cx, username, &msg),
        Request::PakeConfirm { mac } => pairing::pake_confirm(&cx, &mac),
        Request::PairPasswordInvite { key_name } => pairing::password_invite(&cx, key_name).await,
        Request::PairPasswordOpen { username, key_name } => {
            pairing::password_open(&cx, username, key_name).await
        }
        Request::ListUsers => users::list(&cx),
        Request::GetUser { username } => users::get(&cx, &username),
        Request::CreateUser { username, role } => users::create(&cx, username, role).await,
        Request::DeleteUser { username } => users::delete(&cx, username).await,
        Request::SetUserRole { username, role } => users::set_role(&cx, username, &role).await,
        Request::SetUserDisplayName {
            username,
            display_name,
        } => users::set_display_name(&cx, username, display_name).await,
        Request::AddFingerprint {
            username,
            fingerprint,
            key_name,
        } => users::add_fingerprint(&cx, username, fingerprint, key_name).await,
        Request::RemoveFingerprint {
            username,
            fingerprint,
        } => users::remove_fingerprint(&cx, username, fingerprint).await,
        Request::ListRoles => users::roles(&cx),
        Request::GetSettings => settings::get(&cx),
        Request::SetPairingMode { mode, enabled } => settings::set_mode(&cx, mode, enabled).await,
        Request::SetDeviceName { name } => settings::set_name(&cx, name).await,
        Request::RotateToken { username } => users::rotate_token(&cx, username).await,
        Request::GetRelays => settings::relays(&cx),
        Request::Punch { candidates } => punch::punch(&cx, &candidates),
    }
}

/// One request's context: the device, the connection, and the policy as it was when the
/// request arrived.
struct Cx<'a> {
    live: &'a Arc<Live>,
    conn: &'a Arc<Conn>,
    snap: Snapshot,
}

impl Cx<'_> {
    fn policy(&self) -> Policy<'_> {
        self.snap.policy()
    }

    fn facts(&self) -> ConnFacts<'_> {
        self.conn.facts()
    }

    fn state(&self) -> &DeviceState {
        &self.snap.state
    }

    /// The caller's user, if its key is on one.
    fn user(&self) -> Option<&User> {
        self.snap.state.user_by_fingerprint(&self.conn.fingerprint)
    }

    /// The caller's user name, for logs.
    fn me(&self) -> String {
        self.user()
            .map_or_else(|| "-".into(), |u| u.username.clone())
    }

    /// Whether IAM allows `action` on `subject`; the decision is logged at debug.
    fn allow(&self, action: Action, subject: Subject<'_>) -> bool {
        let policy = self.policy();
        let verdict = policy.decide(&self.facts(), action, subject);
        log_verdict(
            &policy.who(&self.conn.fingerprint),
            self.conn.is_local(),
            &verdict,
        )
    }

    /// Spends one of the connection's state changes (they are rate-limited: each is a locked
    /// read-modify-write with two fsyncs and a re-check of every connection); `Some(answer)`
    /// when none is left.
    fn budget(&self) -> Option<Response> {
        let wait = self.conn.take_write(now()).err()?;
        Some(error(
            ErrorCode::RATE_LIMITED,
            format!(
                "too many changes from this connection; retry in {} s",
                wait.as_secs() + 1
            ),
        ))
    }

    /// Applies an authorized `change` to the state (after [`Self::budget`]); `adopt` runs on its
    /// result before connections are re-checked. Errors come back as the answer to send.
    async fn write<R: Send + 'static>(
        &self,
        change: impl FnOnce(&mut DeviceState) -> Result<R, StateError> + Send + 'static,
        adopt: impl FnOnce(&R) + Send,
    ) -> Result<R, Response> {
        if let Some(refusal) = self.budget() {
            return Err(refusal);
        }
        self.live
            .update_state(change, adopt)
            .await
            .map_err(|e| state_error(&e))
    }

    /// Applies `change` when `allowed`, else answers "forbidden" and changes nothing.
    async fn apply_if(
        &self,
        allowed: bool,
        change: impl FnOnce(&mut DeviceState) -> Result<(), StateError> + Send + 'static,
    ) -> Response {
        if !allowed {
            return forbidden();
        }
        answer(self.write(change, |()| {}).await, |()| Response::Ok)
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(ErrorReply {
        code,
        message: message.into(),
    })
}

fn forbidden() -> Response {
    error(
        ErrorCode::FORBIDDEN,
        "forbidden by the device's access control",
    )
}

fn state_error(e: &StateError) -> Response {
    match e {
        StateError::Rejected(r @ Rejection::FirstUserExists) => {
            error(ErrorCode::ALREADY_PAIRED, r.to_string())
        }
        StateError::Rejected(r @ Rejection::NoSuchUser(_)) => {
            error(ErrorCode::NOT_FOUND, r.to_string())
        }
        StateError::Rejected(r) => error(ErrorCode::CONFLICT, r.to_string()),
        other => {
            warn!("state update failed: {other}");
            error(ErrorCode::INTERNAL, "the device could not save the change")
        }
    }
}

/// The response for a [`Cx::write`] outcome: `ok` of its value, or the error answer.
fn answer<R>(result: Result<R, Response>, ok: impl FnOnce(R) -> Response) -> Response {
    result.map_or_else(|r| r, ok)
}

/// Converts a user for an answer; the token only for the caller's own user.
fn user_info(u: &User, own: bool) -> UserInfo {
    UserInfo {
        username: u.username.clone(),
        display_name: u.display_name.clone(),
        role: u.role.clone(),
        fingerprints: u
            .fingerprints
            .iter()
            .map(|k| (k.fingerprint, k.name.clone()))
            .collect(),
        invited: u.password.is_some(),
        sct: own.then(|| u.sct.clone()),
    }
}

impl Cx<'_> {
    /// Applies a pairing `change` (which returns the user this key becomes). Before connections
    /// are re-checked, this connection takes on that user and its token (a remote connection
    /// that paired with an invitation's or the open-pairing token keeps going on its own) and
    /// may open tunnels.
    async fn pair(
        &self,
        change: impl FnOnce(&mut DeviceState) -> Result<UserInfo, StateError> + Send + 'static,
    ) -> Response {
        let conn = self.conn.clone();
        if let Some(paths) = conn.relayed.get()
            && !conn.admitted_by_jwt()
            && let Some(key) = paths.key_of(conn.quic.remote_address())
        {
            self.live.pairing_on_channel(key, conn.fingerprint);
        }
        let max = self.snap.config.limits.max_streams_per_connection;
        let adopt = move |user: &UserInfo| {
            if let Ok(mut f) = conn.flow.lock() {
                f.reset();
            }
            conn.set_user(Some(user.username.clone()));
            if let Some(token) = &user.sct {
                conn.set_token(token.clone());
            }
            conn.allow_tunnels(max);
        };
        answer(self.write(change, adopt).await, |user| {
            info!(user = %user.username, role = %user.role, key = %self.conn.fingerprint.fmt_short(), "paired");
            Response::Paired(user)
        })
    }
}
