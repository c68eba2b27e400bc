//! The device's side of a password pairing on one connection, as a state machine:
//! `PakeStart` → [`PasswordFlow::start`], `PakeConfirm` → [`PasswordFlow::confirm`], then the
//! pairing request checks [`PasswordFlow::proven`].
//!
//! Kind: pure. Time is an input (`now`); the device owns the clock, the limiter and the channel
//! binding, and passes them in.
//!
//! ```text
//!   idle ──start──► pending ──confirm ok──► proven ──(paired)──► idle
//!     ▲                │
//!     └──confirm fails─┘  (an attempt is spent)
//! ```
//!
//! Nothing changes on the device before [`PasswordFlow::confirm`] succeeds: the flow only ever
//! says *who* proved *which* password; the caller re-checks that password under the state lock
//! before it pairs, so a password replaced meanwhile cannot be claimed.
//!
//! Attempts are counted when they *start*: [`PasswordFlow::start`] spends one of the source's
//! attempts in the [`AttemptLimiter`] before it answers, and a successful confirmation gives it
//! back. So many connections from one source that start a key exchange each and confirm later
//! still get only the limiter's rate of guesses. A client that proves the password of an
//! invitation that was already claimed is told so ([`FlowError::AlreadyClaimed`]) and keeps its
//! attempt; nobody else can tell a claimed invitation from a wrong password.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::limiter::{AttemptLimiter, Verdict};
use super::pake::{Channel, DevicePake, PakeError};
use crate::secret::Secret;

/// What a successful PAKE proved: the user ("" for the open-pairing password) and the password.
#[derive(Clone)]
pub struct Proven {
    /// The invited user, or "" for the open-pairing password.
    pub username: String,
    /// The password that was proven.
    pub password: Secret,
}

impl fmt::Debug for Proven {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proven")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The password the device tests a key exchange against.
#[derive(Clone)]
pub enum Expected {
    /// A pending invitation's password, or the open-pairing password.
    Live(Secret),
    /// The password of an invitation that was claimed already: proving it earns "already used".
    Claimed(Secret),
    /// No such invitation: a random password is used, so the exchange looks the same but can
    /// never verify.
    Unknown,
}

impl fmt::Debug for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Live(_) => "Live(..)",
            Self::Claimed(_) => "Claimed(..)",
            Self::Unknown => "Unknown",
        })
    }
}

struct Pending {
    username: String,
    expected: Expected,
    pake: DevicePake,
}

/// The password-pairing state of one connection.
#[derive(Default)]
pub struct PasswordFlow {
    pending: Option<Pending>,
    proven: Option<Proven>,
}

impl fmt::Debug for PasswordFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFlow")
            .field("pending", &self.pending.as_ref().map(|p| &p.username))
            .field("proven", &self.proven)
            .finish()
    }
}

/// Why a step of the flow failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// Too many failed attempts from this source or overall.
    #[error("too many attempts, retry in {} s", .retry_after.as_secs() + 1)]
    TooManyAttempts {
        /// How long to wait.
        retry_after: Duration,
    },
    /// The client's key-exchange message was malformed (an attempt is spent).
    #[error(transparent)]
    Malformed(PakeError),
    /// `confirm` without a `start`.
    #[error("start the key exchange first")]
    NotStarted,
    /// The confirmation did not verify: a wrong password, an unknown user, or an intercepted
    /// connection (the attempt stays spent).
    #[error("wrong password (or the connection is intercepted)")]
    WrongPassword {
        /// The user the attempt was for.
        username: String,
    },
    /// The client proved the password of an invitation that was claimed already (the attempt is
    /// given back).
    #[error("this invitation was already used to pair a key; ask the device's owner for a new one")]
    AlreadyClaimed {
        /// The invited user.
        username: String,
    },
}

