//! The authorization core: given the facts of a connection and of a request, and the device's
//! current state, IAM and configuration, decide; given every live connection, say what to close
//! and what to reset.
//!
//! Kind: pure. No quinn types, no clock, no IO, no logging: the device gathers the facts
//! ([`ConnFacts`]: key, locality, token), asks, logs the [`Verdict`] and applies the
//! [`Enforcement`]s. Every function here is a table test away from being checked.
//!
//! Order of checks for a new connection ([`Policy::admit`], DESIGN §4–§9):
//! remote access switch → server-connect token (remote only, before any IAM work: a user's token,
//! or the open-pairing token for a key on no user) → the key's user (a key on no user is
//! *unpaired* and is admitted only while some pairing mode is usable for it, and only below the
//! cap on unpaired connections) → the cap on established connections (its last
//! `owner_reserved_connections` for owners only) → the cap per user.
//!
//! Locality is a fact of the connection *now*: the device recomputes it from the current source
//! address for every request, every stream and every re-enforcement, so a connection that moves
//! (QUIC migration) from a local to a remote address needs a valid token from then on.

use crate::config::{DeviceConfig, ServiceConfig};
use crate::iam::{self, Action, Attrs, Decision, IamConfig, Value};
use crate::identity::Fingerprint;
use crate::pairing::PairingMode;
use crate::proto::{CloseCode, StreamCode};
use crate::secret::Secret;
use crate::state::{DeviceState, TokenKind, User};

/// What the device knows about a connection.
#[derive(Debug, Clone)]
pub struct ConnFacts<'a> {
    /// The key the client proved in the TLS handshake.
    pub fingerprint: &'a Fingerprint,
    /// Whether the connection is local now (DESIGN §6).
    pub local: bool,
    /// The server-connect token the connection holds: the one presented in `Hello`, or the
    /// user's own once it paired or rotated it on this connection.
    pub token: Option<Secret>,
    /// Whether it presented a JWT of the device's identity provider that was valid for this
    /// device when it connected (checked at the IO edge, which reads the clock).
    pub jwt: bool,
}

/// Who a connection is under the current state.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// The user the key belongs to, if any.
    pub user: Option<&'a User>,
    /// That user's role, or the unpaired role.
    pub role: &'a str,
}

impl Who<'_> {
    /// The user name for logs: the name, or `(unpaired)`.
    pub fn name(&self) -> &str {
        self.user.map_or("(unpaired)", |u| u.username.as_str())
    }
}

/// What a request is about, beyond the connection.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    /// Nothing more (list services, pairing, settings…).
    None,
    /// A service id, which may name no service.
    Service(&'a str),
    /// A user (and, for role changes and invitations, the role involved).
    User {
        /// The user the request is about.
        name: &'a str,
        /// The role it sets or creates.
        role: Option<&'a str>,
    },
}

/// One IAM decision with what it was about, for the device's debug log.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The outcome.
    pub allowed: bool,
    /// The action asked.
    pub action: Action,
    /// The deciding statement.
    pub decision: Decision,
    /// The attributes it was evaluated with.
    pub attrs: Attrs,
}

/// The close reason of the established-connection cap.
pub const TOO_MANY_CONNECTIONS: &str = "too many connections";
/// The close reason of the cap per user.
pub const TOO_MANY_OF_USER: &str = "too many connections of this user";
/// The close reason of the cap on connections of keys on no user.
pub const TOO_MANY_UNPAIRED: &str = "too many unpaired connections";

/// Why a new connection is refused: the close code the client sees and a short reason for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The close code.
    pub code: CloseCode,
    /// The close reason (peer-visible, so it names no detail).
    pub reason: &'static str,
}

/// The connections past `Hello` a new one is admitted among ([`Policy::admit`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// All of them.
    pub established: usize,
    /// Those of keys on no user.
    pub unpaired: usize,
    /// Those of the new connection's user (any of its keys).
    pub of_user: usize,
}

/// Why a pairing request is refused before any pairing work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairingRefusal {
    /// The key is already a user.
    AlreadyPaired(String),
    /// The mode needs a local connection.
    NeedsLocal(PairingMode),
    /// IAM does not allow this mode to this connection.
    Forbidden,
    /// The mode is switched off.
    Disabled(PairingMode),
    /// Remote password open pairing without the open-pairing token.
    NeedsOpenToken,
}

