//! Strings that came from a peer, made safe to print: control characters (C0, DEL, C1: escape
//! sequences, carriage returns, backspaces) and Unicode bidirectional controls are written as
//! `\u{…}` escapes, so a peer cannot clear a terminal, move the cursor, forge log lines or
//! reorder what a user reads.
//!
//! Kind: pure. The client applies it to everything a device sends (ids, names, roles, service
//! metadata, error texts, close reasons) before it is printed or saved, in text and `--json`
//! output alike; the device applies it to the client's self-chosen name before logging it.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal or a log as is.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe character escaped as `\u{…}`; borrowed when there is none.
pub fn text(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Sanitizes `s` in place.
pub fn in_place(s: &mut String) {
    if let Cow::Owned(clean) = text(s) {
        *s = clean;
    }
}

/// Escapes every peer string of a message in place.
pub trait Sanitize {
    /// Escapes unsafe characters in every string field.
    fn sanitize(&mut self);
}

impl Sanitize for String {
    fn sanitize(&mut self) {
        in_place(self);
    }
}

impl<T: Sanitize> Sanitize for Option<T> {
    fn sanitize(&mut self) {
        if let Some(v) = self {
            v.sanitize();
        }
    }
}

impl<T: Sanitize> Sanitize for Vec<T> {
    fn sanitize(&mut self) {
        for v in self {
            v.sanitize();
        }
    }
}

use crate::proto::{
    ErrorReply, Invite, PairingInfo, Response, ServiceInfo, Settings, UserInfo, Welcome,
};

impl Sanitize for Welcome {
    fn sanitize(&mut self) {
        self.device_id.sanitize();
        self.device_name.sanitize();
        self.user.sanitize();
        self.role.sanitize();
    }
}

impl Sanitize for ServiceInfo {
    fn sanitize(&mut self) {
        self.id.sanitize();
        self.service_type.sanitize();
        let metadata = std::mem::take(&mut self.metadata);
        self.metadata = metadata
            .into_iter()
            .map(|(k, v)| (text(&k).into_owned(), text(&v).into_owned()))
            .collect();
    }
}

impl Sanitize for UserInfo {
    fn sanitize(&mut self) {
        self.username.sanitize();
        self.display_name.sanitize();
        self.role.sanitize();
        for (_, name) in &mut self.fingerprints {
            name.sanitize();
        }
    }
}

impl Sanitize for Response {
    fn sanitize(&mut self) {
        match self {
            Self::Services(s) => s.sanitize(),
            Self::Service(s) => s.sanitize(),
            Self::Error(ErrorReply { message, .. }) => message.sanitize(),
            Self::Me(u) => u.sanitize(),
            Self::Paired(u) | Self::User(u) => u.sanitize(),
            Self::Users(u) => u.sanitize(),
            Self::Pairing(PairingInfo {
                device_id,
                device_name,
                ..
            }) => {
                device_id.sanitize();
                device_name.sanitize();
            }
            Self::Invite(Invite { username, role, .. }) => {
                username.sanitize();
                role.sanitize();
            }
            Self::Roles(r) => r.sanitize(),
            Self::Settings(Settings {
                open_pairing_role, ..
            }) => open_pairing_role.sanitize(),
            // Relays are parsed values (`HOST:PORT` with a checked host, a hex fingerprint),
            // candidates socket addresses: nothing printable is left to escape.
            Self::Ok
            | Self::PakeReply { .. }
            | Self::PakeConfirmed { .. }
            | Self::Token(_)
            | Self::Relays(_)
            | Self::Punch { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_would_act_on() {
        assert!(matches!(text("plain name é ✓"), Cow::Borrowed(_)));
        assert_eq!(text("\x1b[2Jgone"), "\\u{1b}[2Jgone");
        assert_eq!(text("a\rb\nc\x08"), "a\\u{d}b\\u{a}c\\u{8}");
        assert_eq!(text("x\u{9b}y\u{7f}"), "x\\u{9b}y\\u{7f}");
        assert_eq!(text("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        let mut s = String::from("\x1b]0;title\x07");
        in_place(&mut s);
        assert!(!s.chars().any(char::is_control), "{s}");
    }

    #[test]
    fn every_string_of_an_answer_is_escaped() {
        let evil = "\x1b[2J\x1b[Hverified".to_string();
        let mut r = Response::Services(vec![ServiceInfo {
            id: evil.clone(),
            service_type: evil.clone(),
            metadata: [(evil.clone(), evil.clone())].into(),
        }]);
        r.sanitize();
        let Response::Services(s) = &r else {
            unreachable!()
        };
        for t in [&s[0].id, &s[0].service_type] {
            assert!(!t.contains('\x1b'), "{t}");
        }
        assert!(
            s[0].metadata
                .iter()
                .all(|(k, v)| !k.contains('\x1b') && !v.contains('\x1b'))
        );
        let mut w = Welcome {
            version: 1,
            device_id: evil.clone(),
            device_name: evil.clone(),
            user: Some(evil.clone()),
            role: evil,
            local: true,
        };
        w.sanitize();
        assert!(!format!("{w:?}").contains('\x1b'));
    }
}
