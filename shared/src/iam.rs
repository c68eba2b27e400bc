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

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

/// Every action the device authorizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// See which pairing modes this connection may use.
    PairingGet,
    /// Become the first user (local connections, once).
    PairingLocalInitial,
    /// Become a new user with the open-pairing role (local connections).
    PairingLocalOpen,
    /// Claim an invited user with its one-time password.
    PairingPasswordInvite,
    /// Become a new user with the shared open-pairing password.
    PairingPasswordOpen,
    /// List services.
    TunnelListServices,
    /// See one service (also filters the list, per service).
    TunnelGetService,
    /// Open a tunnel to a service (checked at every stream open).
    TunnelConnect,
    /// List users.
    IamListUsers,
    /// See a user.
    IamGetUser,
    /// Create a user (an invitation with a one-time password).
    IamCreateUser,
    /// Delete a user.
    IamDeleteUser,
    /// Change a user's role.
    IamSetUserRole,
    /// Change a user's display name.
    IamSetUserDisplayName,
    /// Add a key to a user.
    IamAddFingerprint,
    /// Remove a key from a user.
    IamRemoveFingerprint,
    /// List roles.
    IamListRoles,
    /// Read pairing settings (including the open-pairing secrets).
    IamGetSettings,
    /// Enable or disable pairing modes.
    IamSetSettings,
    /// Rename the device.
    DeviceSetName,
}

impl Action {
    /// All actions, in a stable order.
    pub const ALL: [Self; 20] = [
        Self::PairingGet,
        Self::PairingLocalInitial,
        Self::PairingLocalOpen,
        Self::PairingPasswordInvite,
        Self::PairingPasswordOpen,
        Self::TunnelListServices,
        Self::TunnelGetService,
        Self::TunnelConnect,
        Self::IamListUsers,
        Self::IamGetUser,
        Self::IamCreateUser,
        Self::IamDeleteUser,
        Self::IamSetUserRole,
        Self::IamSetUserDisplayName,
        Self::IamAddFingerprint,
        Self::IamRemoveFingerprint,
        Self::IamListRoles,
        Self::IamGetSettings,
        Self::IamSetSettings,
        Self::DeviceSetName,
    ];

    /// The name used in `iam.toml`, e.g. `Tunnel:Connect`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PairingGet => "Pairing:Get",
            Self::PairingLocalInitial => "Pairing:LocalInitial",
            Self::PairingLocalOpen => "Pairing:LocalOpen",
            Self::PairingPasswordInvite => "Pairing:PasswordInvite",
            Self::PairingPasswordOpen => "Pairing:PasswordOpen",
            Self::TunnelListServices => "Tunnel:ListServices",
            Self::TunnelGetService => "Tunnel:GetService",
            Self::TunnelConnect => "Tunnel:Connect",
            Self::IamListUsers => "IAM:ListUsers",
            Self::IamGetUser => "IAM:GetUser",
            Self::IamCreateUser => "IAM:CreateUser",
            Self::IamDeleteUser => "IAM:DeleteUser",
            Self::IamSetUserRole => "IAM:SetUserRole",
            Self::IamSetUserDisplayName => "IAM:SetUserDisplayName",
            Self::IamAddFingerprint => "IAM:AddFingerprint",
            Self::IamRemoveFingerprint => "IAM:RemoveFingerprint",
            Self::IamListRoles => "IAM:ListRoles",
            Self::IamGetSettings => "IAM:GetSettings",
            Self::IamSetSettings => "IAM:SetSettings",
            Self::DeviceSetName => "Device:SetName",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown action '{s}'"))
    }
}