/// What the device must do to a live connection after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// Close the connection with this code and reason.
    Close(Refusal),
    /// The key became this user (it paired, or an owner added it): record it.
    Adopt(String),
    /// Reset this tunnel (the caller's id) with this code.
    Reset {
        /// The tunnel's id, as given in [`LiveConn::tunnels`].
        tunnel: u64,
        /// The code the client sees.
        code: StreamCode,
    },
}

/// A live connection as [`Policy::enforce`] sees it.
#[derive(Debug, Clone)]
pub struct LiveConn<'a> {
    /// Its facts.
    pub facts: ConnFacts<'a>,
    /// The user it was welcomed (or has since paired) as.
    pub user: Option<&'a str>,
    /// Its open tunnels: the caller's id and the service id.
    pub tunnels: &'a [(u64, String)],
}

/// The device's current policy: one consistent view of state, IAM and configuration.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// Users, tokens, pairing switches.
    pub state: &'a DeviceState,
    /// Roles and policies.
    pub iam: &'a IamConfig,
    /// Services and network policy.
    pub config: &'a DeviceConfig,
}

impl<'a> Policy<'a> {
    /// A view of these three.
    pub fn new(state: &'a DeviceState, iam: &'a IamConfig, config: &'a DeviceConfig) -> Self {
        Self { state, iam, config }
    }

