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

struct Pending {
    username: String,
    /// The password the device used (`None`: a random one, so it cannot succeed).
    password: Option<Secret>,
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
    /// connection (an attempt is spent).
    #[error("wrong password (or the connection is intercepted)")]
    WrongPassword {
        /// The user the attempt was for.
        username: String,
    },
}

impl PasswordFlow {
    /// Answers the client's first PAKE message for `username` with `password` (`None` when the
    /// user has no password: the answer then looks the same but can never verify). Starting
    /// again forgets an earlier proof.
    ///
    /// # Errors
    /// [`FlowError::TooManyAttempts`] (nothing spent), [`FlowError::Malformed`] (an attempt spent).
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
        password: Option<Secret>,
        ch: Channel<'_>,
        client_msg: &[u8],
    ) -> Result<Vec<u8>, FlowError> {
        if let Verdict::RetryAfter(retry_after) = limiter.check(source, now) {
            return Err(FlowError::TooManyAttempts { retry_after });
        }
        match DevicePake::respond(password.as_ref(), &username, ch, client_msg) {
            Ok((pake, reply)) => {
                self.pending = Some(Pending {
                    username,
                    password,
                    pake,
                });
                self.proven = None;
                Ok(reply)
            }
            Err(e) => {
                limiter.failed(source, now);
                Err(FlowError::Malformed(e))
            }
        }
    }

    /// Verifies the client's confirmation MAC; on success the flow is proven and the device's MAC
    /// is returned for the client to check.
    ///
    /// # Errors
    /// [`FlowError::NotStarted`], or [`FlowError::WrongPassword`] (an attempt spent).
    pub fn confirm(
        &mut self,
        limiter: &mut AttemptLimiter,
        source: IpAddr,
        now: Instant,
        client_mac: &[u8],
    ) -> Result<[u8; 32], FlowError> {
        let pending = self.pending.take().ok_or(FlowError::NotStarted)?;
        match (pending.pake.confirm(client_mac), pending.password) {
            (Ok(device_mac), Some(password)) => {
                self.proven = Some(Proven {
                    username: pending.username,
                    password,
                });
                Ok(device_mac)
            }
            _ => {
                limiter.failed(source, now);
                Err(FlowError::WrongPassword {
                    username: pending.username,
                })
            }
        }
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
            stored: Option<&str>,
        ) -> Result<(), FlowError> {
            let ip: IpAddr = "192.0.2.7".parse().unwrap();
            let (client, m1) = ClientPake::start(&Secret::new(typed), "alice", self.ch());
            let m2 = flow.start(
                limiter,
                ip,
                now,
                "alice".into(),
                stored.map(Secret::new),
                self.ch(),
                &m1,
            )?;
            let (confirm, mac) = client.finish(&m2).unwrap();
            let device_mac = flow.confirm(limiter, ip, now, &mac)?;
            confirm.verify(&device_mac).unwrap();
            Ok(())
        }
    }

    #[test]
    fn the_right_password_proves_the_user() {
        let s = Setup::new();
        let now = Instant::now();
        let mut limiter = AttemptLimiter::new(LimiterConfig::default(), now);
        let mut flow = PasswordFlow::default();
        s.attempt(&mut flow, &mut limiter, now, "pw", Some("pw"))
            .unwrap();
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
                s.attempt(&mut flow, &mut limiter, now, "guess", Some("pw")),
                Err(FlowError::WrongPassword { .. })
            ));
        }
        assert!(matches!(
            s.attempt(&mut flow, &mut limiter, now, "pw", Some("pw")),
            Err(FlowError::TooManyAttempts { .. })
        ));
        assert!(flow.proven().is_none());
        // One attempt back after 5 s (0.2 per second), and an unknown user is a wrong password.
        let later = now + Duration::from_secs(5);
        assert!(matches!(
            s.attempt(&mut flow, &mut limiter, later, "pw", None),
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
                Some(Secret::new("pw")),
                s.ch(),
                &[1, 2, 3]
            ),
            Err(FlowError::Malformed(_))
        ));
    }
}
