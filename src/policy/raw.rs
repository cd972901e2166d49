//! Raw policy fragments: the TOML of one file as a tree whose every key and value
//! remembers where it was written, so that merging keeps each value's origin.

use super::diag::{Diags, Loc};
use toml_edit::{ImDocument, Item};

/// A value and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub at: Loc,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    /// `octal` is true when written as `0o750`: file modes may be given that way.
    Int {
        value: i64,
        octal: bool,
    },
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Table),
}

impl Value {
    /// What kind of value this is, for "must be a string, found an integer".
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int { .. } => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Datetime(_) => "a date-time",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        }
    }
}

/// One `key = value` of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_at: Loc,
    pub node: Node,
}

/// A table's entries in the order they were written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub entries: Vec<Entry>,
}

impl Table {
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.key == key)
    }

    /// The string value of `key`, if it is one.
    pub fn str(&self, key: &str) -> Option<&str> {
        match &self.get(key)?.node.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Parse one file into a fragment. A syntax error is reported at its position and
/// yields no fragment: nothing else of that file can be trusted.
pub fn parse(file: usize, text: &str, diags: &mut Diags) -> Option<Table> {
    match ImDocument::parse(text) {
        Ok(doc) => {
            let conv = Converter { file, text };
            Some(conv.table(doc.as_table(), Loc { file, offset: 0 }))
        }
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let message = first_line(e.message());
            diags.error(
                Loc { file, offset },
                format!("TOML syntax error: {message}"),
                "fix the syntax; see https://toml.io for how tables, strings and arrays are written",
            );
            None
        }
    }
}

fn first_line(message: &str) -> String {
    let line = message.trim().lines().next().unwrap_or("invalid TOML");
    line.trim_end_matches('.').to_string()
}

struct Converter<'a> {
    file: usize,
    text: &'a str,
}

impl Converter<'_> {
    fn loc(&self, span: Option<std::ops::Range<usize>>, fallback: Loc) -> Loc {
        span.map_or(fallback, |s| Loc {
            file: self.file,
            offset: s.start,
        })
    }

    fn table(&self, table: &toml_edit::Table, at: Loc) -> Table {
        let mut out = Table::default();
        for (key, item) in table.iter() {
            let key_at = table
                .get_key_value(key)
                .map_or(at, |(k, _)| self.loc(k.span(), at));
            if let Some(node) = self.item(item, key_at) {
                out.entries.push(Entry {
                    key: key.to_string(),
                    key_at,
                    node,
                });
            }
        }
        out
    }

    fn inline_table(&self, table: &toml_edit::InlineTable, at: Loc) -> Table {
        let mut out = Table::default();
        for (key, value) in table.iter() {
            let key_at = table
                .get_key_value(key)
                .map_or(at, |(k, _)| self.loc(k.span(), at));
            let node = self.value(value, key_at);
            out.entries.push(Entry {
                key: key.to_string(),
                key_at,
                node,
            });
        }
        out
    }

    fn item(&self, item: &Item, fallback: Loc) -> Option<Node> {
        match item {
            Item::None => None,
            Item::Value(v) => Some(self.value(v, fallback)),
            Item::Table(t) => {
                let at = self.loc(t.span(), fallback);
                Some(Node {
                    at,
                    value: Value::Table(self.table(t, at)),
                })
            }
            Item::ArrayOfTables(a) => {
                let at = self.loc(a.span(), fallback);
                let tables = a
                    .iter()
                    .map(|t| {
                        let t_at = self.loc(t.span(), at);
                        Node {
                            at: t_at,
                            value: Value::Table(self.table(t, t_at)),
                        }
                    })
                    .collect();
                Some(Node {
                    at,
                    value: Value::Array(tables),
                })
            }
        }
    }

    fn value(&self, value: &toml_edit::Value, fallback: Loc) -> Node {
        use toml_edit::Value as V;
        let span = value.span();
        let at = self.loc(span.clone(), fallback);
        let value = match value {
            V::String(s) => Value::Str(s.value().clone()),
            V::Integer(i) => Value::Int {
                value: *i.value(),
                octal: self.is_octal(span),
            },
            V::Float(f) => Value::Float(*f.value()),
            V::Boolean(b) => Value::Bool(*b.value()),
            V::Datetime(d) => Value::Datetime(d.value().to_string()),
            V::Array(a) => Value::Array(a.iter().map(|v| self.value(v, at)).collect()),
            V::InlineTable(t) => Value::Table(self.inline_table(t, at)),
        };
        Node { at, value }
    }

    fn is_octal(&self, span: Option<std::ops::Range<usize>>) -> bool {
        span.and_then(|s| self.text.get(s))
            .is_some_and(|raw| raw.trim_start_matches('+').starts_with("0o"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> (Diags, Table) {
        let mut diags = Diags::default();
        let f = diags.sources.add(std::path::Path::new("t.toml"), text);
        let t = parse(f, text, &mut diags).expect("parses");
        (diags, t)
    }

    #[test]
    fn keys_and_values_keep_their_positions() {
        let text =
            "[node]\nname = \"a\"\n\n[[disk_group]]\nname = \"g\"\nowner = { mode = 0o750 }\n";
        let (diags, t) = parse_ok(text);
        let node = t.get("node").expect("node");
        let Value::Table(node) = &node.node.value else {
            panic!("table")
        };
        let name = node.get("name").expect("name");
        assert_eq!(diags.sources.line_col(name.key_at), (2, 1));
        assert_eq!(diags.sources.line_col(name.node.at), (2, 8));
        let Value::Array(groups) = &t.get("disk_group").expect("groups").node.value else {
            panic!("array")
        };
        let Value::Table(g) = &groups[0].value else {
            panic!("table")
        };
        let Value::Table(owner) = &g.get("owner").expect("owner").node.value else {
            panic!()
        };
        let mode = &owner.get("mode").expect("mode").node;
        assert_eq!(
            mode.value,
            Value::Int {
                value: 0o750,
                octal: true
            }
        );
        assert_eq!(diags.sources.line_col(mode.at), (6, 18));
    }

    #[test]
    fn syntax_error_has_a_position() {
        let mut diags = Diags::default();
        let text = "[node]\nname = \"unterminated\n";
        let f = diags.sources.add(std::path::Path::new("t.toml"), text);
        assert!(parse(f, text, &mut diags).is_none());
        let d = diags.into_diagnostics();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].line, 2);
        assert!(
            d[0].message.starts_with("TOML syntax error"),
            "{}",
            d[0].message
        );
    }
}
