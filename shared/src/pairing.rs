//! Pairing: the four modes, the pairing string, the password-authenticated key exchange, and the
//! limiter on failed password attempts.
//!
//! Kind: pure. No IO; time is an input (`now`), randomness comes from the OS CSPRNG.
//!
//! # PAKE
//! Password modes use SPAKE2 (the `spake2` crate, Ed25519 group) so the password never crosses
//! the wire. It is bound to this TLS channel twice:
//! - the SPAKE2 identities are the client's and the device's key fingerprints *as each side sees
//!   them in the TLS handshake*, plus the user name;
//! - both sides prove they derived the same key with an HMAC over a TLS exporter value of this
//!   QUIC connection ([`EXPORTER_LABEL`]).
//!
//! A man in the middle who terminates TLS on both sides with its own keys sees different
//! fingerprints and exporters on each side, so the two SPAKE2 keys differ and confirmation fails
//! on both sides, even if it forwards every message faithfully. The device changes nothing before
//! the client's confirmation MAC verifies (constant-time), and the client accepts the device only
//! after the device's MAC verifies.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use spake2::{Ed25519Group, Identity, Password, Spake2};
use zeroize::Zeroizing;

use crate::config::{HostPort, check_id};
use crate::identity::Fingerprint;
use crate::secret::Secret;

/// Label of the TLS exporter value both sides bind the PAKE to.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tunnel/1 pairing";

/// Length of generated pairing passwords and server-connect tokens (57-symbol alphabet: > 70 bits).
pub const SECRET_LEN: usize = 14;

/// A pairing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PairingMode {
    /// A local connection becomes the first user, once.
    LocalInitial,
    /// A local connection becomes a new user with the open-pairing role.
    LocalOpen,
    /// Whoever knows a user's one-time password claims that user.
    PasswordInvite,
    /// Whoever knows the shared open password becomes a new user with the open-pairing role.
    PasswordOpen,
}

impl PairingMode {
    /// All modes.
    pub const ALL: [Self; 4] = [
        Self::LocalInitial,
        Self::LocalOpen,
        Self::PasswordInvite,
        Self::PasswordOpen,
    ];

    /// Command-line name, e.g. `password-invite`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::LocalInitial => "local-initial",
            Self::LocalOpen => "local-open",
            Self::PasswordInvite => "password-invite",
            Self::PasswordOpen => "password-open",
        }
    }

    /// Whether the mode needs a local connection.
    pub const fn local_only(self) -> bool {
        matches!(self, Self::LocalInitial | Self::LocalOpen)
    }

    /// The IAM action that authorizes it.
    pub const fn action(self) -> crate::iam::Action {
        use crate::iam::Action;
        match self {
            Self::LocalInitial => Action::PairingLocalInitial,
            Self::LocalOpen => Action::PairingLocalOpen,
            Self::PasswordInvite => Action::PairingPasswordInvite,
            Self::PasswordOpen => Action::PairingPasswordOpen,
        }
    }
}

impl fmt::Display for PairingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PairingMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown pairing mode '{s}'; modes are local-initial, local-open, \
                     password-invite, password-open"
                )
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Pairing string
// ---------------------------------------------------------------------------------------------

/// Everything a client needs to pair from one line: `tp1,d=ID,f=FINGERPRINT,a=ADDR+ADDR,u=USER,
/// p=PASSWORD,s=SCT`. It carries the device's fingerprint, so the client pins the device from the
/// first packet (no trust on first use). Safe to paste unquoted into a shell.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingString {
    /// Device id.
    pub device_id: String,
    /// Device key fingerprint.
    pub fingerprint: Fingerprint,
    /// Where to reach the device.
    pub addresses: Vec<HostPort>,
    /// The invited user (password invite), or `None` for password open.
    pub username: Option<String>,
    /// The one-time (invite) or shared (open) password.
    pub password: Secret,
    /// The server-connect token to present on remote connections.
    pub sct: Option<Secret>,
}

