//! Diagnostics that name file, line and column, and show the line, as compilers do.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::Location;

/// How bad.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Severity {
    Error,
    Warning,
}

/// A place in a file.
#[derive(Clone, Debug)]
pub(crate) struct Place {
    pub file: PathBuf,
    /// 1-based line and column; 0 when unknown.
    pub line: u64,
    pub column: u64,
    /// The text of that line.
    pub text: Option<String>,
}

/// One message for a person.
#[derive(Clone, Debug)]
pub(crate) struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    pub place: Option<Place>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            message: message.into(),
            place: None,
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{label}: {}", self.message)?;
        let Some(p) = &self.place else {
            return Ok(());
        };
        if p.line == 0 {
            return write!(f, "\n  --> {}", p.file.display());
        }
        write!(f, "\n  --> {}:{}:{}", p.file.display(), p.line, p.column)?;
        if let Some(text) = &p.text {
            let num = p.line.to_string();
            let pad = " ".repeat(num.len());
            let col = (p.column.max(1) - 1) as usize;
            let rest: String = text.chars().skip(col).collect();
            let len = token_len(&rest).max(1);
            write!(
                f,
                "\n{pad} |\n{num} | {text}\n{pad} | {}{}",
                " ".repeat(text.chars().take(col).count()),
                "^".repeat(len)
            )?;
        }
        Ok(())
    }
}

/// The length of the token at the start of `s`: a quoted string, or up to a delimiter.
fn token_len(s: &str) -> usize {
    let mut chars = s.chars();
    match chars.next() {
        Some(q @ ('"' | '\'')) => s[1..]
            .find(q)
            .map_or(s.chars().count(), |i| s[..i + 2].chars().count()),
        _ => {
            let token: String = s
                .chars()
                .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | '}' | ']' | '#'))
                .collect();
            // A mapping key: not its colon.
            token.strip_suffix(':').unwrap_or(&token).chars().count()
        }
    }
}

/// A source file that diagnostics point into.
pub(crate) struct Source {
    pub path: PathBuf,
    pub text: String,
    /// Where each line starts (so a diagnostic finds its line without a scan).
    line_starts: Vec<usize>,
}

/// Largest flow file or manifest read, in bytes (a flow of 10,000 routines is ~1 MiB).
pub(crate) const MAX_SOURCE_BYTES: u64 = 16 << 20;

impl Source {
    /// Reads a flow file or manifest: at most [`MAX_SOURCE_BYTES`] (a device or a huge file
    /// is refused, not read until memory runs out).
    pub fn read(path: &Path) -> Result<Self, Diagnostic> {
        use std::io::Read;
        let fail = |e: String| Diagnostic::error(format!("cannot read {}: {e}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
        let mut bytes = Vec::new();
        file.take(MAX_SOURCE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| fail(e.to_string()))?;
        if bytes.len() as u64 > MAX_SOURCE_BYTES {
            return Err(fail(format!(
                "it is larger than {} MiB, the most a flow file or manifest may be",
                MAX_SOURCE_BYTES >> 20
            )));
        }
        let text = String::from_utf8(bytes).map_err(|e| fail(format!("not UTF-8: {e}")))?;
        Ok(Self::from_text(path, text))
    }

    /// A source of `text`, named `path` in messages.
    pub(crate) fn from_text(path: &Path, text: String) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            path: path.to_owned(),
            text,
            line_starts,
        }
    }

    /// The place of a parsed value.
    pub fn place(&self, at: &Location) -> Place {
        let (line, column) = (at.line(), at.column());
        let text = (line > 0)
            .then(|| {
                let start = *self.line_starts.get(line as usize - 1)?;
                let rest = &self.text[start..];
                Some(rest.lines().next().unwrap_or(""))
            })
            .flatten()
            .map(|l| l.trim_end().to_owned());
        Place {
            file: self.path.clone(),
            line,
            column,
            text,
        }
    }

    pub fn error(&self, at: &Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            place: Some(self.place(at)),
        }
    }

    pub fn warning(&self, at: &Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            message: message.into(),
            place: Some(self.place(at)),
        }
    }

    /// Parses the file as YAML (JSON is YAML too) into `T`; a syntax or shape error becomes
    /// one diagnostic at its place.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, Diagnostic> {
        serde_saphyr::from_str::<T>(&self.text).map_err(|e| {
            let at = e.location().unwrap_or(Location::UNKNOWN);
            self.error(&at, first_line(&e.to_string()))
        })
    }
}

/// serde-saphyr's message without the snippet it renders itself (we render our own).
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message);
    // "error: line 3 column 5: msg" style prefixes repeat what the place says.
    let line = line.trim_start_matches("error: ");
    if let Some(detail) = line.strip_prefix("budget breached: ") {
        return format!(
            "the file is past a parser budget ({detail}); routilux refuses YAML this large or \
             this deeply nested"
        );
    }
    match line.find(": ") {
        Some(i) if line[..i].starts_with("line ") => line[i + 2..].to_owned(),
        _ => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_file_line_column_and_a_caret_under_the_token() {
        let src = Source::from_text(Path::new("f.yaml"), "a:\n  kind: emial # typo\n".into());
        let at = serde_saphyr::from_str::<
            std::collections::BTreeMap<
                String,
                serde_saphyr::Spanned<
                    std::collections::BTreeMap<String, serde_saphyr::Spanned<String>>,
                >,
            >,
        >(&src.text)
        .unwrap();
        let kind = &at["a"].value["kind"];
        let d = src.error(&kind.referenced, "unknown kind `emial`");
        assert_eq!(
            d.to_string(),
            "error: unknown kind `emial`\n  --> f.yaml:2:9\n  |\n2 |   kind: emial # typo\n  |         ^^^^^"
        );
    }
}