/// Attribute names a condition can test.
pub mod attr {
    /// `true` when the connection is local (DESIGN §6).
    pub const CONNECTION_IS_LOCAL: &str = "Connection:IsLocal";
    /// The connected user's name (absent when unpaired).
    pub const CONNECTION_USERNAME: &str = "Connection:Username";
    /// The connection's key fingerprint (64 hex).
    pub const CONNECTION_FINGERPRINT: &str = "Connection:Fingerprint";
    /// The user an IAM action is about.
    pub const IAM_USERNAME: &str = "IAM:Username";
    /// The role an IAM action sets or creates.
    pub const IAM_ROLE_ID: &str = "IAM:RoleId";
    /// The service a tunnel action is about.
    pub const TUNNEL_SERVICE_ID: &str = "Tunnel:ServiceId";
    /// That service's type.
    pub const TUNNEL_SERVICE_TYPE: &str = "Tunnel:ServiceType";
    /// All of them.
    pub const ALL: [&str; 7] = [
        CONNECTION_IS_LOCAL,
        CONNECTION_USERNAME,
        CONNECTION_FINGERPRINT,
        IAM_USERNAME,
        IAM_ROLE_ID,
        TUNNEL_SERVICE_ID,
        TUNNEL_SERVICE_TYPE,
    ];
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text.
    Str(String),
    /// A boolean.
    Bool(bool),
    /// A number.
    Num(f64),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Str(s) => f.write_str(s),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Num(n) => write!(f, "{n}"),
        }
    }
}

/// The attributes of one request.
pub type Attrs = BTreeMap<&'static str, Value>;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Allow.
    Allow,
    /// Deny.
    Deny,
}

#[derive(Debug, Clone, PartialEq)]
enum Pattern {
    Exact(Action),
    Prefix(String),
    Any,
}

