//! Access control: roles made of policies made of statements, evaluated per action.
//!
//! Kind: pure. No IO except [`IamConfig::load`] at the edge (reads `iam.toml`).
//!
//! Model (Nabto Edge's IAM, `../reference`): a user has one role; a role lists policies; a policy
//! is a list of statements `{ effect, actions, conditions }`. A statement *applies* to a request
//! when it lists the action (exactly, or by a `Prefix:*` / `*` pattern) and every condition holds.
//! Any applicable `deny` wins; otherwise any applicable `allow` allows; otherwise the request is
//! denied. [`IamConfig::decide`] returns which statement decided, for logs and
//! `tunnel-device iam explain`.
//!
//! Conditions test request attributes (see [`attr`]): `StringEquals` / `StringNotEquals` (any of
//! the listed values), `Bool`, and `NumericEquals`, `NumericNotEquals`, `NumericLessThan`,
//! `NumericLessThanEquals`, `NumericGreaterThan`, `NumericGreaterThanEquals`. Values may contain
//! `${Attribute}`, replaced by that attribute of the request. A condition on a missing attribute
//! does not hold (so a deny that depends on it does not apply, and neither does an allow).
//!
//! Without an `iam.toml` the device uses [`DEFAULT_IAM_TOML`]; `tunnel-device iam defaults` prints
//! it as a starting point. Every error in the file names its line.

mod eval;
mod model;
mod parse;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

pub use model::{
    Action, Attrs, Decision, Effect, Policy, Role, Statement, UnknownAction, Value, attr,
};

/// The whole access-control configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct IamConfig {
    policies: BTreeMap<String, Policy>,
    roles: Vec<Role>,
    /// Role of a key that belongs to no user.
    pub unpaired_role: String,
    /// Role given by local initial pairing and by `init`'s owner invitation.
    pub initial_role: String,
    /// Role of users created by local open and password open pairing.
    pub open_pairing_role: String,
    /// Where it came from: a path, or `None` for the built-in defaults.
    pub source: Option<PathBuf>,
}

/// `iam.toml` could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {message}")]
pub struct IamError {
    /// The file (or "built-in IAM defaults").
    pub path: String,
    /// What is wrong, with its line.
    pub message: String,
}

/// A role name that `iam.toml` does not define.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role '{role}'; roles are {}", .defined.join(", "))]
pub struct UnknownRole {
    /// The name asked for.
    pub role: String,
    /// The roles that exist.
    pub defined: Vec<String>,
}

/// A user whose role `iam.toml` does not define.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("user '{user}' has role '{role}', which {source_name} does not define (roles: {})", .defined.join(", "))]
pub struct RoleError {
    /// The user.
    pub user: String,
    /// Its role.
    pub role: String,
    /// Where the policies came from (a path, or "the built-in IAM").
    pub source_name: String,
    /// The roles that exist.
    pub defined: Vec<String>,
}

/// The built-in access control (used when the device home has no `iam.toml`).
pub const DEFAULT_IAM_TOML: &str = include_str!("default.toml");

impl IamConfig {
    /// The built-in defaults.
    pub fn builtin() -> Self {
        // The defaults are part of the program and covered by tests; should they ever fail to
        // parse, deny everything rather than panic.
        Self::from_toml(DEFAULT_IAM_TOML, None).unwrap_or_else(|_| Self {
            policies: BTreeMap::new(),
            roles: Vec::new(),
            unpaired_role: "Unpaired".into(),
            initial_role: "Owner".into(),
            open_pairing_role: "Guest".into(),
            source: None,
        })
    }

    /// `path` if it exists, else the built-in defaults.
    ///
    /// # Errors
    /// [`IamError`] naming the file and line.
    pub fn load(path: &Path) -> Result<Self, IamError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&text, Some(path.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::builtin()),
            Err(e) => Err(IamError {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// Whether `role` is defined.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r.id == role)
    }

    /// Role ids, in file order.
    pub fn role_ids(&self) -> Vec<String> {
        self.roles.iter().map(|r| r.id.clone()).collect()
    }

    /// Where the policies came from, for messages.
    pub fn source_name(&self) -> String {
        self.source.as_ref().map_or_else(
            || "the built-in IAM".to_string(),
            |p| p.display().to_string(),
        )
    }

    /// Normalizes a role name typed by a user (case-insensitive) to its defined spelling.
    ///
    /// # Errors
    /// [`UnknownRole`] listing the roles.
    pub fn parse_role(&self, role: &str) -> Result<String, UnknownRole> {
        self.roles
            .iter()
            .find(|r| r.id.eq_ignore_ascii_case(role))
            .map(|r| r.id.clone())
            .ok_or_else(|| UnknownRole {
                role: role.to_string(),
                defined: self.role_ids(),
            })
    }
}

/// Checks that every user's role exists, naming the first offender.
///
/// # Errors
/// [`RoleError`] naming the user and role.
pub fn check_roles<'a>(
    iam: &IamConfig,
    users: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), RoleError> {
    let mut seen = HashSet::new();
    for (user, role) in users {
        if seen.insert(role) && !iam.has_role(role) {
            return Err(RoleError {
                user: user.to_string(),
                role: role.to_string(),
                source_name: iam.source_name(),
                defined: iam.role_ids(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_parses_and_has_the_documented_roles() {
        let iam = IamConfig::from_toml(DEFAULT_IAM_TOML, None).unwrap();
        assert_eq!(iam.role_ids(), ["Owner", "Standard", "Guest", "Unpaired"]);
        assert_eq!(iam.unpaired_role, "Unpaired");
        assert_eq!(iam.initial_role, "Owner");
        assert_eq!(iam.open_pairing_role, "Guest");
        assert_eq!(IamConfig::builtin(), iam);
    }

    #[test]
    fn user_roles_are_checked() {
        let iam = IamConfig::builtin();
        assert!(check_roles(&iam, [("a", "Owner"), ("b", "Guest")]).is_ok());
        let e = check_roles(&iam, [("a", "Owner"), ("b", "Admin")]).unwrap_err();
        assert_eq!((e.user.as_str(), e.role.as_str()), ("b", "Admin"));
        assert!(e.to_string().contains("user 'b' has role 'Admin'"), "{e}");
        assert_eq!(iam.parse_role("owner").unwrap(), "Owner");
        assert!(iam.parse_role("admin").is_err());
    }
}