    /// Who `fingerprint` is now.
    pub fn who(&self, fingerprint: &Fingerprint) -> Who<'a> {
        let user = self.state.user_by_fingerprint(fingerprint);
        Who {
            role: user.map_or(self.iam.unpaired_role.as_str(), |u| u.role.as_str()),
            user,
        }
    }

    /// Whether a remote connection may proceed: remote access is on and it holds a valid token
    /// (constant-time): a user's, or the open-pairing token while its key is on no user. Local
    /// connections always may.
    fn gate(&self, conn: &ConnFacts<'_>, who: &Who<'_>) -> Result<(), Refusal> {
        if conn.local {
            return Ok(());
        }
        if !self.config.network.remote_access {
            return Err(Refusal {
                code: CloseCode::REMOTE_DISABLED,
                reason: "remote access disabled",
            });
        }
        // A valid JWT lets any key proceed, like a token: its key still decides the role.
        if conn.jwt {
            return Ok(());
        }
        let kind = conn
            .token
            .as_ref()
            .map_or(TokenKind::Invalid, |t| self.state.token_kind(t));
        match kind {
            TokenKind::User => Ok(()),
            TokenKind::OpenPairing if who.user.is_none() => Ok(()),
            TokenKind::OpenPairing | TokenKind::Invalid => Err(Refusal {
                code: CloseCode::SCT_REJECTED,
                reason: "server-connect token required",
            }),
        }
    }

    /// Whether `who` is an owner: a user with the role the first user gets (`Owner`). Owners'
    /// connections may use the connection slots held in reserve, and their tokens the relays'
    /// reserved channels and the device's reserved relayed handshakes.
    pub fn is_owner(&self, who: &Who<'_>) -> bool {
        who.user.is_some() && who.role == self.iam.initial_role
    }

    /// Decides whether a new connection may proceed past `Hello`, given the connections already
    /// past it (`load`).
    ///
    /// # Errors
    /// The [`Refusal`] to close the connection with.
    pub fn admit(&self, conn: &ConnFacts<'_>, load: Load) -> Result<Who<'a>, Refusal> {
        let who = self.who(conn.fingerprint);
        self.gate(conn, &who)?;
        let limits = &self.config.limits;
        let max = limits.max_connections as usize;
        let open_to_all = max.saturating_sub(limits.owner_reserve() as usize);
        let busy = Refusal {
            code: CloseCode::BUSY,
            reason: TOO_MANY_CONNECTIONS,
        };
        if load.established >= max || (!self.is_owner(&who) && load.established >= open_to_all) {
            return Err(busy);
        }
        if who.user.is_none() {
            if self.usable_modes(conn).is_empty() {
                return Err(Refusal {
                    code: CloseCode::UNKNOWN_KEY,
                    reason: "unknown client key",
                });
            }
            if load.unpaired >= limits.max_unpaired_connections as usize {
                return Err(Refusal {
                    code: CloseCode::BUSY,
                    reason: TOO_MANY_UNPAIRED,
                });
            }
        } else if load.of_user >= limits.max_connections_per_user as usize {
            return Err(Refusal {
                code: CloseCode::BUSY,
                reason: TOO_MANY_OF_USER,
            });
        }
        Ok(who)
    }

    /// The attributes every request of `conn` carries.
    pub fn base_attrs(conn: &ConnFacts<'_>, who: &Who<'_>) -> Attrs {
        let mut a = Attrs::new();
        a.insert(iam::attr::CONNECTION_IS_LOCAL, Value::Bool(conn.local));
        a.insert(
            iam::attr::CONNECTION_FINGERPRINT,
            Value::Str(conn.fingerprint.to_string()),
        );
        if let Some(u) = who.user {
            a.insert(
                iam::attr::CONNECTION_USERNAME,
                Value::Str(u.username.clone()),
            );
        }
        a
    }

    /// `base` plus the attributes of `subject`.
    fn subject_attrs(&self, mut a: Attrs, subject: Subject<'_>) -> Attrs {
        match subject {
            Subject::None => {}
            Subject::Service(id) => {
                a.insert(iam::attr::TUNNEL_SERVICE_ID, Value::Str(id.to_string()));
                if let Some(s) = self.config.service(id) {
                    a.insert(
                        iam::attr::TUNNEL_SERVICE_TYPE,
                        Value::Str(s.service_type.clone()),
                    );
                }
            }
            Subject::User { name, role } => {
                a.insert(iam::attr::IAM_USERNAME, Value::Str(name.to_string()));
                if let Some(r) = role {
                    a.insert(iam::attr::IAM_ROLE_ID, Value::Str(r.to_string()));
                }
            }
        }
        a
    }

    /// Decides `action` on `subject` for `conn`, as its key is *now*.
    pub fn decide(&self, conn: &ConnFacts<'_>, action: Action, subject: Subject<'_>) -> Verdict {
        let who = self.who(conn.fingerprint);
        self.decide_as(conn, &who, action, subject)
    }

    fn decide_as(
        &self,
        conn: &ConnFacts<'_>,
        who: &Who<'_>,
        action: Action,
        subject: Subject<'_>,
    ) -> Verdict {
        let attrs = self.subject_attrs(Self::base_attrs(conn, who), subject);
        let decision = self.iam.decide(who.role, action, &attrs);
        Verdict {
            allowed: decision.allowed,
            action,
            decision,
            attrs,
        }
    }

    /// Whether `conn` may open a tunnel to `service` now: the service, or the code to reset the
    /// stream with. Whether a service exists is only revealed to those who may connect to that
    /// id (an unknown id is `FORBIDDEN` to everyone else).
    ///
    /// # Errors
    /// [`StreamCode::FORBIDDEN`] or [`StreamCode::NO_SUCH_SERVICE`], with the verdict for logs.
    pub fn tunnel(
        &self,
        conn: &ConnFacts<'_>,
        service: &str,
    ) -> (Result<&'a ServiceConfig, StreamCode>, Verdict) {
        let verdict = self.decide(conn, Action::TunnelConnect, Subject::Service(service));
        let outcome = match (verdict.allowed, self.config.service(service)) {
            (false, _) => Err(StreamCode::FORBIDDEN),
            (true, None) => Err(StreamCode::NO_SUCH_SERVICE),
            (true, Some(s)) => Ok(s),
        };
        (outcome, verdict)
    }

    /// Whether `conn` may tunnel to at least one service now (`Tunnel:Connect`, as it is now:
    /// locality included). Hole punching is for such connections only: a direct path helps
    /// nobody else, and the device's addresses are not for others.
    pub fn may_tunnel(&self, conn: &ConnFacts<'_>) -> bool {
        self.config
            .services
            .iter()
            .any(|s| self.tunnel(conn, &s.id).0.is_ok())
    }

    /// Pairing modes `conn` could use now: enabled, local where required, allowed by IAM, local
    /// initial only while unused, password open remotely only with the open token.
    pub fn usable_modes(&self, conn: &ConnFacts<'_>) -> Vec<PairingMode> {
        let who = self.who(conn.fingerprint);
        if who.user.is_some() {
            return Vec::new();
        }
        PairingMode::ALL
            .into_iter()
            .filter(|&m| self.state.pairing.enabled(m))
            .filter(|&m| !m.local_only() || conn.local)
            .filter(|&m| {
                m != PairingMode::LocalInitial
                    || self.state.local_initial_available(&self.iam.initial_role)
            })
            .filter(|&m| m != PairingMode::PasswordOpen || self.has_open_token(conn))
            .filter(|&m| {
                self.decide_as(conn, &who, m.action(), Subject::None)
                    .allowed
            })
            .collect()
    }

    fn has_open_token(&self, conn: &ConnFacts<'_>) -> bool {
        conn.local || conn.token.as_ref() == Some(&self.state.pairing.open_sct)
    }

    /// The gate every pairing request passes first: not paired yet, local where the mode needs
    /// it, allowed by IAM, switched on (in that order), and for remote password open pairing the
    /// open-pairing token.
    ///
    /// # Errors
    /// The first [`PairingRefusal`] that applies.
    pub fn pairing_gate(
        &self,
        conn: &ConnFacts<'_>,
        mode: PairingMode,
    ) -> Result<(), PairingRefusal> {
        let who = self.who(conn.fingerprint);
        if let Some(u) = who.user {
            return Err(PairingRefusal::AlreadyPaired(u.username.clone()));
        }
        if mode.local_only() && !conn.local {
            return Err(PairingRefusal::NeedsLocal(mode));
        }
        if !self
            .decide_as(conn, &who, mode.action(), Subject::None)
            .allowed
        {
            return Err(PairingRefusal::Forbidden);
        }
        if !self.state.pairing.enabled(mode) {
            return Err(PairingRefusal::Disabled(mode));
        }
        if mode == PairingMode::PasswordOpen && !self.has_open_token(conn) {
            return Err(PairingRefusal::NeedsOpenToken);
        }
        Ok(())
    }

    /// What to do to one live connection under this policy: close it (its user was removed or
    /// changed, remote access was switched off, its token was revoked), record that its key
    /// became a user, and reset each tunnel the policy no longer allows.
    pub fn enforce(&self, conn: &LiveConn<'_>) -> Vec<Enforcement> {
        let facts = &conn.facts;
        let who = self.who(facts.fingerprint);
        let current = who.user.map(|u| u.username.as_str());
        match (conn.user, current) {
            (Some(prev), cur) if cur != Some(prev) => {
                return vec![Enforcement::Close(Refusal {
                    code: CloseCode::REVOKED,
                    reason: "access revoked",
                })];
            }
            (None, Some(cur)) => return self.enforced_tunnels(conn, &who, Some(cur)),
            _ => {}
        }
        self.enforced_tunnels(conn, &who, None)
    }

    fn enforced_tunnels(
        &self,
        conn: &LiveConn<'_>,
        who: &Who<'_>,
        adopt: Option<&str>,
    ) -> Vec<Enforcement> {
        let mut out: Vec<Enforcement> = adopt
            .map(|u| Enforcement::Adopt(u.to_string()))
            .into_iter()
            .collect();
        if let Err(refusal) = self.gate(&conn.facts, who) {
            out.push(Enforcement::Close(match refusal.code {
                CloseCode::SCT_REJECTED => Refusal {
                    code: CloseCode::SCT_REJECTED,
                    reason: "token revoked",
                },
                _ => refusal,
            }));
            return out;
        }
        for (tunnel, service) in conn.tunnels {
            let code = if self.config.service(service).is_none() {
                Some(StreamCode::NO_SUCH_SERVICE)
            } else if !self
                .decide_as(
                    &conn.facts,
                    who,
                    Action::TunnelConnect,
                    Subject::Service(service),
                )
                .allowed
            {
                Some(StreamCode::FORBIDDEN)
            } else {
                None
            };
            if let Some(code) = code {
                out.push(Enforcement::Reset {
                    tunnel: *tunnel,
                    code,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    struct World {
        state: DeviceState,
        iam: IamConfig,
        config: DeviceConfig,
    }

    struct Keys {
        owner: Fingerprint,
        guest: Fingerprint,
        standard: Fingerprint,
        stranger: Fingerprint,
    }

    fn world() -> (World, Keys) {
        let keys = Keys {
            owner: SecretKey::generate().fingerprint(),
            guest: SecretKey::generate().fingerprint(),
            standard: SecretKey::generate().fingerprint(),
            stranger: SecretKey::generate().fingerprint(),
        };
        let mut state = DeviceState::new_device();
        state.add_user("o", "Owner", keys.owner, None).unwrap();
        state.add_user("g", "Guest", keys.guest, None).unwrap();
        state
            .add_user("s", "Standard", keys.standard, None)
            .unwrap();
        let config = DeviceConfig::from_toml(
            "device_id = \"d\"\nname = \"n\"\n[[service]]\nid = \"ssh\"\nhost = \"127.0.0.1\"\nport = 22\n",
        )
        .unwrap();
        (
            World {
                state,
                iam: IamConfig::builtin(),
                config,
            },
            keys,
        )
    }

    impl World {
        fn policy(&self) -> Policy<'_> {
            Policy::new(&self.state, &self.iam, &self.config)
        }

        fn token(&self, user: &str) -> Secret {
            self.state.user(user).unwrap().sct.clone()
        }
    }

    fn facts<'a>(fp: &'a Fingerprint, local: bool, token: Option<&Secret>) -> ConnFacts<'a> {
        ConnFacts {
            fingerprint: fp,
            local,
            token: token.cloned(),
            jwt: false,
        }
    }

    #[test]
    fn admission_table() {
        let (mut w, k) = world();
        let g_tok = w.token("g");
        let wrong = Secret::new("not-a-token-at-all");
        // (key, local, token, expected close code or None for admitted)
        let cases: Vec<(&Fingerprint, bool, Option<&Secret>, Option<CloseCode>)> = vec![
            (&k.owner, true, None, None),
            (&k.guest, true, None, None),
            (&k.guest, false, Some(&g_tok), None),
            // Any user's token lets any key past the gate: the key still decides the role.
            (&k.owner, false, Some(&g_tok), None),
            (&k.guest, false, None, Some(CloseCode::SCT_REJECTED)),
            (&k.guest, false, Some(&wrong), Some(CloseCode::SCT_REJECTED)),
            // No pairing mode is on: an unknown key is refused.
            (&k.stranger, true, None, Some(CloseCode::UNKNOWN_KEY)),
            (
                &k.stranger,
                false,
                Some(&g_tok),
                Some(CloseCode::UNKNOWN_KEY),
            ),
        ];
        for (i, (fp, local, tok, want)) in cases.iter().enumerate() {
            let got = w
                .policy()
                .admit(&facts(fp, *local, *tok), Load::default())
                .err();
            assert_eq!(got.map(|r| r.code), *want, "case {i}");
        }
        w.state.pairing.local_open = true;
        let stranger = facts(&k.stranger, true, None);
        let load = |established, unpaired, of_user| Load {
            established,
            unpaired,
            of_user,
        };
        assert!(w.policy().admit(&stranger, Load::default()).is_ok());
        let busy = w.policy().admit(&stranger, load(0, 16, 0));
        assert_eq!(busy.err().map(|r| r.code), Some(CloseCode::BUSY));
        let full = w
            .policy()
            .admit(&facts(&k.owner, true, None), load(256, 0, 0));
        assert_eq!(full.err().map(|r| r.code), Some(CloseCode::BUSY));
        assert!(
            w.policy()
                .admit(&facts(&k.stranger, false, Some(&g_tok)), Load::default())
                .is_err(),
            "local open is not usable remotely"
        );
        // Issue 9: the open-pairing token lets in only a key on no user (which can only pair).
        w.state.pairing.password_open = true;
        let open = w.state.pairing.open_sct.clone();
        let r = w
            .policy()
            .admit(&facts(&k.stranger, false, Some(&open)), Load::default());
        assert!(r.is_ok());
        let r = w
            .policy()
            .admit(&facts(&k.standard, false, Some(&open)), Load::default());
        assert_eq!(r.err().map(|r| r.code), Some(CloseCode::SCT_REJECTED));
        w.config.network.remote_access = false;
        let r = w
            .policy()
            .admit(&facts(&k.owner, false, Some(&g_tok)), Load::default());
        assert_eq!(r.err().map(|r| r.code), Some(CloseCode::REMOTE_DISABLED));
    }

    /// Issue 18, defect 5: one Guest key held all 256 connections past hello, and the owner was
    /// refused "connection limit": no cap per user, no reserve for owners.
    #[test]
    fn one_user_cannot_take_every_connection_and_owners_keep_a_reserve() {
        let (w, k) = world();
        let p = w.policy();
        let l = &w.config.limits;
        let (max, reserve, per_user) = (
            l.max_connections as usize,
            l.owner_reserve() as usize,
            l.max_connections_per_user as usize,
        );
        let load = |established, of_user| Load {
            established,
            unpaired: 0,
            of_user,
        };
        let guest = facts(&k.guest, true, None);
        let owner = facts(&k.owner, true, None);
        let code = |r: Result<Who<'_>, Refusal>| r.err().map(|r| (r.code, r.reason));
        assert!(p.admit(&guest, load(0, per_user - 1)).is_ok());
        assert_eq!(
            code(p.admit(&guest, load(per_user, per_user))),
            Some((CloseCode::BUSY, TOO_MANY_OF_USER))
        );
        // Other users fill the device up to the reserve: a guest is refused, an owner is not.
        assert_eq!(
            code(p.admit(&guest, load(max - reserve, 0))),
            Some((CloseCode::BUSY, TOO_MANY_CONNECTIONS))
        );
        assert!(p.admit(&owner, load(max - reserve, 0)).is_ok());
        assert!(p.admit(&owner, load(max - 1, 0)).is_ok());
        assert!(p.admit(&owner, load(max, 0)).is_err());
        assert!(p.is_owner(&p.who(&k.owner)) && !p.is_owner(&p.who(&k.standard)));
        assert!(!p.is_owner(&p.who(&k.stranger)));
    }

    #[test]
    fn tunnel_table() {
        let (w, k) = world();
        let p = w.policy();
        let tok = w.token("s");
        // (key, local, service, expected)
        let cases = [
            (&k.owner, false, "ssh", Ok(())),
            (&k.standard, false, "ssh", Ok(())),
            (&k.guest, true, "ssh", Ok(())),
            (&k.guest, false, "ssh", Err(StreamCode::FORBIDDEN)),
            (&k.stranger, true, "ssh", Err(StreamCode::FORBIDDEN)),
            (&k.owner, true, "nope", Err(StreamCode::NO_SUCH_SERVICE)),
            // A guest remotely learns nothing about which ids exist.
            (&k.guest, false, "nope", Err(StreamCode::FORBIDDEN)),
        ];
        for (i, (fp, local, svc, want)) in cases.into_iter().enumerate() {
            let token = (!local).then_some(&tok);
            let (got, verdict) = p.tunnel(&facts(fp, local, token), svc);
            assert_eq!(got.map(|_| ()), want, "case {i}");
            assert_eq!(verdict.action, Action::TunnelConnect);
        }
    }

    /// Issue 18, defect 8: the device punched for any relayed user, a Guest (who may not
    /// tunnel remotely) included.
    #[test]
    fn only_users_who_may_tunnel_may_punch() {
        let (w, k) = world();
        let p = w.policy();
        let tok = w.token("g");
        assert!(p.may_tunnel(&facts(&k.owner, false, Some(&tok))));
        assert!(p.may_tunnel(&facts(&k.standard, false, Some(&tok))));
        assert!(p.may_tunnel(&facts(&k.guest, true, None)));
        assert!(!p.may_tunnel(&facts(&k.guest, false, Some(&tok))));
        assert!(!p.may_tunnel(&facts(&k.stranger, false, Some(&tok))));
    }

    #[test]
    fn decisions_name_the_subject() {
        let (w, k) = world();
        let p = w.policy();
        let own = p.decide(
            &facts(&k.guest, true, None),
            Action::IamDeleteUser,
            Subject::User {
                name: "g",
                role: None,
            },
        );
        assert!(own.allowed);
        assert_eq!(
            own.attrs.get(iam::attr::IAM_USERNAME),
            Some(&Value::Str("g".into()))
        );
        let other = p.decide(
            &facts(&k.guest, true, None),
            Action::IamDeleteUser,
            Subject::User {
                name: "o",
                role: None,
            },
        );
        assert!(!other.allowed && other.decision.by.is_none());
    }

    #[test]
    fn pairing_gate_table() {
        let (mut w, k) = world();
        w.state.pairing.password_open = true;
        w.state.pairing.local_open = true;
        let open = w.state.pairing.open_sct.clone();
        let user_tok = w.token("g");
        let p = w.policy();
        let s = &k.stranger;
        let cases = [
            (
                facts(&k.guest, true, None),
                PairingMode::LocalOpen,
                Err(PairingRefusal::AlreadyPaired("g".into())),
            ),
            (facts(s, true, None), PairingMode::LocalOpen, Ok(())),
            (
                facts(s, false, Some(&open)),
                PairingMode::LocalOpen,
                Err(PairingRefusal::NeedsLocal(PairingMode::LocalOpen)),
            ),
            (
                facts(s, true, None),
                PairingMode::PasswordInvite,
                Err(PairingRefusal::Disabled(PairingMode::PasswordInvite)),
            ),
            (
                facts(s, false, Some(&open)),
                PairingMode::PasswordOpen,
                Ok(()),
            ),
            (
                facts(s, false, Some(&user_tok)),
                PairingMode::PasswordOpen,
                Err(PairingRefusal::NeedsOpenToken),
            ),
        ];
        for (i, (f, mode, want)) in cases.into_iter().enumerate() {
            assert_eq!(p.pairing_gate(&f, mode), want, "case {i}");
        }
        assert_eq!(
            p.usable_modes(&facts(s, true, None)),
            [PairingMode::LocalOpen, PairingMode::PasswordOpen]
        );
        assert_eq!(
            p.usable_modes(&facts(s, false, Some(&open))),
            [PairingMode::PasswordOpen]
        );
        assert!(p.usable_modes(&facts(&k.owner, true, None)).is_empty());
    }

    #[test]
    fn enforcement_table() {
        let (mut w, k) = world();
        let g_tok = w.token("g");
        let tunnels = vec![(1, "ssh".to_string()), (2, "gone".to_string())];
        let live = |fp, local, token: Option<&Secret>, user| LiveConn {
            facts: facts(fp, local, token),
            user,
            tunnels: &tunnels,
        };
        // A service that disappeared is reset; the rest stands.
        let acts = w.policy().enforce(&live(&k.owner, true, None, Some("o")));
        assert_eq!(
            acts,
            [Enforcement::Reset {
                tunnel: 2,
                code: StreamCode::NO_SUCH_SERVICE
            }]
        );
        // A guest that is remote with a valid token may keep the connection but no tunnel.
        let acts = w
            .policy()
            .enforce(&live(&k.guest, false, Some(&g_tok), Some("g")));
        assert!(acts.contains(&Enforcement::Reset {
            tunnel: 1,
            code: StreamCode::FORBIDDEN
        }));
        // A removed user is closed; its token is gone too, but the user check comes first.
        w.state.remove_user("g").unwrap();
        let acts = w
            .policy()
            .enforce(&live(&k.guest, false, Some(&g_tok), Some("g")));
        assert_eq!(acts.len(), 1);
        assert!(matches!(&acts[0], Enforcement::Close(r) if r.code == CloseCode::REVOKED));
        // A token that stopped being valid closes a remote connection of someone else.
        let acts = w
            .policy()
            .enforce(&live(&k.owner, false, Some(&g_tok), Some("o")));
        assert!(matches!(&acts[..], [Enforcement::Close(r)] if r.code == CloseCode::SCT_REJECTED));
        // An unpaired key that became a user is adopted.
        w.state.add_user("new", "Owner", k.stranger, None).unwrap();
        let acts = w.policy().enforce(&live(&k.stranger, true, None, None));
        assert_eq!(acts[0], Enforcement::Adopt("new".into()));
        // Remote access switched off closes remote connections only.
        w.config.network.remote_access = false;
        let o_tok = w.token("o");
        let acts = w
            .policy()
            .enforce(&live(&k.owner, false, Some(&o_tok), Some("o")));
        assert!(
            matches!(&acts[..], [Enforcement::Close(r)] if r.code == CloseCode::REMOTE_DISABLED)
        );
        assert!(
            !w.policy()
                .enforce(&live(&k.owner, true, None, Some("o")))
                .iter()
                .any(|a| matches!(a, Enforcement::Close(_)))
        );
    }
}
