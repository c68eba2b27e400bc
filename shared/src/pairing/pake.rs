//! SPAKE2 bound to the TLS channel: both fingerprints in the identities, key confirmation over a
//! TLS exporter value.
//!
//! Kind: pure (randomness from the OS CSPRNG).

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use spake2::{Ed25519Group, Identity, Password, Spake2};
use zeroize::Zeroizing;

use crate::identity::Fingerprint;
use crate::secret::Secret;

/// Label of the TLS exporter value both sides bind the PAKE to.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tunnel/1 pairing";

/// The PAKE failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PakeError {
    /// A message was malformed.
    #[error("malformed key-exchange message")]
    Malformed,
    /// The confirmation did not verify: wrong password, or a man in the middle.
    #[error("key confirmation failed: wrong password, or the connection is intercepted")]
    Mismatch,
}

fn identity(role: &str, fp: &Fingerprint, username: &str) -> Identity {
    let mut v = Vec::with_capacity(80);
    v.extend_from_slice(role.as_bytes());
    v.extend_from_slice(fp.as_bytes());
    v.extend_from_slice(username.as_bytes());
    Identity::new(&v)
}

fn confirm_mac(key: &[u8], who: &[u8], exporter: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // HMAC takes keys of any length.
    if let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) {
        mac.update(who);
        mac.update(exporter);
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

fn verify_mac(key: &[u8], who: &[u8], exporter: &[u8], tag: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(who);
    mac.update(exporter);
    mac.verify_slice(tag).is_ok()
}

/// The fingerprints and exporter of this connection, as one side sees them.
#[derive(Debug, Clone, Copy)]
pub struct Channel<'a> {
    /// The client's key.
    pub client: &'a Fingerprint,
    /// The device's key.
    pub device: &'a Fingerprint,
    /// The TLS exporter value for [`EXPORTER_LABEL`].
    pub exporter: &'a [u8; 32],
}

/// Client side, after sending its first message.
pub struct ClientPake {
    state: Spake2<Ed25519Group>,
    exporter: [u8; 32],
}

impl fmt::Debug for ClientPake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientPake(..)")
    }
}

/// Client side, waiting for the device's confirmation.
pub struct ClientConfirm {
    key: Zeroizing<Vec<u8>>,
    exporter: [u8; 32],
}

impl fmt::Debug for ClientConfirm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientConfirm(..)")
    }
}

impl ClientPake {
    /// Starts: returns the state and the message for `PakeStart`.
    pub fn start(password: &Secret, username: &str, ch: Channel<'_>) -> (Self, Vec<u8>) {
        let (state, msg) = Spake2::<Ed25519Group>::start_a(
            &Password::new(password.expose().as_bytes()),
            &identity("client", ch.client, username),
            &identity("device", ch.device, username),
        );
        (
            Self {
                state,
                exporter: *ch.exporter,
            },
            msg,
        )
    }

    /// Processes the device's reply: returns the confirmation MAC to send.
    ///
    /// # Errors
    /// [`PakeError::Malformed`].
    pub fn finish(self, reply: &[u8]) -> Result<(ClientConfirm, [u8; 32]), PakeError> {
        let key = Zeroizing::new(self.state.finish(reply).map_err(|_| PakeError::Malformed)?);
        let mac = confirm_mac(&key, b"client", &self.exporter);
        Ok((
            ClientConfirm {
                key,
                exporter: self.exporter,
            },
            mac,
        ))
    }
}

impl ClientConfirm {
    /// Verifies the device's MAC (constant-time).
    ///
    /// # Errors
    /// [`PakeError::Mismatch`].
    pub fn verify(&self, device_mac: &[u8]) -> Result<(), PakeError> {
        if verify_mac(&self.key, b"device", &self.exporter, device_mac) {
            Ok(())
        } else {
            Err(PakeError::Mismatch)
        }
    }
}

/// Device side, waiting for the client's confirmation.
pub struct DevicePake {
    key: Zeroizing<Vec<u8>>,
    exporter: [u8; 32],
}

impl fmt::Debug for DevicePake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DevicePake(..)")
    }
}

impl DevicePake {
    /// Answers the client's first message. With no password for `username` pass `None`: a random
    /// one is used, so an unknown user looks exactly like a wrong password.
    ///
    /// # Errors
    /// [`PakeError::Malformed`].
    pub fn respond(
        password: Option<&Secret>,
        username: &str,
        ch: Channel<'_>,
        client_msg: &[u8],
    ) -> Result<(Self, Vec<u8>), PakeError> {
        let random;
        let password = match password {
            Some(p) => p,
            None => {
                random = Secret::generate(32);
                &random
            }
        };
        let (state, reply) = Spake2::<Ed25519Group>::start_b(
            &Password::new(password.expose().as_bytes()),
            &identity("client", ch.client, username),
            &identity("device", ch.device, username),
        );
        let key = Zeroizing::new(state.finish(client_msg).map_err(|_| PakeError::Malformed)?);
        Ok((
            Self {
                key,
                exporter: *ch.exporter,
            },
            reply,
        ))
    }

