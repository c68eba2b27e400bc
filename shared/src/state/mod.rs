//! The device's machine-written state (`state.json`): users and their key fingerprints.
//!
//! Kind: pure model and validation ([`DeviceState`]) plus [`StateStore`] (in `store`), which does
//! the file IO.
//!
//! Invariants:
//! - A missing, truncated or corrupt file is an error naming the file. It never becomes an empty
//!   state, because an empty device could be re-paired by anyone.
//! - Every change is a locked read-modify-write: take `state.lock`, re-read the file, apply the
//!   change, validate, write atomically (mode 0600). The running device and `tunnel-device user …`
//!   therefore never overwrite each other's changes; the device notices the new file and reloads.

mod store;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{ValueError, check_id};
use crate::iam::RoleError;
use crate::identity::Fingerprint;
use crate::pairing::{PairingMode, SECRET_LEN};
use crate::secret::Secret;

/// Current `state.json` format version.
pub const STATE_VERSION: u32 = 1;

/// The whole state file.
///
/// Security-relevant fields have no serde defaults: a damaged key name is an error, never a
/// silently defaulted (possibly more open) value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    /// Format version; must equal [`STATE_VERSION`].
    pub version: u32,
    /// Users.
    pub users: Vec<User>,
    /// Pairing switches and open-pairing secrets.
    pub pairing: PairingState,
}

/// A user on the device's access-control list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Unique name.
    pub username: String,
    /// Optional human-friendly name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Role id (defined in `iam.toml` or the built-in IAM).
    pub role: String,
    /// The client keys that act as this user (empty for an invitation not yet claimed).
    pub fingerprints: Vec<UserKey>,
    /// Server-connect token for remote connections.
    pub sct: Secret,
    /// One-time invitation password; deleted when the invitation is claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// The password of the invitation this user's key claimed. It can pair nothing; it lets the
    /// device tell a client that proves it ("this invitation was already used") from one with a
    /// wrong password, without revealing anything to someone who does not know it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed: Option<Secret>,
}

/// One client key of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserKey {
    /// The key's fingerprint.
    pub fingerprint: Fingerprint,
    /// Optional label, e.g. "alice's laptop".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Pairing switches (all off unless enabled) and the open-pairing secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairingState {
    /// Local initial pairing enabled.
    pub local_initial: bool,
    /// Local open pairing enabled.
    pub local_open: bool,
    /// Password invite pairing enabled.
    pub password_invite: bool,
    /// Password open pairing enabled.
    pub password_open: bool,
    /// Local initial pairing was used (it works once).
    pub initial_done: bool,
    /// Shared password of password open pairing.
    pub open_password: Secret,
    /// Server-connect token that lets a remote client reach the device for password open pairing.
    pub open_sct: Secret,
}

impl PairingState {
    /// Whether `mode` is switched on.
    pub fn enabled(&self, mode: PairingMode) -> bool {
        match mode {
            PairingMode::LocalInitial => self.local_initial,
            PairingMode::LocalOpen => self.local_open,
            PairingMode::PasswordInvite => self.password_invite,
            PairingMode::PasswordOpen => self.password_open,
        }
    }

    /// Switches `mode` on or off.
    pub fn set(&mut self, mode: PairingMode, on: bool) {
        match mode {
            PairingMode::LocalInitial => self.local_initial = on,
            PairingMode::LocalOpen => self.local_open = on,
            PairingMode::PasswordInvite => self.password_invite = on,
            PairingMode::PasswordOpen => self.password_open = on,
        }
    }
}

/// A state file or change could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state file does not exist.
    #[error(
        "'{path}' does not exist: this device home is not initialised. Run `tunnel-device init` \
         (or pass the right --home)",
        path = .0.display()
    )]
    Missing(PathBuf),
    /// The state file is corrupt.
    #[error(
        "'{path}' is corrupt: {reason}. The device will not start with a damaged access list; \
         restore it from a backup or fix it by hand",
        path = .path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: CorruptState,
    },
    /// The file, or the home it is in, could be changed by another local user.
    #[error("'{path}' {reason}", path = .path.display())]
    Untrusted {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        reason: crate::fsutil::Untrusted,
    },
    /// Reading, writing or locking failed.
    #[error("'{path}': {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A requested change is not valid (e.g. the user exists); nothing changed.
    #[error(transparent)]
    Rejected(#[from] Rejection),
}

