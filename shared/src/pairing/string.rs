//! The pairing string: everything a client needs to pair, on one line (and as a QR code).
//!
//! Kind: pure.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::config::{HostPort, RelayRef, check_id};
use crate::identity::Fingerprint;
use crate::secret::Secret;

/// Everything a client needs to pair from one line: `tp1,d=ID,f=FINGERPRINT,a=ADDR+ADDR,
/// r=RELAY/RELAY_FP+…,u=USER,p=PASSWORD,s=SCT`. It carries the device's fingerprint (and each
/// relay's), so the client pins the device from the first packet (no trust on first use). With a
/// relay (`r=`), pairing works from anywhere; `a=` may then be left out. Safe to paste unquoted
/// into a shell.
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
    /// Relays the device is attached to.
    pub relays: Vec<RelayRef>,
}

impl fmt::Debug for PairingString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairingString")
            .field("device_id", &self.device_id)
            .field("fingerprint", &self.fingerprint)
            .field("addresses", &self.addresses)
            .field("relays", &self.relays)
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
            "{PAIRING_PREFIX},d={},f={}",
            self.device_id, self.fingerprint
        )?;
        if !addrs.is_empty() {
            write!(f, ",a={}", addrs.join("+"))?;
        }
        if !self.relays.is_empty() {
            let relays: Vec<String> = self
                .relays
                .iter()
                .map(|r| format!("{}/{}", r.addr, r.fingerprint))
                .collect();
            write!(f, ",r={}", relays.join("+"))?;
        }
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

/// Why a pairing string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingStringError {
    /// It does not start with the prefix.
    #[error(
        "not a pairing string: it should start with '{PAIRING_PREFIX},' (copy the whole line \
         tunnel-device printed)"
    )]
    Prefix,
    /// A field is not `key=value`.
    #[error("malformed pairing string field '{0}'")]
    Malformed(String),
    /// A field this version does not know.
    #[error("unknown pairing string field '{0}'")]
    UnknownField(String),
    /// A field appears twice.
    #[error("pairing string field '{0}' appears twice")]
    Duplicate(String),
    /// A required field is missing.
    #[error("the pairing string has no {what} ({key}=); was it cut off?")]
    Missing {
        /// The field's key.
        key: &'static str,
        /// What it holds.
        what: &'static str,
    },
    /// A field's value is invalid.
    #[error("pairing string: {0}")]
    Invalid(String),
}

impl FromStr for PairingString {
    type Err = PairingStringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use PairingStringError as E;
        let s = s.trim();
        let mut parts = s.split(',');
        if parts.next() != Some(PAIRING_PREFIX) {
            return Err(E::Prefix);
        }
        let mut fields: HashMap<&str, &str> = HashMap::new();
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| E::Malformed(part.to_string()))?;
            if !matches!(k, "d" | "f" | "a" | "r" | "u" | "p" | "s") {
                return Err(E::UnknownField(k.to_string()));
            }
            if fields.insert(k, v).is_some() {
                return Err(E::Duplicate(k.to_string()));
            }
        }
        let get = |key: &'static str, what: &'static str| {
            fields.get(key).copied().ok_or(E::Missing { key, what })
        };
        let invalid = |e: &dyn fmt::Display| E::Invalid(e.to_string());
        let device_id = get("d", "device id")?.to_string();
        check_id("device id", &device_id).map_err(|e| invalid(&e))?;
        let fingerprint: Fingerprint = get("f", "device fingerprint")?
            .parse()
            .map_err(|e| invalid(&e))?;
        let addresses = match fields.get("a") {
            Some(a) => a
                .split('+')
                .map(str::parse::<HostPort>)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(&e))?,
            None => Vec::new(),
        };
        let relays = fields
            .get("r")
            .map_or(Ok(Vec::new()), |r| parse_relays(r))?;
        if addresses.is_empty() && relays.is_empty() {
            return Err(E::Missing {
                key: "a",
                what: "address",
            });
        }
        let username = match fields.get("u") {
            Some(u) => {
                check_id("user name", u).map_err(|e| invalid(&e))?;
                Some((*u).to_string())
            }
            None => None,
        };
        let password = get("p", "password")?;
        if !secret_chars_ok(password) {
            return Err(invalid(&"the password is malformed"));
        }
        let sct = match fields.get("s") {
            Some(t) if secret_chars_ok(t) => Some(Secret::new(*t)),
            Some(_) => return Err(invalid(&"the token is malformed")),
            None => None,
        };
        Ok(Self {
            device_id,
            fingerprint,
            addresses,
            username,
            password: Secret::new(password),
            sct,
            relays,
        })
    }
}

/// `r=`: `HOST:PORT/FINGERPRINT` joined by `+`.
fn parse_relays(value: &str) -> Result<Vec<RelayRef>, PairingStringError> {
    let invalid = |e: &dyn fmt::Display| PairingStringError::Invalid(e.to_string());
    value
        .split('+')
        .map(|one| {
            let (addr, fp) = one.rsplit_once('/').ok_or_else(|| {
                PairingStringError::Invalid(format!("relay '{one}' must be HOST:PORT/FINGERPRINT"))
            })?;
            Ok(RelayRef {
                addr: addr.parse().map_err(|e| invalid(&e))?,
                fingerprint: fp.parse().map_err(|e| invalid(&e))?,
            })
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

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
            password: Secret::generate(crate::pairing::SECRET_LEN),
            sct: Some(Secret::generate(crate::pairing::SECRET_LEN)),
            relays: Vec::new(),
        };
        let s = p.to_string();
        assert!(!s.contains(' ') && !s.contains(';') && !s.contains('&'));
        assert_eq!(s.parse::<PairingString>().unwrap(), p);
        assert!(!format!("{p:?}").contains(p.password.expose()));
        let s_open = PairingString {
            username: None,
            sct: None,
            ..p.clone()
        };
        assert_eq!(s_open.to_string().parse::<PairingString>().unwrap(), s_open);
        // With relays, the direct addresses may be left out.
        let relayed = PairingString {
            addresses: Vec::new(),
            relays: vec![
                RelayRef {
                    addr: "relay.example.net:5593".parse().unwrap(),
                    fingerprint: SecretKey::generate().fingerprint(),
                },
                RelayRef {
                    addr: "[2001:db8::1]:443".parse().unwrap(),
                    fingerprint: SecretKey::generate().fingerprint(),
                },
            ],
            ..p
        };
        let text = relayed.to_string();
        assert!(!text.contains(",a=") && text.contains(",r=relay.example.net:5593/"));
        assert_eq!(text.parse::<PairingString>().unwrap(), relayed);
        for bad_relay in ["r=relay:5593", "r=relay:5593/abc", "r=nohost/00"] {
            let t = format!("{},{bad_relay}", &s[..s.find(",a=").unwrap()]);
            assert!(t.parse::<PairingString>().is_err(), "{t}");
        }
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
            password: Secret::generate(crate::pairing::SECRET_LEN),
            sct: None,
            relays: Vec::new(),
        };
        let plain = p.to_terminal(false);
        assert_eq!(plain.lines().nth(2), Some(format!("  {p}").as_str()));
        assert_eq!(plain.lines().count(), 3);
        let with_qr = p.to_terminal(true);
        assert!(with_qr.starts_with(&plain));
        assert!(with_qr.ends_with(&format!("\n{}\n", render_qr(&p.to_string()).unwrap())));
    }
}