impl Pattern {
    fn matches(&self, action: Action) -> bool {
        match self {
            Self::Exact(a) => *a == action,
            Self::Prefix(p) => action.as_str().starts_with(p.as_str()),
            Self::Any => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum NumOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Condition {
    StringEquals(&'static str, Vec<String>),
    StringNotEquals(&'static str, Vec<String>),
    Bool(&'static str, bool),
    Numeric(NumOp, &'static str, f64),
}

/// One statement of a policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    effect: Effect,
    actions: Vec<Pattern>,
    conditions: Vec<Condition>,
    /// Line in `iam.toml` (or the built-in defaults) where it starts.
    pub line: usize,
    text: String,
}

/// A named list of statements.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Its id.
    pub id: Arc<str>,
    statements: Vec<Arc<Statement>>,
}

/// A named list of policies.
#[derive(Debug, Clone, PartialEq)]
pub struct Role {
    /// Its id.
    pub id: String,
    /// Policy ids, in order.
    pub policies: Vec<String>,
}

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

/// Which statement decided, for logs and `iam explain`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The outcome.
    pub allowed: bool,
    /// `(policy id, statement index from 1, statement)`; `None` means "no statement applied:
    /// denied by default" (or the role does not exist).
    pub by: Option<(Arc<str>, usize, Arc<Statement>)>,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "ALLOW" } else { "DENY" };
        match &self.by {
            Some((policy, i, st)) => write!(
                f,
                "{verdict} by policy '{policy}' statement {i} (line {}): {}",
                st.line, st.text
            ),
            None => write!(f, "{verdict}: no statement applies (deny by default)"),
        }
    }
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

/// The built-in access control (used when the device home has no `iam.toml`).
pub const DEFAULT_IAM_TOML: &str = r#"# tunnel-device access control (built-in defaults).
# Copy this file to iam.toml in the device home to change it; a running device reloads it
# when it changes. Deny wins; anything not allowed is denied.
version = 1

[settings]
unpaired_role = "Unpaired"      # role of a key that belongs to no user
initial_role = "Owner"          # role of the first user (local initial pairing, init's invitation)
open_pairing_role = "Guest"     # role of users created by local open / password open pairing

[[policy]]
id = "Pairing"
[[policy.statement]]
effect = "allow"
actions = ["Pairing:*"]

[[policy]]
id = "PairingInfo"
[[policy.statement]]
effect = "allow"
actions = ["Pairing:Get"]

[[policy]]
id = "Tunnel"
[[policy.statement]]
effect = "allow"
actions = ["Tunnel:ListServices", "Tunnel:GetService", "Tunnel:Connect"]

[[policy]]
id = "TunnelLocalOnly"
[[policy.statement]]
effect = "allow"
actions = ["Tunnel:ListServices", "Tunnel:GetService", "Tunnel:Connect"]
conditions = [{ Bool = { "Connection:IsLocal" = true } }]

[[policy]]
id = "ManageOwnUser"
[[policy.statement]]
effect = "allow"
actions = ["IAM:GetUser", "IAM:SetUserDisplayName", "IAM:DeleteUser"]
conditions = [{ StringEquals = { "IAM:Username" = ["${Connection:Username}"] } }]
[[policy.statement]]
effect = "allow"
actions = ["IAM:ListRoles"]

[[policy]]
id = "ManageAll"
[[policy.statement]]
effect = "allow"
actions = ["IAM:*", "Device:*", "Pairing:Get"]

[[role]]
id = "Owner"
policies = ["Tunnel", "ManageAll"]

[[role]]
id = "Standard"
policies = ["PairingInfo", "Tunnel", "ManageOwnUser"]

[[role]]
id = "Guest"
policies = ["PairingInfo", "TunnelLocalOnly", "ManageOwnUser"]

[[role]]
id = "Unpaired"
policies = ["Pairing"]
"#;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIam {
    version: Spanned<u32>,
    settings: Spanned<RawSettings>,
    #[serde(default, rename = "policy")]
    policies: Vec<Spanned<RawPolicy>>,
    #[serde(default, rename = "role")]
    roles: Vec<Spanned<RawRole>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    unpaired_role: Spanned<String>,
    initial_role: Spanned<String>,
    open_pairing_role: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    id: Spanned<String>,
    #[serde(default, rename = "statement")]
    statements: Vec<Spanned<RawStatement>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatement {
    effect: Spanned<String>,
    actions: Vec<Spanned<String>>,
    #[serde(default)]
    conditions: Vec<Spanned<BTreeMap<String, BTreeMap<String, toml::Value>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    id: Spanned<String>,
    policies: Vec<Spanned<String>>,
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map_or(1, |t| t.bytes().filter(|&b| b == b'\n').count() + 1)
}

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

    /// Parses and validates `iam.toml` text.
    ///
    /// # Errors
    /// [`IamError`] with the line of the first problem.
    pub fn from_toml(text: &str, source: Option<PathBuf>) -> Result<Self, IamError> {
        let path = source.as_ref().map_or_else(
            || "built-in IAM defaults".to_string(),
            |p| p.display().to_string(),
        );
        let err = |offset: usize, message: String| IamError {
            path: path.clone(),
            message: format!("line {}: {message}", line_of(text, offset)),
        };
        let raw: RawIam = toml::from_str(text).map_err(|e| IamError {
            path: path.clone(),
            message: e.to_string().trim_end().to_string(),
        })?;
        if *raw.version.get_ref() != 1 {
            return Err(err(raw.version.span().start, "version must be 1".into()));
        }
        let mut policies = BTreeMap::new();
        for p in &raw.policies {
            let p = p.get_ref();
            let id = p.id.get_ref().clone();
            crate::config::check_id("policy id", &id).map_err(|e| err(p.id.span().start, e.0))?;
            let mut statements = Vec::new();
            for s in &p.statements {
                statements.push(Arc::new(parse_statement(text, s, &err)?));
            }
            if policies
                .insert(
                    id.clone(),
                    Policy {
                        id: id.into(),
                        statements,
                    },
                )
                .is_some()
            {
                return Err(err(
                    p.id.span().start,
                    format!("policy '{}' is defined twice", p.id.get_ref()),
                ));
            }
        }
        let mut roles: Vec<Role> = Vec::new();
        for r in &raw.roles {
            let r = r.get_ref();
            let id = r.id.get_ref().clone();
            crate::config::check_id("role id", &id).map_err(|e| err(r.id.span().start, e.0))?;
            if roles.iter().any(|x| x.id == id) {
                return Err(err(
                    r.id.span().start,
                    format!("role '{id}' is defined twice"),
                ));
            }
            let mut list = Vec::new();
            for p in &r.policies {
                if !policies.contains_key(p.get_ref()) {
                    return Err(err(
                        p.span().start,
                        format!(
                            "role '{id}' uses policy '{}', which is not defined",
                            p.get_ref()
                        ),
                    ));
                }
                list.push(p.get_ref().clone());
            }
            roles.push(Role { id, policies: list });
        }
        let settings = raw.settings.get_ref();
        for s in [
            &settings.unpaired_role,
            &settings.initial_role,
            &settings.open_pairing_role,
        ] {
            if !roles.iter().any(|r| &r.id == s.get_ref()) {
                return Err(err(
                    s.span().start,
                    format!("role '{}' is not defined", s.get_ref()),
                ));
            }
        }
        Ok(Self {
            policies,
            unpaired_role: settings.unpaired_role.get_ref().clone(),
            initial_role: settings.initial_role.get_ref().clone(),
            open_pairing_role: settings.open_pairing_role.get_ref().clone(),
            roles,
            source,
        })
    }

    /// Whether `role` is defined.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r.id == role)
    }

    /// Role ids, in file order.
    pub fn role_ids(&self) -> Vec<String> {
        self.roles.iter().map(|r| r.id.clone()).collect()
    }

    /// Normalizes a role name typed by a user (case-insensitive) to its defined spelling.
    ///
    /// # Errors
    /// A message listing the roles.
    pub fn parse_role(&self, role: &str) -> Result<String, String> {
        self.roles
            .iter()
            .find(|r| r.id.eq_ignore_ascii_case(role))
            .map(|r| r.id.clone())
            .ok_or_else(|| {
                format!(
                    "unknown role '{role}'; roles are {}",
                    self.role_ids().join(", ")
                )
            })
    }

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

fn parse_statement(
    text: &str,
    s: &Spanned<RawStatement>,
    err: &impl Fn(usize, String) -> IamError,
) -> Result<Statement, IamError> {
    let line = line_of(text, s.span().start);
    let raw = s.get_ref();
    let effect = match raw.effect.get_ref().as_str() {
        "allow" | "Allow" => Effect::Allow,
        "deny" | "Deny" => Effect::Deny,
        other => {
            return Err(err(
                raw.effect.span().start,
                format!("effect must be \"allow\" or \"deny\", not \"{other}\""),
            ));
        }
    };
    if raw.actions.is_empty() {
        return Err(err(
            s.span().start,
            "a statement needs at least one action".into(),
        ));
    }
    let mut actions = Vec::new();
    for a in &raw.actions {
        let name = a.get_ref();
        let pattern = if name == "*" {
            Pattern::Any
        } else if let Some(prefix) = name.strip_suffix('*') {
            if !prefix.ends_with(':') || !Action::ALL.iter().any(|x| x.as_str().starts_with(prefix))
            {
                return Err(err(a.span().start, format!("'{name}' matches no action")));
            }
            Pattern::Prefix(prefix.to_string())
        } else {
            Pattern::Exact(name.parse().map_err(|e: String| {
                err(
                    a.span().start,
                    format!(
                        "{e}; actions are {}",
                        Action::ALL.map(Action::as_str).join(", ")
                    ),
                )
            })?)
        };
        actions.push(pattern);
    }
    let mut conditions = Vec::new();
    for c in &raw.conditions {
        let at = c.span().start;
        for (op, map) in c.get_ref() {
            for (name, value) in map {
                let attr = attr::ALL.into_iter().find(|a| a == name).ok_or_else(|| {
                    err(
                        at,
                        format!(
                            "unknown attribute '{name}'; attributes are {}",
                            attr::ALL.join(", ")
                        ),
                    )
                })?;
                conditions.push(parse_condition(op, attr, value).map_err(|m| err(at, m))?);
            }
        }
    }
    let snippet = format!(
        "{} {}{}",
        match effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        },
        raw.actions
            .iter()
            .map(|a| a.get_ref().as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if conditions.is_empty() {
            String::new()
        } else {
            format!(" when {}", describe_conditions(&conditions))
        }
    );
    Ok(Statement {
        effect,
        actions,
        conditions,
        line,
        text: snippet,
    })
}

fn describe_conditions(conds: &[Condition]) -> String {
    conds
        .iter()
        .map(|c| match c {
            Condition::StringEquals(a, v) => format!("{a} is one of {v:?}"),
            Condition::StringNotEquals(a, v) => format!("{a} is none of {v:?}"),
            Condition::Bool(a, b) => format!("{a} = {b}"),
            Condition::Numeric(op, a, n) => format!("{a} {op:?} {n}"),
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

fn strings(value: &toml::Value) -> Result<Vec<String>, String> {
    match value {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "string conditions take strings".to_string())
            })
            .collect(),
        _ => Err("string conditions take a string or a non-empty list of strings".into()),
    }
}

fn parse_condition(op: &str, attr: &'static str, value: &toml::Value) -> Result<Condition, String> {
    let num = |v: &toml::Value| -> Result<f64, String> {
        match v {
            toml::Value::Integer(i) => Ok(*i as f64),
            toml::Value::Float(f) => Ok(*f),
            toml::Value::Array(a) if a.len() == 1 => match &a[0] {
                toml::Value::Integer(i) => Ok(*i as f64),
                toml::Value::Float(f) => Ok(*f),
                _ => Err("numeric conditions take a number".into()),
            },
            _ => Err("numeric conditions take a number".into()),
        }
    };
    Ok(match op {
        "StringEquals" => Condition::StringEquals(attr, strings(value)?),
        "StringNotEquals" => Condition::StringNotEquals(attr, strings(value)?),
        "Bool" => Condition::Bool(
            attr,
            match value {
                toml::Value::Boolean(b) => *b,
                toml::Value::Array(a) if a.len() == 1 && a[0].is_bool() => {
                    a[0].as_bool().unwrap_or(false)
                }
                toml::Value::String(s) if s == "true" || s == "false" => s == "true",
                _ => return Err("Bool conditions take true or false".into()),
            },
        ),
        "NumericEquals" => Condition::Numeric(NumOp::Eq, attr, num(value)?),
        "NumericNotEquals" => Condition::Numeric(NumOp::Ne, attr, num(value)?),
        "NumericLessThan" => Condition::Numeric(NumOp::Lt, attr, num(value)?),
        "NumericLessThanEquals" => Condition::Numeric(NumOp::Le, attr, num(value)?),
        "NumericGreaterThan" => Condition::Numeric(NumOp::Gt, attr, num(value)?),
        "NumericGreaterThanEquals" => Condition::Numeric(NumOp::Ge, attr, num(value)?),
        other => {
            return Err(format!(
                "unknown condition '{other}'; use StringEquals, StringNotEquals, Bool, \
                 NumericEquals, NumericNotEquals, NumericLessThan, NumericLessThanEquals, \
                 NumericGreaterThan or NumericGreaterThanEquals"
            ));
        }
    })
}

impl Statement {
    fn applies(&self, action: Action, attrs: &Attrs) -> bool {
        self.actions.iter().any(|p| p.matches(action))
            && self.conditions.iter().all(|c| c.holds(attrs))
    }
}

/// Replaces `${Name}` with the attribute's value; `None` if a referenced attribute is missing.
fn substitute(template: &str, attrs: &Attrs) -> Option<String> {
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
    fn holds(&self, attrs: &Attrs) -> bool {
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

/// Checks that every user's role exists, naming the first offender.
///
/// # Errors
/// A message naming the user and role.
pub fn check_roles<'a>(
    iam: &IamConfig,
    users: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), String> {
    let mut seen = HashSet::new();
    for (user, role) in users {
        if seen.insert(role) && !iam.has_role(role) {
            return Err(format!(
                "user '{user}' has role '{role}', which {} does not define (roles: {})",
                iam.source.as_ref().map_or_else(
                    || "the built-in IAM".to_string(),
                    |p| p.display().to_string()
                ),
                iam.role_ids().join(", ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(local: bool, user: Option<&str>) -> Attrs {
        let mut a = Attrs::new();
        a.insert(attr::CONNECTION_IS_LOCAL, Value::Bool(local));
        if let Some(u) = user {
            a.insert(attr::CONNECTION_USERNAME, Value::Str(u.into()));
        }
        a
    }

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

    #[test]
    fn conditions() {
        let mut a = Attrs::new();
        a.insert(attr::TUNNEL_SERVICE_ID, Value::Str("cam-1".into()));
        a.insert(attr::CONNECTION_USERNAME, Value::Str("bob".into()));
        a.insert(attr::IAM_USERNAME, Value::Str("bob".into()));
        a.insert(attr::IAM_ROLE_ID, Value::Num(3.0));
        let c = |op: &str, name: &'static str, v: toml::Value| {
            parse_condition(op, name, &v).unwrap().holds(&a)
        };
        let s = |x: &str| toml::Value::String(x.into());
        assert!(c("StringEquals", attr::TUNNEL_SERVICE_ID, s("cam-1")));
        assert!(c(
            "StringEquals",
            attr::TUNNEL_SERVICE_ID,
            toml::Value::Array(vec![s("x"), s("cam-1")])
        ));
        assert!(!c("StringNotEquals", attr::TUNNEL_SERVICE_ID, s("cam-1")));
        assert!(c("StringNotEquals", attr::TUNNEL_SERVICE_ID, s("cam-2")));
        assert!(c(
            "StringEquals",
            attr::IAM_USERNAME,
            s("${Connection:Username}")
        ));
        assert!(!c(
            "StringEquals",
            attr::TUNNEL_SERVICE_ID,
            s("cam-${IAM:RoleId}")
        ));
        assert!(!c(
            "StringEquals",
            attr::IAM_USERNAME,
            s("${Connection:Fingerprint}")
        ));
        assert!(!c("StringEquals", attr::TUNNEL_SERVICE_TYPE, s("x")));
        assert!(!c("StringNotEquals", attr::TUNNEL_SERVICE_TYPE, s("x")));
        assert!(c(
            "NumericLessThan",
            attr::IAM_ROLE_ID,
            toml::Value::Integer(4)
        ));
        assert!(!c(
            "NumericGreaterThan",
            attr::IAM_ROLE_ID,
            toml::Value::Integer(4)
        ));
        assert!(c(
            "NumericEquals",
            attr::IAM_ROLE_ID,
            toml::Value::Float(3.0)
        ));
        assert!(!c(
            "Bool",
            attr::CONNECTION_IS_LOCAL,
            toml::Value::Boolean(true)
        ));
        assert_eq!(
            substitute("a${IAM:Username}b", &a).as_deref(),
            Some("abobb")
        );
        assert_eq!(substitute("${nope}", &a), None);
        assert_eq!(substitute("${unterminated", &a), None);
    }

    #[test]
    fn errors_name_the_line() {
        let base = DEFAULT_IAM_TOML;
        let cases: &[(&str, &str, &str)] = &[
            (
                "actions = [\"Pairing:*\"]",
                "actions = [\"Pairing:Teleport\"]",
                "line 15: unknown action 'Pairing:Teleport'",
            ),
            (
                "actions = [\"Pairing:*\"]",
                "actions = [\"Nope:*\"]",
                "line 15: 'Nope:*' matches no action",
            ),
            (
                "effect = \"allow\"\nactions = [\"Pairing:*\"]",
                "effect = \"maybe\"\nactions = [\"Pairing:*\"]",
                "line 14: effect must be",
            ),
            (
                "policies = [\"Tunnel\", \"ManageAll\"]",
                "policies = [\"Tunnel\", \"ManageAl\"]",
                "policy 'ManageAl', which is not defined",
            ),
            (
                "open_pairing_role = \"Guest\"",
                "open_pairing_role = \"Visitor\"",
                "line 9: role 'Visitor' is not defined",
            ),
            (
                "{ Bool = { \"Connection:IsLocal\" = true } }",
                "{ Bool = { \"Connection:IsRemote\" = true } }",
                "unknown attribute 'Connection:IsRemote'",
            ),
            (
                "{ Bool = { \"Connection:IsLocal\" = true } }",
                "{ Maybe = { \"Connection:IsLocal\" = true } }",
                "unknown condition 'Maybe'",
            ),
            ("version = 1", "version = 2", "line 4: version must be 1"),
            (
                "id = \"Guest\"",
                "id = \"Guest\"\nextra = 1",
                "unknown field `extra`",
            ),
        ];
        for (from, to, needle) in cases {
            assert!(base.contains(from), "{from}");
            let text = base.replacen(from, to, 1);
            let e = IamConfig::from_toml(&text, Some("iam.toml".into())).unwrap_err();
            assert!(e.to_string().contains(needle), "{to}: {e}");
            assert!(e.to_string().starts_with("iam.toml: "), "{e}");
        }
    }

    #[test]
    fn user_roles_are_checked() {
        let iam = IamConfig::builtin();
        assert!(check_roles(&iam, [("a", "Owner"), ("b", "Guest")]).is_ok());
        let e = check_roles(&iam, [("a", "Owner"), ("b", "Admin")]).unwrap_err();
        assert!(e.contains("user 'b' has role 'Admin'"), "{e}");
        assert_eq!(iam.parse_role("owner").unwrap(), "Owner");
        assert!(iam.parse_role("admin").is_err());
    }
}
