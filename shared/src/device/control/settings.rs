//! `GetSettings`, `SetPairingMode`, `SetDeviceName` and `GetRelays`: the device-wide switches
//! and facts.
//!
//! Kind: IO (state and `device.toml` writes).

use tracing::{info, warn};

use super::{Cx, answer, error, forbidden};
use crate::authz::Subject;
use crate::config;
use crate::iam::Action;
use crate::pairing::PairingMode;
use crate::proto::{ErrorCode, Response, Settings};

/// Pairing switches and the open-pairing secrets (`IAM:GetSettings`).
pub(super) fn get(cx: &Cx<'_>) -> Response {
    if !cx.allow(Action::IamGetSettings, Subject::None) {
        return forbidden();
    }
    let pairing = &cx.state().pairing;
    Response::Settings(Settings {
        enabled: PairingMode::ALL
            .into_iter()
            .filter(|m| pairing.enabled(*m))
            .collect(),
        initial_done: pairing.initial_done,
        open_pairing_role: cx.snap.iam.open_pairing_role.clone(),
        open_password: pairing.open_password.clone(),
        open_sct: pairing.open_sct.clone(),
    })
}

/// The device's relays, for any user (a key on no user learns nothing).
pub(super) fn relays(cx: &Cx<'_>) -> Response {
    if cx.user().is_none() {
        return forbidden();
    }
    Response::Relays(cx.snap.config.relays.clone())
}

/// Switches a pairing mode (`IAM:SetSettings`).
pub(super) async fn set_mode(cx: &Cx<'_>, mode: PairingMode, enabled: bool) -> Response {
    if !cx.allow(Action::IamSetSettings, Subject::None) {
        return forbidden();
    }
    let result = cx
        .write(
            move |s| {
                s.pairing.set(mode, enabled);
                Ok(())
            },
            |()| {},
        )
        .await;
    answer(result, |()| {
        info!(by = %cx.me(), %mode, enabled, "pairing mode switched");
        Response::Ok
    })
}

/// Renames the device in `device.toml` (`Device:SetName`), through the same locked edit the
/// offline `tunnel-device` commands use.
pub(super) async fn set_name(cx: &Cx<'_>, name: String) -> Response {
    if !cx.allow(Action::DeviceSetName, Subject::None) {
        return forbidden();
    }
    if let Some(r) = cx.budget() {
        return r;
    }
    let home = cx.live.home().clone();
    let new_name = name.clone();
    let result = tokio::task::spawn_blocking(move || {
        home.edit_config(|text| config::set_name_in_toml(text, &new_name))
    })
    .await;
    match result {
        Ok(Ok(())) => {
            let mut cfg = (*cx.live.config()).clone();
            cfg.name = name;
            cx.live.set_config(cfg);
            Response::Ok
        }
        Ok(Err(e)) => error(ErrorCode::BAD_REQUEST, e.to_string()),
        Err(e) => {
            warn!("rename failed: {e}");
            error(ErrorCode::INTERNAL, "the device could not save the change")
        }
    }
}
