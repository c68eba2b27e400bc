//! The IAM model: actions, attributes, statements, policies, roles and decisions.
//!
//! Kind: pure.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

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
    /// Replace a user's server-connect token.
    IamRotateToken,
}

impl Action {
    /// All actions, in a stable order.
    pub const ALL: [Self; 21] = [
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
        Self::IamRotateToken,
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
            Self::IamRotateToken => "IAM:RotateToken",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no [`Action`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown action '{0}'")]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAction(s.to_string()))
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
pub(super) enum Pattern {
    Exact(Action),
    Prefix(String),
    Any,
}

impl Pattern {
    pub(super) fn matches(&self, action: Action) -> bool {
        match self {
            Self::Exact(a) => *a == action,
            Self::Prefix(p) => action.as_str().starts_with(p.as_str()),
            Self::Any => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum NumOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Condition {
    StringEquals(&'static str, Vec<String>),
    StringNotEquals(&'static str, Vec<String>),
    Bool(&'static str, bool),
    Numeric(NumOp, &'static str, f64),
}

/// One statement of a policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub(super) effect: Effect,
    pub(super) actions: Vec<Pattern>,
    pub(super) conditions: Vec<Condition>,
    /// Line in `iam.toml` (or the built-in defaults) where it starts.
    pub line: usize,
    pub(super) text: String,
}

/// A named list of statements.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Its id.
    pub id: Arc<str>,
    pub(super) statements: Vec<Arc<Statement>>,
}

/// A named list of policies.
#[derive(Debug, Clone, PartialEq)]
pub struct Role {
    /// Its id.
    pub id: String,
    /// Policy ids, in order.
    pub policies: Vec<String>,
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
