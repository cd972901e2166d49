//! Where things are in the policy files, and the problems found there.
//!
//! Locations stay byte offsets into a file until the end, when every problem is turned
//! into a [`Diagnostic`] with a 1-based line and column (columns count characters).

use super::Diagnostic;
use std::fmt;
use std::path::{Path, PathBuf};

/// A position in one of the policy files: the file's index in the [`SourceMap`] and a
/// byte offset into its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Loc {
    pub file: usize,
    pub offset: usize,
}

/// The texts of the files a policy was read from, in merge order.
#[derive(Debug, Default)]
pub struct SourceMap {
    files: Vec<(PathBuf, String)>,
}

impl SourceMap {
    pub fn add(&mut self, path: &Path, text: &str) -> usize {
        self.files.push((path.to_path_buf(), text.to_string()));
        self.files.len() - 1
    }

    pub fn path(&self, file: usize) -> &Path {
        self.files
            .get(file)
            .map_or(Path::new("<policy>"), |(p, _)| p.as_path())
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|(p, _)| p.clone()).collect()
    }

    /// 1-based line and column of a location.
    pub fn line_col(&self, loc: Loc) -> (usize, usize) {
        let Some((_, text)) = self.files.get(loc.file) else {
            return (1, 1);
        };
        let mut offset = loc.offset.min(text.len());
        // Offsets from the parser are char boundaries; clamp defensively anyway.
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    /// `FILE:LINE:COL`, for hints that refer to another place.
    pub fn describe(&self, loc: Loc) -> String {
        let (line, column) = self.line_col(loc);
        format!("{}:{line}:{column}", self.path(loc.file).display())
    }
}

/// Where a problem is: a position, or a whole file (it could not be read, or is missing).
#[derive(Debug, Clone, PartialEq)]
pub enum Where {
    At(Loc),
    File(PathBuf),
}

#[derive(Debug, Clone)]
struct Problem {
    at: Where,
    message: String,
    hint: Option<String>,
}

/// Collects every problem; validation goes on after each one.
#[derive(Debug, Default)]
pub struct Diags {
    pub sources: SourceMap,
    problems: Vec<Problem>,
}

impl Diags {
    pub fn error(&mut self, at: Loc, message: impl Into<String>, hint: impl Into<String>) {
        self.push(Where::At(at), message.into(), Some(hint.into()));
    }

    pub fn file_error(&mut self, file: &Path, message: impl Into<String>, hint: Option<String>) {
        self.push(Where::File(file.to_path_buf()), message.into(), hint);
    }

    fn push(&mut self, at: Where, message: String, hint: Option<String>) {
        let hint = hint.filter(|h| !h.is_empty());
        self.problems.push(Problem { at, message, hint });
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// The diagnostics in file order, then by position; whole-file problems first.
    pub fn into_diagnostics(self) -> Vec<Diagnostic> {
        let Diags {
            sources,
            mut problems,
        } = self;
        problems.sort_by_key(|p| match &p.at {
            Where::File(_) => (0, 0, 0),
            Where::At(loc) => (1, loc.file, loc.offset),
        });
        problems.into_iter().map(|p| render(&sources, p)).collect()
    }
}

fn render(sources: &SourceMap, problem: Problem) -> Diagnostic {
    let (file, line, column) = match problem.at {
        Where::File(path) => (path, 0, 0),
        Where::At(loc) => {
            let (line, column) = sources.line_col(loc);
            (sources.path(loc.file).to_path_buf(), line, column)
        }
    };
    Diagnostic {
        file,
        line,
        column,
        message: problem.message,
        hint: problem.hint,
    }
}

impl fmt::Display for Diagnostic {
    /// `FILE:LINE:COL: error: MESSAGE` and an indented hint line; line 0 means the
    /// problem concerns the whole file, so no position is printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: error: {}", self.file.display(), self.message)?;
        } else {
            write!(
                f,
                "{}:{}:{}: error: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters() {
        let mut map = SourceMap::default();
        let f = map.add(Path::new("p.toml"), "a = 1\nné = \"x\"\n");
        assert_eq!(map.line_col(Loc { file: f, offset: 0 }), (1, 1));
        assert_eq!(map.line_col(Loc { file: f, offset: 6 }), (2, 1));
        // "né" is 3 bytes but 2 characters: the '=' after it (byte 10) is column 4.
        assert_eq!(
            map.line_col(Loc {
                file: f,
                offset: 10
            }),
            (2, 4)
        );
        assert_eq!(map.describe(Loc { file: f, offset: 6 }), "p.toml:2:1");
    }

    #[test]
    fn display_with_and_without_position() {
        let d = Diagnostic {
            file: "a.toml".into(),
            line: 3,
            column: 7,
            message: "bad".into(),
            hint: Some("good".into()),
        };
        assert_eq!(d.to_string(), "a.toml:3:7: error: bad\n  hint: good");
        let d = Diagnostic {
            line: 0,
            column: 0,
            hint: None,
            ..d
        };
        assert_eq!(d.to_string(), "a.toml: error: bad");
    }
}