impl fmt::Debug for PairingString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairingString")
            .field("device_id", &self.device_id)
            .field("fingerprint", &self.fingerprint)
            .field("addresses", &self.addresses)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

const PAIRING_PREFIX: &str = "tp1";

impl fmt::Display for PairingString {
    /// Contains the password: print it only where the user asked for it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addrs: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
        write!(
            f,
            "{PAIRING_PREFIX},d={},f={},a={}",
            self.device_id,
            self.fingerprint,
            addrs.join("+")
        )?;
        if let Some(u) = &self.username {
            write!(f, ",u={u}")?;
        }
        write!(f, ",p={}", self.password.expose())?;
        if let Some(s) = &self.sct {
            write!(f, ",s={}", s.expose())?;
        }
        Ok(())
    }
}

fn secret_chars_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl FromStr for PairingString {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let mut parts = s.split(',');
        if parts.next() != Some(PAIRING_PREFIX) {
            return Err(format!(
                "not a pairing string: it should start with '{PAIRING_PREFIX},' (copy the whole \
                 line tunnel-device printed)"
            ));
        }
        let mut fields: HashMap<&str, &str> = HashMap::new();
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("malformed pairing string field '{part}'"))?;
            if !matches!(k, "d" | "f" | "a" | "u" | "p" | "s") {
                return Err(format!("unknown pairing string field '{k}'"));
            }
            if fields.insert(k, v).is_some() {
                return Err(format!("pairing string field '{k}' appears twice"));
            }
        }
        let get = |k: &str, what: &str| {
            fields
                .get(k)
                .copied()
                .ok_or_else(|| format!("the pairing string has no {what} ({k}=); was it cut off?"))
        };
        let device_id = get("d", "device id")?.to_string();
        check_id("device id", &device_id).map_err(|e| e.0)?;
        let fingerprint: Fingerprint = get("f", "device fingerprint")?
            .parse()
            .map_err(|e| format!("pairing string: {e}"))?;
        let addresses = get("a", "address")?
            .split('+')
            .map(str::parse::<HostPort>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("pairing string: {e}"))?;
        if addresses.is_empty() {
            return Err("the pairing string has no address".into());
        }
        let username = match fields.get("u") {
            Some(u) => {
                check_id("user name", u).map_err(|e| e.0)?;
                Some((*u).to_string())
            }
            None => None,
        };
        let password = get("p", "password")?;
        if !secret_chars_ok(password) {
            return Err("the pairing string's password is malformed".into());
        }
        let sct = match fields.get("s") {
            Some(t) if secret_chars_ok(t) => Some(Secret::new(*t)),
            Some(_) => return Err("the pairing string's token is malformed".into()),
            None => None,
        };
        Ok(Self {
            device_id,
            fingerprint,
            addresses,
            username,
            password: Secret::new(password),
            sct,
        })
    }
}

/// `text` as a QR code drawn with Unicode half blocks (two rows per line), for a terminal.
/// `None` if it is too long for a QR code.
pub fn render_qr(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

impl PairingString {
    /// The block both CLIs print when they hand out a pairing string: a warning, the string,
    /// and (when `with_qr`, e.g. stdout is a terminal) its QR code.
    pub fn to_terminal(&self, with_qr: bool) -> String {
        let text = self.to_string();
        let mut out = format!(
            "Pairing string (contains a password: share it privately; it works once):\n\n  {text}\n"
        );
        if with_qr && let Some(qr) = render_qr(&text) {
            out.push('\n');
            out.push_str(&qr);
            out.push('\n');
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// PAKE
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Limiter
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, capacity: f64, per_sec: f64) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * per_sec).min(capacity);
        self.at = now;
    }

    fn wait(&self, per_sec: f64) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / per_sec)
        }
    }
}

