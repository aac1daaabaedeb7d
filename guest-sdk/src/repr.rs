//! Python's `repr` of a JSON value, for routines ported from the Python reference library,
//! whose examples print items as Python prints a dict: `{'id': 1, 'priority': 9}`.
//!
//! Objects print as dicts, arrays as lists, strings with Python's choice of quotes and escapes,
//! `true`/`false`/`null` as `True`/`False`/`None`, and floats as Python's `repr(float)` does
//! (the shortest text that reads back the same number, `1e+16` past 16 digits, `1.0` for a
//! whole float). An object's keys print in the order the [`Value`] holds them (serde_json's
//! default map is sorted by key; Python keeps insertion order). An integer past the 64-bit
//! range was already a float when the JSON was read, and prints as one.

use std::fmt::Write;

use serde_json::Value;

/// `repr(value)` as Python prints it.
pub fn python_repr(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else {
                write_float(out, n.as_f64().unwrap_or(f64::NAN));
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, key);
                out.push_str(": ");
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

/// Python's `float.__repr__`: the shortest round-tripping digits, positional when the decimal
/// exponent is in -4..16, else scientific with a sign and at least two exponent digits.
fn write_float(out: &mut String, x: f64) {
    if x.is_nan() {
        out.push_str("nan");
        return;
    }
    if x.is_infinite() {
        out.push_str(if x < 0.0 { "-inf" } else { "inf" });
        return;
    }
    // Rust's `{:e}` gives the shortest round-tripping digits: `-1.2345e3`, `5e-7`.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    out.push_str(sign);
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-point) as usize));
            out.push_str(&digits);
        } else if point as usize >= digits.len() {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', point as usize - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..point as usize]);
            out.push('.');
            out.push_str(&digits[point as usize..]);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
}

/// Python's `str.__repr__`: single quotes unless the text holds `'` and no `"`; backslash,
/// the quote, `\t` `\n` `\r` escaped; other characters Python does not print as themselves
/// (controls, format characters, separators, surrogates) as `\xNN`, `\uNNNN` or `\UNNNNNNNN`.
fn write_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !printable(c) => {
                let n = c as u32;
                let _ = if n < 0x100 {
                    write!(out, "\\x{n:02x}")
                } else if n < 0x10000 {
                    write!(out, "\\u{n:04x}")
                } else {
                    write!(out, "\\U{n:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Whether Python's `str.isprintable` holds for `c` (close to it: controls, format characters,
/// noncharacters, line and paragraph separators and non-space spaces are not; a code point
/// unassigned in Python's Unicode database, which Python escapes, prints as itself here).
fn printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() {
        return false;
    }
    let n = c as u32;
    if n & 0xfffe == 0xfffe || (0xfdd0..=0xfdef).contains(&n) {
        return false; // noncharacters
    }
    !matches!(n,
        0xad                      // soft hyphen (Cf)
        | 0x890..=0x891 | 0x8e2 | 0x110bd | 0x110cd | 0x13430..=0x1343f
        | 0x1bca0..=0x1bca3 | 0x1d173..=0x1d17a
        | 0xa0                    // no-break space (Zs)
        | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f
        | 0x1680 | 0x180e
        | 0x2000..=0x200f         // spaces, zero-width, directional marks
        | 0x2028..=0x202f         // separators, bidi embeddings and overrides
        | 0x205f..=0x2064 | 0x2066..=0x206f
        | 0x3000 | 0xfeff | 0xfff9..=0xfffb
        | 0xe000..=0xf8ff         // private use
        | 0xf0000..=0x10ffff
        | 0xe0001 | 0xe0020..=0xe007f)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::python_repr;

    #[test]
    fn dicts_lists_and_constants_print_as_python_prints_them() {
        assert_eq!(
            python_repr(&json!({"id": 1, "priority": 9})),
            "{'id': 1, 'priority': 9}"
        );
        assert_eq!(
            python_repr(&json!({"a": [true, false, null, -3], "b": {}})),
            "{'a': [True, False, None, -3], 'b': {}}"
        );
        assert_eq!(python_repr(&json!([])), "[]");
        assert_eq!(
            python_repr(&json!(18446744073709551615u64)),
            "18446744073709551615"
        );
    }

    #[test]
    fn strings_take_python_quotes_and_escapes() {
        assert_eq!(python_repr(&json!("plain")), "'plain'");
        assert_eq!(python_repr(&json!("it's")), "\"it's\"");
        assert_eq!(python_repr(&json!("both ' and \"")), "'both \\' and \"'");
        assert_eq!(python_repr(&json!("a\\b\n\t\r")), "'a\\\\b\\n\\t\\r'");
        assert_eq!(python_repr(&json!("\u{1b}[2J")), "'\\x1b[2J'");
        assert_eq!(python_repr(&json!("\u{202e}x")), "'\\u202ex'");
        assert_eq!(python_repr(&json!("→ café 日本")), "'→ café 日本'");
        assert_eq!(python_repr(&json!("\u{7f}")), "'\\x7f'");
        assert_eq!(python_repr(&json!("\u{ffff}\u{fdd0}")), "'\\uffff\\ufdd0'");
    }

    #[test]
    fn floats_print_as_python_repr_of_a_float() {
        for (x, py) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (123456.789, "123456.789"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (9999999999999998.0, "9999999999999998.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.25e-7, "1.25e-07"),
            (1e100, "1e+100"),
            (0.0, "0.0"),
        ] {
            assert_eq!(python_repr(&json!(x)), py, "{x}");
        }
    }
}