/// Why a state file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptState {
    /// Group or others may read it.
    #[error("permissions {0:04o} are too open for a file holding secrets (chmod 600 it)")]
    TooOpen(u32),
    /// Not valid JSON of the expected shape.
    #[error("{0}")]
    Json(String),
    /// A format version this program does not read.
    #[error("version {0} is not supported (expected {STATE_VERSION})")]
    Version(u32),
    /// The content breaks an invariant.
    #[error(transparent)]
    Invalid(#[from] InvalidState),
}

/// An invariant of [`DeviceState`] that does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidState {
    /// A user name or role is not a valid identifier.
    #[error(transparent)]
    Name(#[from] ValueError),
    /// Two users share a name.
    #[error("user '{0}' appears twice")]
    DuplicateUser(String),
    /// A display name over 64 characters.
    #[error("user '{0}': display name longer than 64")]
    DisplayName(String),
    /// A user without a usable server-connect token.
    #[error("user '{0}' has no valid server-connect token")]
    NoToken(String),
    /// A key on two users.
    #[error("key {key} belongs to both '{first}' and '{second}'")]
    SharedKey {
        /// The key.
        key: Fingerprint,
        /// One user.
        first: String,
        /// The other.
        second: String,
    },
    /// The open-pairing secrets are missing.
    #[error("the open-pairing password or token is missing")]
    NoOpenSecrets,
}

/// Which kind of token a presented server-connect token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A user's token.
    User,
    /// The open-pairing token, while password open pairing is on: good only for a key on no
    /// user, which can do nothing but pair.
    OpenPairing,
    /// No valid token.
    Invalid,
}