    /// Verifies the client's MAC (constant-time) and returns the device's MAC.
    ///
    /// # Errors
    /// [`PakeError::Mismatch`]: nothing may change on the device.
    pub fn confirm(&self, client_mac: &[u8]) -> Result<[u8; 32], PakeError> {
        if verify_mac(&self.key, b"client", &self.exporter, client_mac) {
            Ok(confirm_mac(&self.key, b"device", &self.exporter))
        } else {
            Err(PakeError::Mismatch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    fn fps() -> (Fingerprint, Fingerprint) {
        (
            SecretKey::generate().fingerprint(),
            SecretKey::generate().fingerprint(),
        )
    }

    /// Device verdict, and (if the device accepted) the client's verdict on the device.
    type Outcome = (Result<[u8; 32], PakeError>, Option<Result<(), PakeError>>);

    fn run(
        client_pw: &str,
        device_pw: Option<&str>,
        client_view: Channel<'_>,
        device_view: Channel<'_>,
    ) -> Outcome {
        let (c, m1) = ClientPake::start(&Secret::new(client_pw), "alice", client_view);
        let device_secret = device_pw.map(Secret::new);
        let (d, m2) =
            DevicePake::respond(device_secret.as_ref(), "alice", device_view, &m1).unwrap();
        let (cc, mac) = c.finish(&m2).unwrap();
        let dev = d.confirm(&mac);
        let cli = dev.as_ref().ok().map(|dm| cc.verify(dm));
        (dev, cli)
    }

    #[test]
    fn pake_succeeds_only_with_the_same_password_and_channel() {
        let (c, d) = fps();
        let e = [7u8; 32];
        let ch = Channel {
            client: &c,
            device: &d,
            exporter: &e,
        };
        let (dev, cli) = run("hunter2hunter2", Some("hunter2hunter2"), ch, ch);
        assert!(dev.is_ok());
        assert_eq!(cli, Some(Ok(())));

        assert_eq!(
            run("wrong", Some("hunter2hunter2"), ch, ch).0,
            Err(PakeError::Mismatch)
        );
        assert_eq!(
            run("hunter2hunter2", None, ch, ch).0,
            Err(PakeError::Mismatch)
        );

        // A man in the middle: each side sees different fingerprints and exporters.
        let (mc, md) = fps();
        let e2 = [9u8; 32];
        let client_view = Channel {
            client: &c,
            device: &md,
            exporter: &e,
        };
        let device_view = Channel {
            client: &mc,
            device: &d,
            exporter: &e2,
        };
        assert_eq!(
            run(
                "hunter2hunter2",
                Some("hunter2hunter2"),
                client_view,
                device_view
            )
            .0,
            Err(PakeError::Mismatch)
        );
        // Same keys but a different exporter (relayed TLS) also fails.
        let relayed = Channel {
            client: &c,
            device: &d,
            exporter: &e2,
        };
        assert_eq!(
            run("hunter2hunter2", Some("hunter2hunter2"), ch, relayed).0,
            Err(PakeError::Mismatch)
        );
    }

    #[test]
    fn pake_rejects_garbage_and_replays() {
        let (c, d) = fps();
        let e = [1u8; 32];
        let ch = Channel {
            client: &c,
            device: &d,
            exporter: &e,
        };
        assert!(DevicePake::respond(None, "a", ch, b"junk").is_err());
        let (cp, _) = ClientPake::start(&Secret::new("pw"), "a", ch);
        assert!(cp.finish(&[0u8; 3]).is_err());
        // Replaying a recorded client message and MAC against a new device run fails.
        let pw = Secret::new("pw-pw-pw");
        let (c1, m1) = ClientPake::start(&pw, "a", ch);
        let (d1, m2) = DevicePake::respond(Some(&pw), "a", ch, &m1).unwrap();
        let (_, mac) = c1.finish(&m2).unwrap();
        assert!(d1.confirm(&mac).is_ok());
        let (d2, _) = DevicePake::respond(Some(&pw), "a", ch, &m1).unwrap();
        assert_eq!(d2.confirm(&mac), Err(PakeError::Mismatch));
    }
}
