//! `ListServices` and `GetService`: what a user may see of the device's services (ids, types,
//! metadata; never the target address).
//!
//! Kind: pure reads of the request's snapshot.

use super::{Cx, error, forbidden};
use crate::authz::Subject;
use crate::config::ServiceConfig;
use crate::iam::Action;
use crate::proto::{ErrorCode, Response, ServiceInfo};

fn info(s: &ServiceConfig) -> ServiceInfo {
    ServiceInfo {
        id: s.id.clone(),
        service_type: s.service_type.clone(),
        metadata: s.metadata.clone(),
    }
}

/// The services the caller may see: `Tunnel:ListServices`, filtered per service by
/// `Tunnel:GetService` (so the list leaks no id the caller may not use).
pub(super) fn list(cx: &Cx<'_>) -> Response {
    if !cx.allow(Action::TunnelListServices, Subject::None) {
        return forbidden();
    }
    Response::Services(
        cx.snap
            .config
            .services
            .iter()
            .filter(|s| cx.allow(Action::TunnelGetService, Subject::Service(&s.id)))
            .map(info)
            .collect(),
    )
}

/// One service (`Tunnel:GetService`); an unknown id is "forbidden" to whoever may not see it.
pub(super) fn get(cx: &Cx<'_>, id: &str) -> Response {
    if !cx.allow(Action::TunnelGetService, Subject::Service(id)) {
        return forbidden();
    }
    match cx.snap.config.service(id) {
        Some(s) => Response::Service(info(s)),
        None => error(ErrorCode::NOT_FOUND, format!("there is no service '{id}'")),
    }
}
