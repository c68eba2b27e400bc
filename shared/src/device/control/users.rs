//! User management over the control channel: the caller's own user, listing, invitations,
//! removal, roles, display names, keys, and the role list.
//!
//! Kind: IO (state writes through `Cx::write`).

use tracing::info;

use super::{Cx, answer, error, forbidden, user_info};
use crate::authz::Subject;
use crate::iam::Action;
use crate::identity::Fingerprint;
use crate::proto::{ErrorCode, Invite, Response};
use crate::secret::Secret;
use crate::state::DeviceState;

fn about(name: &str) -> Subject<'_> {
    Subject::User { name, role: None }
}

/// The caller's own user, with its token (no action needed).
pub(super) fn me(cx: &Cx<'_>) -> Response {
    Response::Me(cx.user().map(|u| user_info(u, true)))
}

/// Every user; tokens only for the caller's own (`IAM:ListUsers`).
pub(super) fn list(cx: &Cx<'_>) -> Response {
    if !cx.allow(Action::IamListUsers, Subject::None) {
        return forbidden();
    }
    let me = cx.user().map(|u| u.username.as_str());
    Response::Users(
        cx.state()
            .users
            .iter()
            .map(|u| user_info(u, Some(u.username.as_str()) == me))
            .collect(),
    )
}

/// One user (`IAM:GetUser`).
pub(super) fn get(cx: &Cx<'_>, username: &str) -> Response {
    if !cx.allow(Action::IamGetUser, about(username)) {
        return forbidden();
    }
    let me = cx.user().map(|u| u.username.as_str());
    match cx.state().user(username) {
        Some(u) => Response::User(user_info(u, Some(u.username.as_str()) == me)),
        None => error(
            ErrorCode::NOT_FOUND,
            format!("there is no user '{username}'"),
        ),
    }
}

/// An invitation: a new user with a one-time password (`IAM:CreateUser`, with the role).
pub(super) async fn create(cx: &Cx<'_>, username: String, role: Option<String>) -> Response {
    let iam = &cx.snap.iam;
    let role = match iam.parse_role(role.as_deref().unwrap_or(&iam.open_pairing_role)) {
        Ok(r) => r,
        Err(e) => return error(ErrorCode::BAD_REQUEST, e.to_string()),
    };
    if !cx.allow(
        Action::IamCreateUser,
        Subject::User {
            name: &username,
            role: Some(&role),
        },
    ) {
        return forbidden();
    }
    let mode_enabled = cx.state().pairing.password_invite;
    let change = move |s: &mut DeviceState| {
        let password = s.invite_user(&username, &role)?;
        let sct = s.user(&username).map(|u| u.sct.clone()).unwrap_or_default();
        Ok(Invite {
            username,
            role,
            password,
            sct,
            mode_enabled,
        })
    };
    answer(cx.write(change, |_| {}).await, |inv| {
        info!(by = %cx.me(), user = %inv.username, role = %inv.role, "user invited");
        Response::Invite(inv)
    })
}

/// Removes a user (`IAM:DeleteUser`); never the last owner with a key (checked under the state
/// lock, so two owners removing each other cannot both succeed).
pub(super) async fn delete(cx: &Cx<'_>, username: String) -> Response {
    if !cx.allow(Action::IamDeleteUser, about(&username)) {
        return forbidden();
    }
    let owner = cx.snap.iam.initial_role.clone();
    let change = move |s: &mut DeviceState| {
        let name = username.clone();
        s.keeping_an_owner(&owner, &name, |s| s.remove_user(&username))
    };
    answer(cx.write(change, |_| {}).await, |u| {
        info!(by = %cx.me(), user = %u.username, "user removed");
        Response::Ok
    })
}

/// Changes a user's role (`IAM:SetUserRole`, with the role); never demotes the last owner.
pub(super) async fn set_role(cx: &Cx<'_>, username: String, role: &str) -> Response {
    let iam = &cx.snap.iam;
    let role = match iam.parse_role(role) {
        Ok(r) => r,
        Err(e) => return error(ErrorCode::BAD_REQUEST, e.to_string()),
    };
    if !cx.allow(
        Action::IamSetUserRole,
        Subject::User {
            name: &username,
            role: Some(&role),
        },
    ) {
        return forbidden();
    }
    let owner = iam.initial_role.clone();
    let change = move |s: &mut DeviceState| {
        s.keeping_an_owner(&owner, &username.clone(), |s| s.set_role(&username, &role))
    };
    answer(cx.write(change, |()| {}).await, |()| Response::Ok)
}

/// (`IAM:SetUserDisplayName`).
pub(super) async fn set_display_name(
    cx: &Cx<'_>,
    username: String,
    display_name: Option<String>,
) -> Response {
    let allowed = cx.allow(Action::IamSetUserDisplayName, about(&username));
    cx.apply_if(allowed, move |s| {
        s.set_display_name(&username, display_name)
    })
    .await
}

/// (`IAM:AddFingerprint`).
pub(super) async fn add_fingerprint(
    cx: &Cx<'_>,
    username: String,
    fingerprint: Fingerprint,
    key_name: Option<String>,
) -> Response {
    let allowed = cx.allow(Action::IamAddFingerprint, about(&username));
    cx.apply_if(allowed, move |s| {
        s.add_fingerprint(&username, fingerprint, key_name)
    })
    .await
}

/// (`IAM:RemoveFingerprint`); never the last key of the last owner.
pub(super) async fn remove_fingerprint(
    cx: &Cx<'_>,
    username: String,
    fingerprint: Fingerprint,
) -> Response {
    let allowed = cx.allow(Action::IamRemoveFingerprint, about(&username));
    let owner = cx.snap.iam.initial_role.clone();
    cx.apply_if(allowed, move |s| {
        s.keeping_an_owner(&owner, &username.clone(), |s| {
            s.remove_fingerprint(&username, &fingerprint)
        })
    })
    .await
}

/// Replaces a user's token (`IAM:RotateToken`: an owner, or the user itself) and answers with the
/// new one. The old token stops working at once; a connection of the caller's own that holds it
/// switches to the new one, every other is closed.
pub(super) async fn rotate_token(cx: &Cx<'_>, username: String) -> Response {
    if !cx.allow(Action::IamRotateToken, about(&username)) {
        return forbidden();
    }
    let own = cx.user().is_some_and(|u| u.username == username);
    let conn = cx.conn.clone();
    let name = username.clone();
    let adopt = move |token: &Secret| {
        if own {
            conn.set_token(token.clone());
        }
    };
    answer(
        cx.write(move |s| s.rotate_sct(&name), adopt).await,
        |token| {
            info!(by = %cx.me(), user = %username, "server-connect token replaced");
            Response::Token(token)
        },
    )
}

/// Role ids (`IAM:ListRoles`).
pub(super) fn roles(cx: &Cx<'_>) -> Response {
    if !cx.allow(Action::IamListRoles, Subject::None) {
        return forbidden();
    }
    Response::Roles(cx.snap.iam.role_ids())
}
