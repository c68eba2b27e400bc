//! Evaluating a request: which statements apply, deny wins, and which statement decided.
//!
//! Kind: pure.

use std::sync::Arc;

use super::model::{Condition, Effect, NumOp, Statement};
use super::{Action, Attrs, Decision, IamConfig, Value};

impl IamConfig {
    /// Decides whether `role` may do `action` given `attrs`.
    pub fn decide(&self, role: &str, action: Action, attrs: &Attrs) -> Decision {
        let Some(role) = self.roles.iter().find(|r| r.id == role) else {
            return Decision {
                allowed: false,
                by: None,
            };
        };
        let mut allow = None;
        for pid in &role.policies {
            let Some(policy) = self.policies.get(pid) else {
                continue;
            };
            for (i, st) in policy.statements.iter().enumerate() {
                if !st.applies(action, attrs) {
                    continue;
                }
                match st.effect {
                    Effect::Deny => {
                        return Decision {
                            allowed: false,
                            by: Some((Arc::clone(&policy.id), i + 1, Arc::clone(st))),
                        };
                    }
                    Effect::Allow if allow.is_none() => {
                        allow = Some((Arc::clone(&policy.id), i + 1, Arc::clone(st)));
                    }
                    Effect::Allow => {}
                }
            }
        }
        Decision {
            allowed: allow.is_some(),
            by: allow,
        }
    }
}

impl Statement {
    fn applies(&self, action: Action, attrs: &Attrs) -> bool {
        self.actions.iter().any(|p| p.matches(action))
            && self.conditions.iter().all(|c| c.holds(attrs))
    }
}

/// Replaces `${Name}` with the attribute's value; `None` if a referenced attribute is missing.
pub(super) fn substitute(template: &str, attrs: &Attrs) -> Option<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}')?;
        let name = &after[..end];
        let value = attrs.iter().find(|(k, _)| **k == name).map(|(_, v)| v)?;
        out.push_str(&value.to_string());
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

impl Condition {
    pub(super) fn holds(&self, attrs: &Attrs) -> bool {
        match self {
            Self::StringEquals(a, values) => attrs.get(a).is_some_and(|v| {
                let v = v.to_string();
                values
                    .iter()
                    .any(|t| substitute(t, attrs).is_some_and(|t| t == v))
            }),
            Self::StringNotEquals(a, values) => attrs.get(a).is_some_and(|v| {
                let v = v.to_string();
                values
                    .iter()
                    .all(|t| substitute(t, attrs).is_some_and(|t| t != v))
            }),
            Self::Bool(a, b) => matches!(attrs.get(a), Some(Value::Bool(v)) if v == b),
            Self::Numeric(op, a, n) => match attrs.get(a) {
                Some(Value::Num(v)) => match op {
                    NumOp::Eq => (v - n).abs() < f64::EPSILON,
                    NumOp::Ne => (v - n).abs() >= f64::EPSILON,
                    NumOp::Lt => v < n,
                    NumOp::Le => v <= n,
                    NumOp::Gt => v > n,
                    NumOp::Ge => v >= n,
                },
                _ => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iam::attr;

    fn attrs(local: bool, user: Option<&str>) -> Attrs {
        let mut a = Attrs::new();
        a.insert(attr::CONNECTION_IS_LOCAL, Value::Bool(local));
        if let Some(u) = user {
            a.insert(attr::CONNECTION_USERNAME, Value::Str(u.into()));
        }
        a
    }

    #[test]
    fn default_roles_behave_as_documented() {
        let iam = IamConfig::builtin();
        let connect = |role: &str, local: bool| {
            let mut a = attrs(local, Some("u"));
            a.insert(attr::TUNNEL_SERVICE_ID, Value::Str("ssh".into()));
            iam.decide(role, Action::TunnelConnect, &a).allowed
        };
        assert!(connect("Owner", false) && connect("Owner", true));
        assert!(connect("Standard", false) && connect("Standard", true));
        assert!(connect("Guest", true) && !connect("Guest", false));
        assert!(!connect("Unpaired", true));
        assert!(!connect("NoSuchRole", true));
        assert!(
            iam.decide(
                "Unpaired",
                Action::PairingPasswordInvite,
                &attrs(false, None)
            )
            .allowed
        );
        assert!(
            !iam.decide("Guest", Action::IamListUsers, &attrs(true, Some("g")))
                .allowed
        );
        // Own user only.
        let mut a = attrs(true, Some("g"));
        a.insert(attr::IAM_USERNAME, Value::Str("g".into()));
        assert!(iam.decide("Guest", Action::IamDeleteUser, &a).allowed);
        a.insert(attr::IAM_USERNAME, Value::Str("owner".into()));
        assert!(!iam.decide("Guest", Action::IamDeleteUser, &a).allowed);
        // Unpaired has no Connection:Username, so ${Connection:Username} never matches.
        let mut a = attrs(true, None);
        a.insert(attr::IAM_USERNAME, Value::Str(String::new()));
        assert!(!iam.decide("Standard", Action::IamGetUser, &a).allowed);
    }

    #[test]
    fn deny_wins_and_the_deciding_statement_is_reported() {
        let text = r#"version = 1
[settings]
unpaired_role = "U"
initial_role = "A"
open_pairing_role = "U"
[[policy]]
id = "all"
[[policy.statement]]
effect = "allow"
actions = ["*"]
[[policy]]
id = "nocam"
[[policy.statement]]
effect = "deny"
actions = ["Tunnel:Connect"]
conditions = [{ StringEquals = { "Tunnel:ServiceType" = ["rtsp", "http"] } }]
[[role]]
id = "A"
policies = ["all", "nocam"]
[[role]]
id = "U"
policies = []
"#;
        let iam = IamConfig::from_toml(text, None).unwrap();
        let mut a = attrs(true, Some("x"));
        a.insert(attr::TUNNEL_SERVICE_TYPE, Value::Str("rtsp".into()));
        let d = iam.decide("A", Action::TunnelConnect, &a);
        assert!(!d.allowed);
        let (policy, idx, st) = d.by.clone().unwrap();
        assert_eq!((&*policy, idx, st.line), ("nocam", 1, 13));
        assert!(
            d.to_string()
                .starts_with("DENY by policy 'nocam' statement 1 (line 13)")
        );
        a.insert(attr::TUNNEL_SERVICE_TYPE, Value::Str("ssh".into()));
        assert!(iam.decide("A", Action::TunnelConnect, &a).allowed);
        // A deny conditioned on a missing attribute does not apply.
        a.remove(attr::TUNNEL_SERVICE_TYPE);
        assert!(iam.decide("A", Action::TunnelConnect, &a).allowed);
        let d = iam.decide("U", Action::TunnelConnect, &a);
        assert!(!d.allowed && d.by.is_none());
        assert!(d.to_string().contains("deny by default"));
    }
}
