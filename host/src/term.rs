//! Guest text made safe for a person's terminal.
//!
//! Names, logs, errors and printed lines from a guest are untrusted: an ANSI or OSC escape
//! sequence can clear the screen, retitle the window or write the clipboard (OSC 52); a bidi
//! override or a newline can make one routine's line look like another's, or like the summary.
//! Wherever routilux renders guest text for a person it goes through [`escape`]: control
//! characters (C0, DEL, C1), bidi controls and line/paragraph separators become visible
//! escapes (`\x1b`, `\u{202e}`), while printable Unicode (`→`, accents, CJK, emoji with their
//! joiners) passes through unchanged.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` must not reach a terminal as itself.
fn unsafe_char(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        // Bidi marks, embeddings, overrides and isolates.
        | '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        // Line and paragraph separators (some terminals break lines on them).
        | '\u{2028}' | '\u{2029}'
        // Interlinear annotations and the byte-order mark inside text.
        | '\u{fff9}'..='\u{fffb}' | '\u{feff}')
}

fn push_escaped(out: &mut String, c: char) {
    let n = c as u32;
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        _ if n <= 0xff => {
            let _ = write!(out, "\\x{n:02x}");
        }
        _ => {
            let _ = write!(out, "\\u{{{n:x}}}");
        }
    }
}

/// `text` with every unsafe character escaped (newlines too: the result is one line).
pub fn escape(text: &str) -> Cow<'_, str> {
    escape_keeping(text, false)
}

/// As [`escape`], but newlines are kept (for text whose lines routilux laid out itself, such
/// as a diagnostic; a guest's own newlines inside one of its lines are escaped by [`escape`]
/// before it is composed).
pub fn escape_multiline(text: &str) -> Cow<'_, str> {
    escape_keeping(text, true)
}

fn escape_keeping(text: &str, newlines: bool) -> Cow<'_, str> {
    let bad = |c: char| unsafe_char(c) && !(newlines && c == '\n');
    let Some(first) = text.find(bad) else {
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len() + 16);
    out.push_str(&text[..first]);
    for c in text[first..].chars() {
        if bad(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_sequences_are_escaped_and_printable_unicode_is_kept() {
        assert_eq!(escape("plain → café 東京 😀"), "plain → café 東京 😀");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape("\x1b[2J\x1b]0;pwned\x07"),
            "\\x1b[2J\\x1b]0;pwned\\x07"
        );
        assert_eq!(
            escape("\x1b]52;c;aGk=\x1b\\"),
            "\\x1b]52;c;aGk=\\x1b\\",
            "OSC 52 clipboard write"
        );
        assert_eq!(escape("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(escape("\u{202e}evil\u{2066}"), "\\u{202e}evil\\u{2066}");
        assert_eq!(escape("\u{9b}31m"), "\\x9b31m", "C1 CSI");
        assert_eq!(escape("x\u{2028}y"), "x\\u{2028}y");
        assert_eq!(escape_multiline("one\ntwo\x1b"), "one\ntwo\\x1b");
        // Emoji sequences keep their zero-width joiners.
        assert_eq!(escape("👩\u{200d}💻"), "👩\u{200d}💻");
    }
}
