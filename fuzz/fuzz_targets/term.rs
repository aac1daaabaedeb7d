//! Terminal escaping: never a panic; nothing unsafe survives, escaping is idempotent, and
//! newlines are kept only by the multi-line form.
#![no_main]

#[allow(dead_code)]
#[path = "../../host/src/term.rs"]
mod term;

use libfuzzer_sys::fuzz_target;

fn safe(c: char) -> bool {
    let n = c as u32;
    !(n < 0x20 || (0x7f..=0x9f).contains(&n)) && !matches!(c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        | '\u{2028}' | '\u{2029}' | '\u{fff9}'..='\u{fffb}' | '\u{feff}')
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let one = term::escape(&text);
    assert!(one.chars().all(safe), "{one:?}");
    assert_eq!(term::escape(&one), one, "escaping twice changes nothing");
    let many = term::escape_multiline(&text);
    assert!(many.chars().all(|c| c == '\n' || safe(c)), "{many:?}");
    assert_eq!(many.matches('\n').count(), text.matches('\n').count());
});