/// Limits of [`AttemptLimiter`].
#[derive(Debug, Clone, Copy)]
pub struct LimiterConfig {
    /// Failures one source may make in a burst.
    pub per_source_burst: f64,
    /// Failures per second one source regains.
    pub per_source_rate: f64,
    /// Failures all sources together may make in a burst.
    pub global_burst: f64,
    /// Failures per second regained globally.
    pub global_rate: f64,
    /// Sources remembered at most (the map cannot be used to exhaust memory).
    pub max_sources: usize,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            per_source_burst: 5.0,
            per_source_rate: 0.2,
            global_burst: 30.0,
            global_rate: 1.0,
            max_sources: 4096,
        }
    }
}

/// Failed password attempts, per source and globally (token buckets; only failures spend).
///
/// A source is an IPv4 address or an IPv6 /64 (so an attacker cannot rotate through its own
/// prefix). One source that keeps guessing only exhausts its own bucket: the global one drains
/// only when many sources fail, and refills within seconds.
#[derive(Debug)]
pub struct AttemptLimiter {
    cfg: LimiterConfig,
    sources: HashMap<IpAddr, Bucket>,
    global: Bucket,
}

/// Whether an attempt may proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allowed,
    /// Too many failures; retry after this long.
    RetryAfter(Duration),
}

fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let mut s = v6.segments();
            s[4..].fill(0);
            IpAddr::V6(s.into())
        }
    }
}

impl AttemptLimiter {
    /// A limiter starting full at `now`.
    pub fn new(cfg: LimiterConfig, now: Instant) -> Self {
        Self {
            sources: HashMap::new(),
            global: Bucket {
                tokens: cfg.global_burst,
                at: now,
            },
            cfg,
        }
    }

    /// Whether `source` may try a password now.
    pub fn check(&mut self, source: IpAddr, now: Instant) -> Verdict {
        let c = self.cfg;
        self.global.refill(now, c.global_burst, c.global_rate);
        let mut wait = self.global.wait(c.global_rate);
        if let Some(b) = self.sources.get_mut(&source_key(source)) {
            b.refill(now, c.per_source_burst, c.per_source_rate);
            wait = wait.max(b.wait(c.per_source_rate));
        }
        if wait.is_zero() {
            Verdict::Allowed
        } else {
            Verdict::RetryAfter(wait)
        }
    }

