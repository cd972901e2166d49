//! Kubernetes label selectors as written in the `kvstrap.io/node-selector` annotation
//! (`a=b,c in (d,e),!f`, `a!=b`, `a`, `x notin (y)`), parsed once and matched against a
//! Node's labels. The grammar is the one `kubectl get -l` accepts; an empty selector
//! matches every node.

use std::collections::BTreeMap;
use std::fmt;

/// One requirement of a selector; all of them must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key` present (any value).
    Exists(String),
    /// `!key`: the label is absent.
    NotExists(String),
    /// `key=value`, `key==value`, `key in (a,b)`.
    In(String, Vec<String>),
    /// `key!=value`, `key notin (a,b)`: absent or another value.
    NotIn(String, Vec<String>),
}

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

/// Why a selector does not parse, with the 1-based character column it was found at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct SelectorError {
    pub column: usize,
    pub message: String,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let mut p = Parser {
            chars: text.chars().collect(),
            pos: 0,
        };
        let mut requirements = Vec::new();
        p.skip_space();
        if p.at_end() {
            return Ok(Selector::default());
        }
        loop {
            requirements.push(p.requirement()?);
            p.skip_space();
            if p.at_end() {
                break;
            }
            p.expect(',')?;
        }
        Ok(Selector { requirements })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
            Requirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::Exists(k) => k.clone(),
                Requirement::NotExists(k) => format!("!{k}"),
                Requirement::In(k, v) if v.len() == 1 => format!("{k}={}", v[0]),
                Requirement::In(k, v) => format!("{k} in ({})", v.join(",")),
                Requirement::NotIn(k, v) if v.len() == 1 => format!("{k}!={}", v[0]),
                Requirement::NotIn(k, v) => format!("{k} notin ({})", v.join(",")),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, SelectorError> {
        Err(SelectorError {
            column: self.pos + 1,
            message: message.into(),
        })
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, c: char) -> Result<(), SelectorError> {
        self.skip_space();
        if self.peek() == Some(c) {
            self.pos += 1;
            return Ok(());
        }
        match self.peek() {
            Some(found) => self.error(format!("expected '{c}', found '{found}'")),
            None => self.error(format!("expected '{c}' at the end")),
        }
    }

    /// A label key or value: letters, digits, `-`, `_`, `.`, and `/` (key prefixes).
    fn word(&mut self, what: &str) -> Result<String, SelectorError> {
        self.skip_space();
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        {
            self.pos += 1;
        }
        if self.pos == start {
            return match self.peek() {
                Some(c) => self.error(format!("expected {what}, found '{c}'")),
                None => self.error(format!("expected {what} at the end")),
            };
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        self.skip_space();
        if self.peek() == Some('!') {
            self.pos += 1;
            return Ok(Requirement::NotExists(self.word("a label key after '!'")?));
        }
        let key = self.word("a label key")?;
        self.skip_space();
        let rest: String = self.chars[self.pos..].iter().take(2).collect();
        match self.peek() {
            None | Some(',') => Ok(Requirement::Exists(key)),
            Some('!') if rest == "!=" => {
                self.pos += 2;
                Ok(Requirement::NotIn(key, vec![self.value()?]))
            }
            Some('=') => {
                self.pos += if rest == "==" { 2 } else { 1 };
                Ok(Requirement::In(key, vec![self.value()?]))
            }
            _ => self.set_requirement(key),
        }
    }

    /// A value after `=`/`!=`; empty is allowed (`a=` selects an empty label value).
    fn value(&mut self) -> Result<String, SelectorError> {
        self.skip_space();
        match self.peek() {
            None | Some(',') => Ok(String::new()),
            _ => self.word("a label value"),
        }
    }

    fn set_requirement(&mut self, key: String) -> Result<Requirement, SelectorError> {
        let op = self.word("an operator (=, !=, in, notin)")?;
        let values = match op.as_str() {
            "in" | "notin" => self.value_set()?,
            other => {
                self.pos -= other.chars().count();
                return self.error(format!(
                    "unknown operator \"{other}\" after \"{key}\": write =, !=, in (...) or notin (...)"
                ));
            }
        };
        Ok(if op == "in" {
            Requirement::In(key, values)
        } else {
            Requirement::NotIn(key, values)
        })
    }

    fn value_set(&mut self) -> Result<Vec<String>, SelectorError> {
        self.expect('(')?;
        let mut values = Vec::new();
        loop {
            values.push(self.word("a label value")?);
            self.skip_space();
            if self.peek() == Some(')') {
                self.pos += 1;
                return Ok(values);
            }
            self.expect(',')?;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(text: &str) -> Selector {
        Selector::parse(text).expect(text)
    }

    #[test]
    fn the_full_grammar_parses() {
        let s = sel("a=b, c in (d, e),!f,g!=h,i notin (j),k,l==m");
        assert_eq!(
            s.requirements,
            [
                Requirement::In("a".into(), vec!["b".into()]),
                Requirement::In("c".into(), vec!["d".into(), "e".into()]),
                Requirement::NotExists("f".into()),
                Requirement::NotIn("g".into(), vec!["h".into()]),
                Requirement::NotIn("i".into(), vec!["j".into()]),
                Requirement::Exists("k".into()),
                Requirement::In("l".into(), vec!["m".into()]),
            ]
        );
        assert_eq!(s.to_string(), "a=b,c in (d,e),!f,g!=h,i!=j,k,l=m");
    }

    #[test]
    fn matching_follows_kubernetes() {
        let node = labels(&[
            ("kubernetes.io/hostname", "w1"),
            ("hw", "gpu"),
            ("zone", "a"),
        ]);
        assert!(sel("").matches(&node));
        assert!(sel("hw=gpu").matches(&node));
        assert!(sel("hw in (gpu,nvme),zone").matches(&node));
        assert!(!sel("hw in (nvme)").matches(&node));
        assert!(sel("!rack").matches(&node));
        assert!(!sel("!hw").matches(&node));
        // != and notin also hold when the label is absent.
        assert!(sel("rack!=r1,rack notin (r2)").matches(&node));
        assert!(!sel("hw!=gpu").matches(&node));
        assert!(!sel("hw notin (gpu)").matches(&node));
        assert!(sel("kubernetes.io/hostname=w1").matches(&node));
        assert!(!sel("hw=gpu,zone=b").matches(&node));
    }

    #[test]
    fn errors_name_the_column() {
        let e = Selector::parse("a=b,c in d").expect_err("no parens");
        assert_eq!(e.column, 10);
        assert!(e.message.contains("expected '('"), "{e}");
        let e = Selector::parse("a=b,,c").expect_err("empty requirement");
        assert_eq!(e.column, 5);
        let e = Selector::parse("hw is gpu").expect_err("unknown operator");
        assert_eq!(e.column, 4);
        assert!(e.message.contains("unknown operator \"is\""), "{e}");
        let e = Selector::parse("c in (d,").expect_err("unterminated");
        assert!(e.message.contains("at the end"), "{e}");
        assert!(Selector::parse("a=b c").is_err());
    }
}