impl PasswordFlow {
    /// Answers the client's first PAKE message for `username`, tested against `expected`; spends
    /// one attempt of `source`. Starting again forgets an earlier proof.
    ///
    /// # Errors
    /// [`FlowError::TooManyAttempts`] (nothing spent), [`FlowError::Malformed`] (the attempt
    /// stays spent).
    #[expect(
        clippy::too_many_arguments,
        reason = "the flow is pure: the limiter, source, clock and channel are all inputs"
    )]
    pub fn start(
        &mut self,
        limiter: &mut AttemptLimiter,
        source: IpAddr,
        now: Instant,
        username: String,
        expected: Expected,
        ch: Channel<'_>,
        client_msg: &[u8],
    ) -> Result<Vec<u8>, FlowError> {
        if let Verdict::RetryAfter(retry_after) = limiter.check(source, now) {
            return Err(FlowError::TooManyAttempts { retry_after });
        }
        limiter.failed(source, now);
        self.pending = None;
        self.proven = None;
        let password = match &expected {
            Expected::Live(p) | Expected::Claimed(p) => Some(p),
            Expected::Unknown => None,
        };
        let (pake, reply) = DevicePake::respond(password, &username, ch, client_msg)
            .map_err(FlowError::Malformed)?;
        self.pending = Some(Pending {
            username,
            expected,
            pake,
        });
        Ok(reply)
    }

    /// Verifies the client's confirmation MAC; on success the flow is proven, the attempt given
    /// back, and the device's MAC returned for the client to check.
    ///
    /// # Errors
    /// [`FlowError::NotStarted`], [`FlowError::WrongPassword`] (the attempt stays spent) or
    /// [`FlowError::AlreadyClaimed`] (given back).
    pub fn confirm(
        &mut self,
        limiter: &mut AttemptLimiter,
        source: IpAddr,
        now: Instant,
        client_mac: &[u8],
    ) -> Result<[u8; 32], FlowError> {
        let pending = self.pending.take().ok_or(FlowError::NotStarted)?;
        let Pending {
            username,
            expected,
            pake,
        } = pending;
        match (pake.confirm(client_mac), expected) {
            (Ok(device_mac), Expected::Live(password)) => {
                limiter.refund(source, now);
                self.proven = Some(Proven { username, password });
                Ok(device_mac)
            }
            (Ok(_), Expected::Claimed(_)) => {
                limiter.refund(source, now);
                Err(FlowError::AlreadyClaimed { username })
            }
            _ => Err(FlowError::WrongPassword { username }),
        }
    }

    /// Whether a key exchange is started and not yet confirmed.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// What the last successful PAKE proved, if any.
    pub fn proven(&self) -> Option<&Proven> {
        self.proven.as_ref()
    }

    /// Back to idle (after pairing).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Fingerprint, SecretKey};
    use crate::pairing::{ClientPake, LimiterConfig};

    struct Setup {
        client: Fingerprint,
        device: Fingerprint,
        exporter: [u8; 32],
    }

    impl Setup {
        fn new() -> Self {
            Self {
                client: SecretKey::generate().fingerprint(),
                device: SecretKey::generate().fingerprint(),
                exporter: [3u8; 32],
            }
        }

        fn ch(&self) -> Channel<'_> {
            Channel {
                client: &self.client,
                device: &self.device,
                exporter: &self.exporter,
            }
        }

        /// One whole attempt; the flow's result of `confirm` (or of `start`).
        fn attempt(
            &self,
            flow: &mut PasswordFlow,
            limiter: &mut AttemptLimiter,
            now: Instant,
            typed: &str,
            stored: Expected,
        ) -> Result<(), FlowError> {
            let ip: IpAddr = "192.0.2.7".parse().unwrap();
            let (client, m1) = ClientPake::start(&Secret::new(typed), "alice", self.ch());
            let m2 = flow.start(limiter, ip, now, "alice".into(), stored, self.ch(), &m1)?;
            let (confirm, mac) = client.finish(&m2).unwrap();
            let device_mac = flow.confirm(limiter, ip, now, &mac)?;
            confirm.verify(&device_mac).unwrap();
            Ok(())
        }
    }

    fn live(pw: &str) -> Expected {
        Expected::Live(Secret::new(pw))
    }

    #[test]
    fn the_right_password_proves_the_user_and_costs_no_attempt() {
        let s = Setup::new();
        let now = Instant::now();
        let mut limiter = AttemptLimiter::new(LimiterConfig::default(), now);
        let mut flow = PasswordFlow::default();
        for _ in 0..20 {
            s.attempt(&mut flow, &mut limiter, now, "pw", live("pw"))
                .unwrap();
        }
        let p = flow.proven().unwrap();
        assert_eq!((p.username.as_str(), p.password.expose()), ("alice", "pw"));
        flow.reset();
        assert!(flow.proven().is_none());
    }

    #[test]
    fn wrong_passwords_and_unknown_users_spend_attempts_until_refused() {
        let s = Setup::new();
        let now = Instant::now();
        let mut limiter = AttemptLimiter::new(LimiterConfig::default(), now);
        let mut flow = PasswordFlow::default();
        for _ in 0..5 {
            assert!(matches!(
                s.attempt(&mut flow, &mut limiter, now, "guess", live("pw")),
                Err(FlowError::WrongPassword { .. })
            ));
        }
        assert!(matches!(
            s.attempt(&mut flow, &mut limiter, now, "pw", live("pw")),
            Err(FlowError::TooManyAttempts { .. })
        ));
        assert!(flow.proven().is_none());
        // One attempt back after 5 s (0.2 per second), and an unknown user is a wrong password.
        let later = now + Duration::from_secs(5);
        assert!(matches!(
            s.attempt(&mut flow, &mut limiter, later, "pw", Expected::Unknown),
            Err(FlowError::WrongPassword { .. })
        ));
    }

    /// Issue 9: attempts are spent when a key exchange starts, so exchanges started on many
    /// connections and confirmed later still get the limiter's rate, not one guess each.
    #[test]
    fn attempts_are_spent_at_start() {
        let s = Setup::new();
        let now = Instant::now();
        let mut limiter = AttemptLimiter::new(LimiterConfig::default(), now);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let mut flows: Vec<PasswordFlow> = (0..16).map(|_| PasswordFlow::default()).collect();
        let mut started = 0;
        for flow in &mut flows {
            let (_, m1) = ClientPake::start(&Secret::new("guess"), "alice", s.ch());
            if flow
                .start(
                    &mut limiter,
                    ip,
                    now,
                    "alice".into(),
                    live("pw"),
                    s.ch(),
                    &m1,
                )
                .is_ok()
            {
                started += 1;
            }
        }
        assert_eq!(started, 5, "the burst of the default limiter");
    }

    #[test]
    fn a_claimed_invitation_is_named_and_costs_no_attempt() {
        let s = Setup::new();
        let now = Instant::now();
        let mut limiter = AttemptLimiter::new(LimiterConfig::default(), now);
        let mut flow = PasswordFlow::default();
        for _ in 0..10 {
            let claimed = Expected::Claimed(Secret::new("pw"));
            assert!(matches!(
                s.attempt(&mut flow, &mut limiter, now, "pw", claimed),
                Err(FlowError::AlreadyClaimed { .. })
            ));
        }
        assert!(flow.proven().is_none());
        // Someone who does not know that password cannot tell it from a wrong one.
        let claimed = Expected::Claimed(Secret::new("pw"));
        assert!(matches!(
            s.attempt(&mut flow, &mut limiter, now, "guess", claimed),
            Err(FlowError::WrongPassword { .. })
        ));
    }

    #[test]
    fn confirm_needs_a_start_and_garbage_is_refused() {
        let s = Setup::new();
        let now = Instant::now();
        let mut limiter = AttemptLimiter::new(LimiterConfig::default(), now);
        let mut flow = PasswordFlow::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(
            flow.confirm(&mut limiter, ip, now, &[0u8; 32]),
            Err(FlowError::NotStarted)
        );
        assert!(matches!(
            flow.start(
                &mut limiter,
                ip,
                now,
                "alice".into(),
                live("pw"),
                s.ch(),
                &[1, 2, 3]
            ),
            Err(FlowError::Malformed(_))
        ));
    }
}