    /// Spends a token of `source` and of the global bucket.
    pub fn failed(&mut self, source: IpAddr, now: Instant) {
        let c = self.cfg;
        self.global.refill(now, c.global_burst, c.global_rate);
        self.global.tokens = (self.global.tokens - 1.0).max(0.0);
        if self.sources.len() >= c.max_sources && !self.sources.contains_key(&source_key(source)) {
            // Forget buckets that refilled (they equal a fresh source), else the fullest one.
            self.sources.retain(|_, b| {
                b.refill(now, c.per_source_burst, c.per_source_rate);
                b.tokens < c.per_source_burst
            });
            if self.sources.len() >= c.max_sources
                && let Some(k) = self
                    .sources
                    .iter()
                    .max_by(|a, b| a.1.tokens.total_cmp(&b.1.tokens))
                    .map(|(k, _)| *k)
            {
                self.sources.remove(&k);
            }
        }
        let b = self.sources.entry(source_key(source)).or_insert(Bucket {
            tokens: c.per_source_burst,
            at: now,
        });
        b.refill(now, c.per_source_burst, c.per_source_rate);
        b.tokens = (b.tokens - 1.0).max(0.0);
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

    #[test]
    fn pairing_string_round_trip_and_errors() {
        let p = PairingString {
            device_id: "cam-1".into(),
            fingerprint: SecretKey::generate().fingerprint(),
            addresses: vec![
                "192.168.1.2:5592".parse().unwrap(),
                "[fd00::1]:5592".parse().unwrap(),
            ],
            username: Some("owner".into()),
            password: Secret::generate(SECRET_LEN),
            sct: Some(Secret::generate(SECRET_LEN)),
        };
        let s = p.to_string();
        assert!(!s.contains(' ') && !s.contains(';') && !s.contains('&'));
        assert_eq!(s.parse::<PairingString>().unwrap(), p);
        assert!(!format!("{p:?}").contains(p.password.expose()));
        let s_open = PairingString {
            username: None,
            sct: None,
            ..p
        };
        assert_eq!(s_open.to_string().parse::<PairingString>().unwrap(), s_open);
        for bad in [
            "",
            "tp2,d=x",
            &s.replace(",f=", ",g="),
            &s[..s.find(",a=").unwrap()],
            &s.replace(",p=", ",p=a b"),
            &format!("{s},d=again"),
            &s.replace(",u=owner", ",u=bad user"),
        ] {
            assert!(bad.parse::<PairingString>().is_err(), "{bad}");
        }
    }

    #[test]
    fn qr_codes_render() {
        let qr = render_qr("tp1,d=cam,f=00").unwrap();
        assert!(qr.lines().count() > 10);
        assert!(render_qr(&"x".repeat(5000)).is_none());
    }

    #[test]
    fn terminal_block_has_the_string_and_a_qr_code_only_when_asked() {
        let p = PairingString {
            device_id: "cam-1".into(),
            fingerprint: SecretKey::generate().fingerprint(),
            addresses: vec!["192.168.1.2:5592".parse().unwrap()],
            username: Some("owner".into()),
            password: Secret::generate(SECRET_LEN),
            sct: None,
        };
        let plain = p.to_terminal(false);
        assert_eq!(plain.lines().nth(2), Some(format!("  {p}").as_str()));
        assert_eq!(plain.lines().count(), 3);
        let with_qr = p.to_terminal(true);
        assert!(with_qr.starts_with(&plain));
        assert!(with_qr.ends_with(&format!("\n{}\n", render_qr(&p.to_string()).unwrap())));
    }

    #[test]
    fn limiter_is_per_source_with_a_global_cap() {
        let t0 = Instant::now();
        let mut l = AttemptLimiter::new(LimiterConfig::default(), t0);
        let attacker: IpAddr = "203.0.113.9".parse().unwrap();
        let user: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(l.check(attacker, t0), Verdict::Allowed);
            l.failed(attacker, t0);
        }
        let Verdict::RetryAfter(wait) = l.check(attacker, t0) else {
            panic!("not limited");
        };
        assert!(
            wait > Duration::from_secs(4) && wait <= Duration::from_secs(5),
            "{wait:?}"
        );
        // Another source is unaffected.
        assert_eq!(l.check(user, t0), Verdict::Allowed);
        // The attacker regains one attempt after 5 s.
        assert_eq!(
            l.check(attacker, t0 + Duration::from_secs(5)),
            Verdict::Allowed
        );
        // IPv6 sources are grouped by /64.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        for _ in 0..5 {
            l.failed(a, t0);
        }
        assert!(matches!(l.check(b, t0), Verdict::RetryAfter(_)));
        // Many sources together hit the global cap, which refills within seconds.
        let mut l = AttemptLimiter::new(LimiterConfig::default(), t0);
        for i in 0..30u8 {
            l.failed(IpAddr::from([10, 0, 0, i]), t0);
        }
        assert!(matches!(l.check(user, t0), Verdict::RetryAfter(_)));
        assert_eq!(l.check(user, t0 + Duration::from_secs(1)), Verdict::Allowed);
    }

    #[test]
    fn limiter_memory_is_bounded() {
        let t0 = Instant::now();
        let cfg = LimiterConfig {
            max_sources: 100,
            ..LimiterConfig::default()
        };
        let mut l = AttemptLimiter::new(cfg, t0);
        for i in 0..10_000u32 {
            l.failed(IpAddr::from(i.to_be_bytes()), t0);
            assert!(l.sources.len() <= 100);
        }
    }
}
