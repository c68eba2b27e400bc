//! Control requests on a device connection: services, pairing (with the PAKE) and user
//! management. Every request is authorized by IAM against the *current* state; changes go through
//! `Shared::update_state` (locked, atomic) and are re-enforced on every live connection.
//!
//! Kind: IO (state reads and writes through `Shared`).
//!
//! Answers never carry another user's password or token: a user's token appears only in answers
//! about the caller's own user, and a password only in the [`Invite`] the caller just created.

use std::sync::Arc;

use tracing::{debug, info, warn};

use super::{ConnEntry, Shared, clock_now};
use crate::framed::{self, FrameError};
use crate::iam::{self, Action, Attrs, Value};
use crate::identity::Fingerprint;
use crate::pairing::{Channel, DevicePake, EXPORTER_LABEL, PairingMode, Verdict};
use crate::proto::{
    self, DecodeError, ErrorCode, ErrorReply, Invite, PairingInfo, Request, Response, ServiceInfo,
    Settings, UserInfo,
};
use crate::secret::Secret;
use crate::state::{DeviceState, StateError, User};

/// Password-authentication state of one connection.
#[derive(Default)]
pub(crate) struct PasswordAuth {
    pending: Option<Pending>,
    /// After a successful PAKE: the user ("" for open pairing) and the password it proved.
    proven: Option<(String, Secret)>,
}

struct Pending {
    username: String,
    /// The password the device used (`None`: a random one, so it cannot succeed).
    password: Option<Secret>,
    pake: DevicePake,
}

const FIRST_USER_EXISTS: &str = "the first user exists already";
const INVITATION_CHANGED: &str =
    "the invitation was replaced or claimed meanwhile; ask for a new one";

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
        StateError::Rejected(m) if m == FIRST_USER_EXISTS => {
            error(ErrorCode::ALREADY_PAIRED, m.clone())
        }
        StateError::Rejected(m) if m.starts_with("there is no user") => {
            error(ErrorCode::NOT_FOUND, m.clone())
        }
        StateError::Rejected(m) => error(ErrorCode::CONFLICT, m.clone()),
        other => {
            warn!("state update failed: {other}");
            error(ErrorCode::INTERNAL, "the device could not save the change")
        }
    }
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

/// Serves control requests until the client finishes the stream (Ok) or it breaks (Err).
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    entry: &Arc<ConnEntry>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), FrameError> {
    loop {
        let response = match framed::read_frame::<Request>(&mut recv, proto::MAX_FRAME_LEN).await {
            Ok(Some(req)) => handle(shared, entry, req).await,
            Ok(None) => return Ok(()),
            // The whole frame was consumed, only its content is unknown: say so and go on.
            Err(FrameError::Decode(DecodeError::Malformed(e))) => {
                debug!("undecodable request: {e}");
                error(
                    ErrorCode::UNKNOWN_REQUEST,
                    "this device does not understand the request (it may be older than the client)",
                )
            }
            Err(e) => return Err(e),
        };
        framed::write_frame(&mut send, &response, proto::MAX_FRAME_LEN).await?;
    }
}

fn iam_attrs(mut base: Attrs, username: &str, role: Option<&str>) -> Attrs {
    base.insert(iam::attr::IAM_USERNAME, Value::Str(username.to_string()));
    if let Some(r) = role {
        base.insert(iam::attr::IAM_ROLE_ID, Value::Str(r.to_string()));
    }
    base
}

/// Whether removing `username` from `role_holders` would leave no keyed user with the initial
/// (owner) role.
fn last_owner(state: &DeviceState, initial_role: &str, username: &str) -> bool {
    let owners: Vec<&User> = state
        .users
        .iter()
        .filter(|u| u.role == initial_role && !u.fingerprints.is_empty())
        .collect();
    owners.len() == 1 && owners[0].username == username
}

