//! Watching `state.json`, `iam.toml` and `device.toml` while the device runs: a changed file is
//! loaded, checked, adopted, and every live connection re-checked. A file that became invalid, or
//! that another local user could now change (group- or world-writable, someone else's, a
//! symlink), is ignored with an error in the log: the last valid version stays in force.
//!
//! Kind: IO (polls file stamps; no inotify, so it works on every file system).

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::home::{DeviceHome, check_user_roles};
use super::live::Live;
use crate::fsutil::FileStamp;

/// The versions of the three files a device watches.
pub(crate) struct Stamps {
    state: Option<FileStamp>,
    config: Option<FileStamp>,
    iam: Option<FileStamp>,
}

impl Stamps {
    /// Stamps them now (before loading, so a change written during start-up is seen).
    pub(crate) fn of(home: &DeviceHome) -> Self {
        Self {
            state: FileStamp::of(&home.state_path()),
            config: FileStamp::of(&home.config_path()),
            iam: FileStamp::of(&home.iam_path()),
        }
    }
}

/// Polls the files every `interval` until shutdown.
pub(crate) async fn watch(live: Arc<Live>, mut stamps: Stamps, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = live.shutdown.cancelled() => return,
        }
        let mut changed = reload_state(&live, &mut stamps.state);
        changed |= reload_iam(&live, &mut stamps.iam);
        changed |= reload_config(&live, &mut stamps.config);
        if changed {
            live.enforce();
        }
    }
}

fn reload_state(live: &Live, stamp: &mut Option<FileStamp>) -> bool {
    let now = FileStamp::of(live.store().path());
    if now == *stamp {
        return false;
    }
    *stamp = now;
    if now.is_some() && now == live.written() {
        // Our own write, already adopted.
        return false;
    }
    let loaded = live
        .store()
        .load()
        .map_err(|e| e.to_string())
        .and_then(|state| {
            check_user_roles(&live.iam(), &state)
                .map(|()| state)
                .map_err(|e| e.to_string())
        });
    match loaded {
        Ok(state) => {
            info!(users = state.users.len(), "state.json changed: reloaded");
            live.set_state(state);
            true
        }
        Err(e) => {
            error!("state.json changed but cannot be used, keeping the previous access list: {e}");
            false
        }
    }
}

fn reload_iam(live: &Live, stamp: &mut Option<FileStamp>) -> bool {
    let now = FileStamp::of(&live.home().iam_path());
    if now == *stamp {
        return false;
    }
    *stamp = now;
    let loaded = live
        .home()
        .load_iam()
        .map_err(|e| e.to_string())
        .and_then(|iam| {
            check_user_roles(&iam, &live.state())
                .map(|()| iam)
                .map_err(|e| e.to_string())
        });
    match loaded {
        Ok(iam) => {
            info!(source = %iam.source_name(), "iam.toml changed: reloaded");
            live.set_iam(iam);
            true
        }
        Err(e) => {
            error!("iam.toml changed but cannot be used, keeping the previous policies: {e}");
            false
        }
    }
}

fn reload_config(live: &Live, stamp: &mut Option<FileStamp>) -> bool {
    let path = live.home().config_path();
    let now = FileStamp::of(&path);
    if now == *stamp {
        return false;
    }
    *stamp = now;
    match live.home().load_config() {
        Ok(new) => {
            let old = live.config();
            if new.listen != old.listen
                || new.transport != old.transport
                || new.limits != old.limits
                || new.metrics != old.metrics
            {
                warn!(
                    "device.toml changed listen, limits, transport or metrics settings: restart the device to apply them"
                );
            }
            if new.jwt != old.jwt {
                match new
                    .jwt
                    .as_ref()
                    .map(|j| crate::jwt::JwtVerifier::load(j, live.home().dir()))
                    .transpose()
                {
                    Ok(v) => live.set_jwt(v),
                    Err(e) => {
                        error!(
                            "device.toml changed [jwt], but it cannot be used, keeping the previous keys: {e}"
                        );
                        return false;
                    }
                }
            }
            let mut next = (*old).clone();
            next.services = new.services;
            next.name = new.name;
            next.network = new.network;
            next.relays = new.relays;
            next.jwt = new.jwt;
            info!(
                services = next.services.len(),
                "device.toml changed: services, name, network policy, relays and [jwt] reloaded"
            );
            live.set_config(next);
            true
        }
        Err(e) => {
            error!("device.toml changed but cannot be used, keeping the previous settings: {e}");
            false
        }
    }
}
