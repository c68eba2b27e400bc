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
}