#[expect(
    clippy::too_many_lines,
    reason = "one arm per request kind keeps the dispatch flat"
)]
async fn handle(shared: &Arc<Shared>, entry: &Arc<ConnEntry>, req: Request) -> Response {
    let state = shared.state();
    let iam = shared.iam();
    let config = shared.config();
    let who = Shared::who(&state, &iam, entry);
    let base = Shared::base_attrs(entry, &who);
    let allow = |action: Action, attrs: &Attrs| Shared::authorize(&iam, entry, &who, action, attrs);
    let me = who.user.map(|u| u.username.clone());
    let fp = entry.fingerprint;

    // Gate shared by every pairing mode: not paired yet, locality, IAM, switched on.
    // `Some(answer)` refuses the request.
    let gate = |mode: PairingMode| -> Option<Response> {
        if let Some(u) = who.user {
            return Some(error(
                ErrorCode::ALREADY_PAIRED,
                format!("this key is already paired as user '{}'", u.username),
            ));
        }
        if mode.local_only() && !entry.local {
            return Some(error(
                ErrorCode::PAIRING_DISABLED,
                format!("{mode} pairing needs a local connection"),
            ));
        }
        if !allow(mode.action(), &base) {
            return Some(forbidden());
        }
        if !state.pairing.enabled(mode) {
            return Some(error(
                ErrorCode::PAIRING_DISABLED,
                format!("{mode} pairing is switched off on this device"),
            ));
        }
        None
    };

    match req {
        Request::ListServices => {
            if !allow(Action::TunnelListServices, &base) {
                return forbidden();
            }
            let services = config
                .services
                .iter()
                .filter(|s| {
                    allow(
                        Action::TunnelGetService,
                        &Shared::service_attrs(base.clone(), &s.id, Some(s)),
                    )
                })
                .map(|s| ServiceInfo {
                    id: s.id.clone(),
                    service_type: s.service_type.clone(),
                    metadata: s.metadata.clone(),
                })
                .collect();
            Response::Services(services)
        }
        Request::GetService { id } => {
            let svc = config.service(&id);
            if !allow(
                Action::TunnelGetService,
                &Shared::service_attrs(base.clone(), &id, svc),
            ) {
                return forbidden();
            }
            match svc {
                Some(s) => Response::Service(ServiceInfo {
                    id: s.id.clone(),
                    service_type: s.service_type.clone(),
                    metadata: s.metadata.clone(),
                }),
                None => error(ErrorCode::NOT_FOUND, format!("there is no service '{id}'")),
            }
        }
        Request::GetMe => Response::Me(who.user.map(|u| user_info(u, true))),
        Request::PairingGet => {
            if !allow(Action::PairingGet, &base) {
                return forbidden();
            }
            Response::Pairing(PairingInfo {
                modes: Shared::usable_modes(&state, &iam, entry),
                device_id: config.device_id.clone(),
                device_name: config.name.clone(),
            })
        }
        Request::PairLocalInitial { username, key_name } => {
            if let Some(r) = gate(PairingMode::LocalInitial) {
                return r;
            }
            let username = username.unwrap_or_else(|| "owner".to_string());
            if let Err(e) = crate::config::check_id("user name", &username) {
                return error(ErrorCode::BAD_REQUEST, e.0);
            }
            let role = iam.initial_role.clone();
            drop(state);
            let result = shared
                .update_state(move |s| {
                    // Checked again under the lock: two racing clients get one owner.
                    if !s.local_initial_available(&role) {
                        return Err(StateError::Rejected(FIRST_USER_EXISTS.into()));
                    }
                    s.pairing.initial_done = true;
                    s.add_user(&username, &role, fp, key_name)
                        .map(|u| user_info(u, true))
                })
                .await;
            paired(entry, result)
        }
        Request::PairLocalOpen { username, key_name } => {
            if let Some(r) = gate(PairingMode::LocalOpen) {
                return r;
            }
            if let Err(e) = crate::config::check_id("user name", &username) {
                return error(ErrorCode::BAD_REQUEST, e.0);
            }
            let role = iam.open_pairing_role.clone();
            drop(state);
            let result = shared
                .update_state(move |s| {
                    s.add_user(&username, &role, fp, key_name)
                        .map(|u| user_info(u, true))
                })
                .await;
            paired(entry, result)
        }
        Request::PakeStart { username, msg } => {
            let mode = if username.is_empty() {
                PairingMode::PasswordOpen
            } else {
                PairingMode::PasswordInvite
            };
            if let Some(r) = gate(mode) {
                return r;
            }
            if mode == PairingMode::PasswordOpen
                && !entry.local
                && entry.sct.as_ref() != Some(&state.pairing.open_sct)
            {
                return error(
                    ErrorCode::PAIRING_DISABLED,
                    "remote password open pairing needs the open pairing token",
                );
            }
            let ip = entry.remote.ip();
            let verdict = shared
                .limiter
                .lock()
                .map_or(Verdict::Allowed, |mut l| l.check(ip, clock_now()));
            if let Verdict::RetryAfter(wait) = verdict {
                let secs = wait.as_secs() + 1;
                info!(%ip, "pairing password attempt refused: too many failures");
                return error(
                    ErrorCode::TOO_MANY_ATTEMPTS,
                    format!("too many attempts, retry in {secs} s"),
                );
            }
            let mut exporter = [0u8; 32];
            if entry
                .conn
                .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
                .is_err()
            {
                return error(
                    ErrorCode::INTERNAL,
                    "cannot bind the key exchange to the connection",
                );
            }
            let password = match mode {
                PairingMode::PasswordOpen => Some(state.pairing.open_password.clone()),
                _ => state.user(&username).and_then(|u| u.password.clone()),
            };
            let ch = Channel {
                client: &entry.fingerprint,
                device: &shared.fingerprint,
                exporter: &exporter,
            };
            match DevicePake::respond(password.as_ref(), &username, ch, &msg) {
                Ok((pake, reply)) => {
                    if let Ok(mut a) = entry.auth.lock() {
                        a.pending = Some(Pending {
                            username,
                            password,
                            pake,
                        });
                        a.proven = None;
                    }
                    Response::PakeReply { msg: reply }
                }
                Err(e) => {
                    if let Ok(mut l) = shared.limiter.lock() {
                        l.failed(ip, clock_now());
                    }
                    error(ErrorCode::BAD_REQUEST, e.to_string())
                }
            }
        }
        Request::PakeConfirm { mac } => {
            let pending = entry.auth.lock().ok().and_then(|mut a| a.pending.take());
            let Some(pending) = pending else {
                return error(ErrorCode::NOT_AUTHENTICATED, "start the key exchange first");
            };
            let ip = entry.remote.ip();
            match (pending.pake.confirm(&mac), pending.password) {
                (Ok(device_mac), Some(password)) => {
                    if let Ok(mut a) = entry.auth.lock() {
                        a.proven = Some((pending.username.clone(), password));
                    }
                    info!(user = %pending.username, "pairing password verified");
                    Response::PakeConfirmed {
                        mac: device_mac.to_vec(),
                    }
                }
                _ => {
                    if let Ok(mut l) = shared.limiter.lock() {
                        l.failed(ip, clock_now());
                    }
                    warn!(%ip, user = %pending.username, "wrong pairing password (or an intercepted connection)");
                    error(
                        ErrorCode::WRONG_PASSWORD,
                        "wrong password (or the connection is intercepted)",
                    )
                }
            }
        }
        Request::PairPasswordInvite { key_name } => {
            let proven = entry.auth.lock().ok().and_then(|a| a.proven.clone());
            let Some((username, password)) = proven.filter(|(u, _)| !u.is_empty()) else {
                return error(
                    ErrorCode::NOT_AUTHENTICATED,
                    "prove the invitation password first",
                );
            };
            if let Some(r) = gate(PairingMode::PasswordInvite) {
                return r;
            }
            drop(state);
            let result = shared
                .update_state(move |s| {
                    if s.user(&username).and_then(|u| u.password.as_ref()) != Some(&password) {
                        return Err(StateError::Rejected(INVITATION_CHANGED.into()));
                    }
                    s.claim_invite(&username, fp, key_name)
                        .map(|u| user_info(u, true))
                })
                .await;
            paired(entry, result)
        }
        Request::PairPasswordOpen { username, key_name } => {
            let proven = entry.auth.lock().ok().and_then(|a| a.proven.clone());
            let Some((_, password)) = proven.filter(|(u, _)| u.is_empty()) else {
                return error(
                    ErrorCode::NOT_AUTHENTICATED,
                    "prove the open pairing password first",
                );
            };
            if let Some(r) = gate(PairingMode::PasswordOpen) {
                return r;
            }
            if let Err(e) = crate::config::check_id("user name", &username) {
                return error(ErrorCode::BAD_REQUEST, e.0);
            }
            let role = iam.open_pairing_role.clone();
            drop(state);
            let result = shared
                .update_state(move |s| {
                    if s.pairing.open_password != password {
                        return Err(StateError::Rejected(
                            "the open pairing password changed meanwhile".into(),
                        ));
                    }
                    s.add_user(&username, &role, fp, key_name)
                        .map(|u| user_info(u, true))
                })
                .await;
            paired(entry, result)
        }
        Request::ListUsers => {
            if !allow(Action::IamListUsers, &base) {
                return forbidden();
            }
            Response::Users(
                state
                    .users
                    .iter()
                    .map(|u| user_info(u, Some(&u.username) == me.as_ref()))
                    .collect(),
            )
        }
        Request::GetUser { username } => {
            if !allow(
                Action::IamGetUser,
                &iam_attrs(base.clone(), &username, None),
            ) {
                return forbidden();
            }
            match state.user(&username) {
                Some(u) => Response::User(user_info(u, Some(&u.username) == me.as_ref())),
                None => error(
                    ErrorCode::NOT_FOUND,
                    format!("there is no user '{username}'"),
                ),
            }
        }
        Request::CreateUser { username, role } => {
            let role = match iam.parse_role(role.as_deref().unwrap_or(&iam.open_pairing_role)) {
                Ok(r) => r,
                Err(e) => return error(ErrorCode::BAD_REQUEST, e),
            };
            if !allow(
                Action::IamCreateUser,
                &iam_attrs(base.clone(), &username, Some(&role)),
            ) {
                return forbidden();
            }
            let mode_enabled = state.pairing.password_invite;
            drop(state);
            let result = shared
                .update_state(move |s| {
                    let password = s.invite_user(&username, &role)?;
                    let sct = s.user(&username).map(|u| u.sct.clone()).unwrap_or_default();
                    Ok(Invite {
                        username,
                        role,
                        password,
                        sct,
                        mode_enabled,
                    })
                })
                .await;
            match result {
                Ok(inv) => {
                    info!(by = me.as_deref().unwrap_or("-"), user = %inv.username, role = %inv.role, "user invited");
                    Response::Invite(inv)
                }
                Err(e) => state_error(&e),
            }
        }
        Request::DeleteUser { username } => {
            if !allow(
                Action::IamDeleteUser,
                &iam_attrs(base.clone(), &username, None),
            ) {
                return forbidden();
            }
            if last_owner(&state, &iam.initial_role, &username) {
                return error(
                    ErrorCode::CONFLICT,
                    format!(
                        "'{username}' is the last {} with a key; make another user {} first \
                         (or use tunnel-device user remove on the device)",
                        iam.initial_role, iam.initial_role
                    ),
                );
            }
            drop(state);
            let by = me.clone();
            match shared.update_state(move |s| s.remove_user(&username)).await {
                Ok(u) => {
                    info!(by = by.as_deref().unwrap_or("-"), user = %u.username, "user removed");
                    Response::Ok
                }
                Err(e) => state_error(&e),
            }
        }
        Request::SetUserRole { username, role } => {
            let role = match iam.parse_role(&role) {
                Ok(r) => r,
                Err(e) => return error(ErrorCode::BAD_REQUEST, e),
            };
            if !allow(
                Action::IamSetUserRole,
                &iam_attrs(base.clone(), &username, Some(&role)),
            ) {
                return forbidden();
            }
            if role != iam.initial_role && last_owner(&state, &iam.initial_role, &username) {
                return error(
                    ErrorCode::CONFLICT,
                    format!(
                        "'{username}' is the last {} with a key; make another user {} first",
                        iam.initial_role, iam.initial_role
                    ),
                );
            }
            drop(state);
            ok_or(
                shared
                    .update_state(move |s| s.set_role(&username, &role))
                    .await,
            )
        }
        Request::SetUserDisplayName {
            username,
            display_name,
        } => {
            let allowed = allow(
                Action::IamSetUserDisplayName,
                &iam_attrs(base.clone(), &username, None),
            );
            apply_if(shared, allowed, move |s| {
                s.set_display_name(&username, display_name)
            })
            .await
        }
        Request::AddFingerprint {
            username,
            fingerprint,
            key_name,
        } => {
            let allowed = allow(
                Action::IamAddFingerprint,
                &iam_attrs(base.clone(), &username, None),
            );
            apply_if(shared, allowed, move |s| {
                s.add_fingerprint(&username, fingerprint, key_name)
            })
            .await
        }
        Request::RemoveFingerprint {
            username,
            fingerprint,
        } => {
            let allowed = allow(
                Action::IamRemoveFingerprint,
                &iam_attrs(base.clone(), &username, None),
            );
            apply_if(shared, allowed, move |s| {
                s.remove_fingerprint(&username, &fingerprint)
            })
            .await
        }
        Request::ListRoles => {
            if !allow(Action::IamListRoles, &base) {
                return forbidden();
            }
            Response::Roles(iam.role_ids())
        }
        Request::GetSettings => {
            if !allow(Action::IamGetSettings, &base) {
                return forbidden();
            }
            Response::Settings(Settings {
                enabled: PairingMode::ALL
                    .into_iter()
                    .filter(|m| state.pairing.enabled(*m))
                    .collect(),
                initial_done: state.pairing.initial_done,
                open_pairing_role: iam.open_pairing_role.clone(),
                open_password: state.pairing.open_password.clone(),
                open_sct: state.pairing.open_sct.clone(),
            })
        }
        Request::SetPairingMode { mode, enabled } => {
            if !allow(Action::IamSetSettings, &base) {
                return forbidden();
            }
            drop(state);
            let by = me.clone();
            let result = shared
                .update_state(move |s| {
                    s.pairing.set(mode, enabled);
                    Ok(())
                })
                .await;
            if result.is_ok() {
                info!(by = by.as_deref().unwrap_or("-"), %mode, enabled, "pairing mode switched");
            }
            ok_or(result)
        }
        Request::SetDeviceName { name } => {
            if !allow(Action::DeviceSetName, &base) {
                return forbidden();
            }
            drop(state);
            let home = shared.home().clone();
            let new_name = name.clone();
            let result = tokio::task::spawn_blocking(move || {
                super::admin::set_device_name(&home, &new_name)
            })
            .await;
            match result {
                Ok(Ok(())) => {
                    let mut cfg = (*shared.config()).clone();
                    cfg.name = name;
                    shared.set_config(cfg);
                    Response::Ok
                }
                Ok(Err(e)) => error(ErrorCode::BAD_REQUEST, e.to_string()),
                Err(e) => {
                    warn!("rename failed: {e}");
                    error(ErrorCode::INTERNAL, "the device could not save the change")
                }
            }
        }
    }
}

/// Applies `change` when `allowed`, else answers "forbidden" and changes nothing.
async fn apply_if(
    shared: &Shared,
    allowed: bool,
    change: impl FnOnce(&mut DeviceState) -> Result<(), StateError> + Send + 'static,
) -> Response {
    if !allowed {
        return forbidden();
    }
    ok_or(shared.update_state(change).await)
}

fn ok_or<T>(result: Result<T, StateError>) -> Response {
    match result {
        Ok(_) => Response::Ok,
        Err(e) => state_error(&e),
    }
}

fn paired(entry: &ConnEntry, result: Result<UserInfo, StateError>) -> Response {
    match result {
        Ok(user) => {
            if let Ok(mut a) = entry.auth.lock() {
                *a = PasswordAuth::default();
            }
            if let Ok(mut u) = entry.user.lock() {
                *u = Some(user.username.clone());
            }
            info!(user = %user.username, role = %user.role, key = %short(&entry.fingerprint), "paired");
            Response::Paired(user)
        }
        Err(e) => state_error(&e),
    }
}

fn short(fp: &Fingerprint) -> String {
    fp.fmt_short()
}