/// A change the state refuses; the state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A user of that name exists.
    #[error("user '{0}' already exists")]
    UserExists(String),
    /// No user of that name.
    #[error("there is no user '{0}'")]
    NoSuchUser(String),
    /// The key belongs to another user.
    #[error("this key already belongs to user '{0}'")]
    KeyTaken(String),
    /// The user has no pending invitation.
    #[error("user '{0}' has no pending invitation")]
    NoInvitation(String),
    /// The user has no such key.
    #[error("user '{0}' has no such key")]
    NoSuchKey(String),
    /// A display name over 64 characters or with control characters.
    #[error("a display name is at most 64 printable characters")]
    DisplayName,
    /// A name that is not a valid identifier.
    #[error(transparent)]
    Name(#[from] ValueError),
    /// Local initial pairing lost a race, or was used already.
    #[error("the first user exists already")]
    FirstUserExists,
    /// The invitation proven by the PAKE was replaced or claimed meanwhile.
    #[error("the invitation was replaced or claimed meanwhile; ask for a new one")]
    InvitationChanged,
    /// The open-pairing password proven by the PAKE changed meanwhile.
    #[error("the open pairing password changed meanwhile")]
    OpenPasswordChanged,
    /// The change would leave the device without a user of the initial (owner) role that has a
    /// key: nobody could manage it, and local initial pairing might open it to anyone.
    #[error(
        "'{user}' is the last {role} with a key; make another user {role} first (or use \
         `tunnel-device user` on the device itself)"
    )]
    LastOwner {
        /// The user.
        user: String,
        /// The initial role.
        role: String,
    },
    /// The change would leave a user with a role `iam.toml` does not define.
    #[error(transparent)]
    Role(#[from] RoleError),
    /// The result breaks an invariant of the state.
    #[error(transparent)]
    Invalid(#[from] InvalidState),
    /// `create` found a state file already there.
    #[error("'{}' already exists", .0.display())]
    Exists(PathBuf),
}

fn new_secret() -> Secret {
    Secret::generate(SECRET_LEN)
}

impl DeviceState {
    /// A state with no users and every pairing mode off (fresh open-pairing secrets).
    pub fn new_device() -> Self {
        Self {
            version: STATE_VERSION,
            users: Vec::new(),
            pairing: PairingState {
                local_initial: false,
                local_open: false,
                password_invite: false,
                password_open: false,
                initial_done: false,
                open_password: new_secret(),
                open_sct: new_secret(),
            },
        }
    }

    /// Parses and validates the file content.
    ///
    /// # Errors
    /// The [`CorruptState`] reason.
    pub fn from_json(bytes: &[u8]) -> Result<Self, CorruptState> {
        let state: Self =
            serde_json::from_slice(bytes).map_err(|e| CorruptState::Json(e.to_string()))?;
        if state.version != STATE_VERSION {
            return Err(CorruptState::Version(state.version));
        }
        state.validate()?;
        Ok(state)
    }

    /// The file content (pretty JSON, trailing newline).
    pub fn to_json(&self) -> Vec<u8> {
        // Plain structs of strings serialize infallibly.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Checks names, uniqueness of users and keys, and that secrets are present.
    ///
    /// # Errors
    /// The first [`InvalidState`] found.
    pub fn validate(&self) -> Result<(), InvalidState> {
        let mut names = std::collections::HashSet::new();
        let mut fps = std::collections::HashMap::new();
        for u in &self.users {
            check_id("user name", &u.username)?;
            check_id("role", &u.role)?;
            if !names.insert(u.username.as_str()) {
                return Err(InvalidState::DuplicateUser(u.username.clone()));
            }
            if u.display_name
                .as_ref()
                .is_some_and(|d| d.chars().count() > 64)
            {
                return Err(InvalidState::DisplayName(u.username.clone()));
            }
            if u.sct.len() < 8 {
                return Err(InvalidState::NoToken(u.username.clone()));
            }
            for k in &u.fingerprints {
                if let Some(other) = fps.insert(k.fingerprint, u.username.as_str()) {
                    return Err(InvalidState::SharedKey {
                        key: k.fingerprint,
                        first: other.to_string(),
                        second: u.username.clone(),
                    });
                }
            }
        }
        if self.pairing.open_password.len() < 8 || self.pairing.open_sct.len() < 8 {
            return Err(InvalidState::NoOpenSecrets);
        }
        Ok(())
    }

    /// The user owning this key.
    pub fn user_by_fingerprint(&self, fp: &Fingerprint) -> Option<&User> {
        self.users
            .iter()
            .find(|u| u.fingerprints.iter().any(|k| k.fingerprint == *fp))
    }

    /// The user with this name.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.username == name)
    }

    fn user_mut(&mut self, name: &str) -> Result<&mut User, StateError> {
        self.users
            .iter_mut()
            .find(|u| u.username == name)
            .ok_or_else(|| Rejection::NoSuchUser(name.to_string()).into())
    }

    fn check_free(
        &self,
        username: &str,
        fingerprint: Option<&Fingerprint>,
    ) -> Result<(), StateError> {
        check_id("user name", username).map_err(Rejection::Name)?;
        if self.user(username).is_some() {
            return Err(Rejection::UserExists(username.to_string()).into());
        }
        if let Some(owner) = fingerprint.and_then(|fp| self.user_by_fingerprint(fp)) {
            return Err(Rejection::KeyTaken(owner.username.clone()).into());
        }
        Ok(())
    }

    /// Adds a user with one key and a fresh server-connect token.
    ///
    /// # Errors
    /// [`StateError::Rejected`] when the name or the key is taken.
    pub fn add_user(
        &mut self,
        username: &str,
        role: &str,
        fingerprint: Fingerprint,
        key_name: Option<String>,
    ) -> Result<&User, StateError> {
        self.check_free(username, Some(&fingerprint))?;
        self.users.push(User {
            username: username.to_string(),
            display_name: None,
            role: role.to_string(),
            fingerprints: vec![UserKey {
                fingerprint,
                name: key_name,
            }],
            sct: new_secret(),
            password: None,
            claimed: None,
        });
        Ok(&self.users[self.users.len() - 1])
    }

    /// Adds a user with no key yet and a one-time password; returns the password.
    ///
    /// # Errors
    /// [`StateError::Rejected`] when the name is taken.
    pub fn invite_user(&mut self, username: &str, role: &str) -> Result<Secret, StateError> {
        self.check_free(username, None)?;
        let password = new_secret();
        self.users.push(User {
            username: username.to_string(),
            display_name: None,
            role: role.to_string(),
            fingerprints: Vec::new(),
            sct: new_secret(),
            password: Some(password.clone()),
            claimed: None,
        });
        Ok(password)
    }

    /// Gives an existing user a new one-time password (a fresh invitation); returns it.
    ///
    /// # Errors
    /// [`StateError::Rejected`] when there is no such user.
    pub fn reinvite(&mut self, username: &str) -> Result<Secret, StateError> {
        let password = new_secret();
        let user = self.user_mut(username)?;
        user.password = Some(password.clone());
        user.claimed = None;
        Ok(password)
    }

    /// Claims `username`'s invitation for `fingerprint`: adds the key, retires the password
    /// (kept as [`User::claimed`]) and issues the user a fresh token (the invitation's token
    /// travelled in the pairing string).
    ///
    /// # Errors
    /// [`StateError::Rejected`] when there is no pending invitation or the key is someone else's.
    pub fn claim_invite(
        &mut self,
        username: &str,
        fingerprint: Fingerprint,
        key_name: Option<String>,
    ) -> Result<&User, StateError> {
        if let Some(owner) = self.user_by_fingerprint(&fingerprint)
            && owner.username != username
        {
            return Err(Rejection::KeyTaken(owner.username.clone()).into());
        }
        let user = self.user_mut(username)?;
        let Some(password) = user.password.take() else {
            return Err(Rejection::NoInvitation(username.to_string()).into());
        };
        user.claimed = Some(password);
        user.sct = new_secret();
        if !user
            .fingerprints
            .iter()
            .any(|k| k.fingerprint == fingerprint)
        {
            user.fingerprints.push(UserKey {
                fingerprint,
                name: key_name,
            });
        }
        Ok(user)
    }

    /// Adds a key to a user.
    ///
    /// # Errors
    /// [`StateError::Rejected`] when the user is missing or the key is taken.
    pub fn add_fingerprint(
        &mut self,
        username: &str,
        fingerprint: Fingerprint,
        key_name: Option<String>,
    ) -> Result<(), StateError> {
        if let Some(owner) = self.user_by_fingerprint(&fingerprint) {
            return Err(Rejection::KeyTaken(owner.username.clone()).into());
        }
        self.user_mut(username)?.fingerprints.push(UserKey {
            fingerprint,
            name: key_name,
        });
        Ok(())
    }

    /// Removes a key from a user.
    ///
    /// # Errors
    /// [`StateError::Rejected`] when the user or key is missing.
    pub fn remove_fingerprint(
        &mut self,
        username: &str,
        fingerprint: &Fingerprint,
    ) -> Result<(), StateError> {
        let user = self.user_mut(username)?;
        let before = user.fingerprints.len();
        user.fingerprints.retain(|k| k.fingerprint != *fingerprint);
        if user.fingerprints.len() == before {
            return Err(Rejection::NoSuchKey(username.to_string()).into());
        }
        Ok(())
    }

    /// Removes a user.
    ///
    /// # Errors
    /// [`StateError::Rejected`] when there is no such user.
    pub fn remove_user(&mut self, username: &str) -> Result<User, StateError> {
        let idx = self
            .users
            .iter()
            .position(|u| u.username == username)
            .ok_or_else(|| Rejection::NoSuchUser(username.to_string()))?;
        Ok(self.users.remove(idx))
    }

    /// Changes a user's role.
    ///
    /// # Errors
    /// [`StateError::Rejected`] when there is no such user.
    pub fn set_role(&mut self, username: &str, role: &str) -> Result<(), StateError> {
        check_id("role", role).map_err(Rejection::Name)?;
        self.user_mut(username)?.role = role.to_string();
        Ok(())
    }

    /// Changes a user's display name (`None` clears it).
    ///
    /// # Errors
    /// [`StateError::Rejected`] when there is no such user or the name is too long.
    pub fn set_display_name(
        &mut self,
        username: &str,
        name: Option<String>,
    ) -> Result<(), StateError> {
        if name
            .as_ref()
            .is_some_and(|n| n.chars().count() > 64 || n.chars().any(char::is_control))
        {
            return Err(Rejection::DisplayName.into());
        }
        self.user_mut(username)?.display_name = name;
        Ok(())
    }

    /// Replaces a user's server-connect token (the old one stops working at once).
    ///
    /// # Errors
    /// [`StateError::Rejected`] when there is no such user.
    pub fn rotate_sct(&mut self, username: &str) -> Result<Secret, StateError> {
        let sct = new_secret();
        self.user_mut(username)?.sct = sct.clone();
        Ok(sct)
    }

    /// Whether local initial pairing can still happen: enabled, never used, and no user with the
    /// initial role has a key yet.
    pub fn local_initial_available(&self, initial_role: &str) -> bool {
        self.pairing.local_initial
            && !self.pairing.initial_done
            && !self
                .users
                .iter()
                .any(|u| u.role == initial_role && !u.fingerprints.is_empty())
    }

    /// Which token `presented` is: a user's, the open-pairing token (only while password open
    /// pairing is on), or none. Constant-time over all tokens: timing reveals neither which
    /// matched nor how much of one.
    pub fn token_kind(&self, presented: &Secret) -> TokenKind {
        let user = crate::secret::matches_any(presented, self.users.iter().map(|u| &u.sct));
        let open = crate::secret::matches_any(presented, std::iter::once(&self.pairing.open_sct))
            && self.pairing.password_open;
        match (user, open) {
            (true, _) => TokenKind::User,
            (false, true) => TokenKind::OpenPairing,
            (false, false) => TokenKind::Invalid,
        }
    }

    /// Users of `role` that have at least one key (the ones that can act).
    pub fn users_with_keys(&self, role: &str) -> usize {
        self.users
            .iter()
            .filter(|u| u.role == role && !u.fingerprints.is_empty())
            .count()
    }

    /// Applies `change` unless it would leave no user of `owner_role` with a key where there was
    /// one ([`Rejection::LastOwner`], naming `user`). The check runs on the state `change` sees, so
    /// under [`StateStore::update`]'s lock two racing changes cannot both pass it.
    ///
    /// # Errors
    /// `change`'s error or [`Rejection::LastOwner`]; the state is then unchanged.
    pub fn keeping_an_owner<R>(
        &mut self,
        owner_role: &str,
        user: &str,
        change: impl FnOnce(&mut Self) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        let had = self.users_with_keys(owner_role) > 0;
        let before = self.clone();
        let out = change(self)?;
        if had && self.users_with_keys(owner_role) == 0 {
            *self = before;
            return Err(Rejection::LastOwner {
                user: user.to_string(),
                role: owner_role.to_string(),
            }
            .into());
        }
        Ok(out)
    }
}

pub use store::{StateStore, Updated};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    fn sample() -> DeviceState {
        let mut s = DeviceState::new_device();
        s.add_user(
            "alice",
            "Owner",
            SecretKey::generate().fingerprint(),
            Some("laptop".into()),
        )
        .unwrap();
        s.add_user("bob", "Guest", SecretKey::generate().fingerprint(), None)
            .unwrap();
        s.invite_user("carol", "Standard").unwrap();
        s
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(DeviceState::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn invitations_are_claimed_once() {
        let mut s = sample();
        let fp = SecretKey::generate().fingerprint();
        let invited = s.user("carol").unwrap().clone();
        assert!(invited.password.is_some());
        s.claim_invite("carol", fp, Some("phone".into())).unwrap();
        let claimed = s.user("carol").unwrap();
        assert!(claimed.password.is_none());
        assert_eq!(
            claimed.claimed, invited.password,
            "the used password is retired, not lost"
        );
        assert_ne!(claimed.sct, invited.sct, "claiming issues a fresh token");
        assert_eq!(s.user_by_fingerprint(&fp).unwrap().username, "carol");
        assert!(
            s.claim_invite("carol", SecretKey::generate().fingerprint(), None)
                .is_err()
        );
        // Someone else's key cannot claim an invitation.
        s.reinvite("carol").unwrap();
        let alice_fp = s.user("alice").unwrap().fingerprints[0].fingerprint;
        assert!(s.claim_invite("carol", alice_fp, None).is_err());
        assert!(s.user("carol").unwrap().password.is_some());
    }

    #[test]
    fn sct_checks_cover_users_and_the_open_token_only_while_enabled() {
        let mut s = sample();
        let alice = s.user("alice").unwrap().sct.clone();
        assert_eq!(s.token_kind(&alice), TokenKind::User);
        assert_eq!(
            s.token_kind(&Secret::new("nope-nope-nope")),
            TokenKind::Invalid
        );
        let open = s.pairing.open_sct.clone();
        assert_eq!(s.token_kind(&open), TokenKind::Invalid);
        s.pairing.password_open = true;
        assert_eq!(s.token_kind(&open), TokenKind::OpenPairing);
        let new = s.rotate_sct("alice").unwrap();
        assert_eq!(s.token_kind(&alice), TokenKind::Invalid);
        assert_eq!(s.token_kind(&new), TokenKind::User);
        s.remove_user("alice").unwrap();
        assert_eq!(s.token_kind(&new), TokenKind::Invalid);
    }

    #[test]
    fn local_initial_works_once_and_not_once_an_owner_has_a_key() {
        let mut s = DeviceState::new_device();
        assert!(!s.local_initial_available("Owner"));
        s.pairing.local_initial = true;
        assert!(s.local_initial_available("Owner"));
        s.invite_user("owner", "Owner").unwrap();
        assert!(
            s.local_initial_available("Owner"),
            "an unclaimed invitation is not an owner"
        );
        s.claim_invite("owner", SecretKey::generate().fingerprint(), None)
            .unwrap();
        assert!(!s.local_initial_available("Owner"));
        let mut s = DeviceState::new_device();
        s.pairing.local_initial = true;
        s.pairing.initial_done = true;
        assert!(!s.local_initial_available("Owner"));
    }

    #[test]
    fn the_last_owner_with_a_key_stays() {
        let mut s = sample();
        let alice_fp = s.user("alice").unwrap().fingerprints[0].fingerprint;
        let before = s.clone();
        let err = s
            .keeping_an_owner("Owner", "alice", |s| s.remove_user("alice").map(|_| ()))
            .unwrap_err();
        assert!(matches!(
            err,
            StateError::Rejected(Rejection::LastOwner { .. })
        ));
        assert_eq!(s, before, "a refused change leaves the state as it was");
        assert!(
            s.keeping_an_owner("Owner", "alice", |s| s.set_role("alice", "Guest"))
                .is_err()
        );
        assert!(
            s.keeping_an_owner("Owner", "alice", |s| s
                .remove_fingerprint("alice", &alice_fp))
                .is_err()
        );
        // With a second owner, either may go.
        s.add_user("dora", "Owner", SecretKey::generate().fingerprint(), None)
            .unwrap();
        s.keeping_an_owner("Owner", "alice", |s| s.set_role("alice", "Guest"))
            .unwrap();
        assert!(
            s.keeping_an_owner("Owner", "dora", |s| s.remove_user("dora").map(|_| ()))
                .is_err()
        );
        // A device that has no owner with a key (yet) is not blocked.
        let mut fresh = DeviceState::new_device();
        fresh.invite_user("owner", "Owner").unwrap();
        fresh
            .keeping_an_owner("Owner", "owner", |s| s.remove_user("owner").map(|_| ()))
            .unwrap();
    }

    #[test]
    fn duplicate_names_and_keys_are_rejected() {
        let mut s = sample();
        let fp = s.users[0].fingerprints[0].fingerprint;
        assert!(
            s.add_user("alice", "Guest", SecretKey::generate().fingerprint(), None)
                .is_err()
        );
        assert!(s.add_user("carol", "Guest", fp, None).is_err());
        s.users.push(s.users[0].clone());
        assert!(s.validate().is_err());
    }

    /// Every truncation of a real state file is rejected, and every bit flip is either rejected or
    /// parses into a state with the same users and no pairing mode switched on: never into an
    /// empty or open-for-pairing device.
    #[test]
    fn corruption_never_yields_an_empty_device() {
        let s = sample();
        let bytes = s.to_json();
        for cut in 0..bytes.len() - 1 {
            if let Ok(parsed) = DeviceState::from_json(&bytes[..cut]) {
                panic!("truncation at {cut} parsed: {parsed:?}");
            }
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(parsed) = DeviceState::from_json(&b) {
                    assert_eq!(
                        parsed.users.len(),
                        s.users.len(),
                        "flip {i}/{bit} lost a user"
                    );
                    for (a, b) in parsed.users.iter().zip(&s.users) {
                        assert_eq!(
                            a.fingerprints.len(),
                            b.fingerprints.len(),
                            "flip {i}/{bit} lost a key"
                        );
                        assert_eq!(a.password.is_some(), b.password.is_some(), "flip {i}/{bit}");
                    }
                    for mode in PairingMode::ALL {
                        assert!(
                            !parsed.pairing.enabled(mode),
                            "flip {i}/{bit} switched {mode} on"
                        );
                    }
                    assert!(!parsed.local_initial_available("Owner"));
                }
            }
        }
    }
}
