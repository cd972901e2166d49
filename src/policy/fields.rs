//! Typed access to the keys of one table, reporting unknown keys and wrong types.
//! Every accessor reports its problem and returns None, so validation goes on.

use super::diag::{Diags, Loc};
use super::names;
use super::raw::{Entry, Table, Value};

/// A value and where it was written.
pub type Located<T> = (T, Loc);

/// One table of the policy, named for messages (`[node]`, `disk_group "nvme"`).
pub struct Section<'t> {
    pub table: &'t Table,
    /// The table header, or the key that holds an inline table.
    pub at: Loc,
    pub name: String,
}

impl<'t> Section<'t> {
    pub fn new(table: &'t Table, at: Loc, name: impl Into<String>) -> Self {
        Section {
            table,
            at,
            name: name.into(),
        }
    }

    pub fn entry(&self, key: &str) -> Option<&'t Entry> {
        self.table.get(key)
    }

    /// Reports every key that is not in `known`, with the closest known key.
    pub fn check_keys(&self, known: &[&str], diags: &mut Diags) {
        for entry in &self.table.entries {
            if known.contains(&entry.key.as_str()) {
                continue;
            }
            let hint = match names::closest(&entry.key, known) {
                Some(k) => format!(
                    "did you mean \"{k}\"? known keys here: {}",
                    known.join(", ")
                ),
                None => format!("known keys here: {}", known.join(", ")),
            };
            diags.error(
                entry.key_at,
                format!("unknown key \"{}\" in {}", entry.key, self.name),
                hint,
            );
        }
    }

    /// A key that must be present; reports it missing at the table header.
    pub fn required(&self, key: &str, example: &str, diags: &mut Diags) -> Option<&'t Entry> {
        let entry = self.entry(key);
        if entry.is_none() {
            diags.error(
                self.at,
                format!("{} has no \"{key}\"", self.name),
                format!("add {key} = {example}"),
            );
        }
        entry
    }

    pub fn string(&self, key: &str, example: &str, diags: &mut Diags) -> Option<Located<&'t str>> {
        self.entry(key).and_then(|e| string(e, example, diags))
    }

    pub fn boolean(&self, key: &str, diags: &mut Diags) -> Option<Located<bool>> {
        let entry = self.entry(key)?;
        match entry.node.value {
            Value::Bool(b) => Some((b, entry.node.at)),
            _ => wrong_type(entry, "a boolean (true or false)", "true", diags),
        }
    }

    pub fn integer(&self, key: &str, example: &str, diags: &mut Diags) -> Option<Located<i64>> {
        let entry = self.entry(key)?;
        match entry.node.value {
            Value::Int { value, .. } => Some((value, entry.node.at)),
            _ => wrong_type(entry, "an integer", example, diags),
        }
    }

    /// An array of strings; every element that is not a string is reported.
    pub fn strings(
        &self,
        key: &str,
        example: &str,
        diags: &mut Diags,
    ) -> Option<Located<Vec<Located<&'t str>>>> {
        let entry = self.entry(key)?;
        let Value::Array(items) = &entry.node.value else {
            return wrong_type(entry, "an array of strings", example, diags);
        };
        let mut out = Vec::new();
        let mut ok = true;
        for item in items {
            match &item.value {
                Value::Str(s) => out.push((s.as_str(), item.at)),
                other => {
                    ok = false;
                    diags.error(
                        item.at,
                        format!(
                            "\"{}\" must hold only strings, found {}",
                            entry.key,
                            other.kind()
                        ),
                        format!("write {} = {example}", entry.key),
                    );
                }
            }
        }
        ok.then_some((out, entry.node.at))
    }

    /// An inline or standard sub-table.
    pub fn table(&self, key: &str, example: &str, diags: &mut Diags) -> Option<Section<'t>> {
        let entry = self.entry(key)?;
        match &entry.node.value {
            Value::Table(t) => Some(Section::new(
                t,
                entry.key_at,
                format!("{} of {}", entry.key, self.name),
            )),
            _ => wrong_type(entry, "a table", example, diags),
        }
    }
}

pub fn string<'t>(entry: &'t Entry, example: &str, diags: &mut Diags) -> Option<Located<&'t str>> {
    match &entry.node.value {
        Value::Str(s) => Some((s.as_str(), entry.node.at)),
        _ => wrong_type(entry, "a string", example, diags),
    }
}

pub fn wrong_type<T>(entry: &Entry, expected: &str, example: &str, diags: &mut Diags) -> Option<T> {
    diags.error(
        entry.node.at,
        format!(
            "\"{}\" must be {expected}, found {}",
            entry.key,
            entry.node.value.kind()
        ),
        format!("write {} = {example}", entry.key),
    );
    None
}

/// A value from a fixed set of words; `refused` lists words people write that are
/// wrong, each with the reason and what to write instead.
pub struct Choice<'a, T> {
    pub key: &'a str,
    pub allowed: &'a [(&'a str, T)],
    pub refused: &'a [(&'a str, &'a str, &'a str)],
}

impl<T: Copy> Choice<'_, T> {
    pub fn pick(&self, (word, at): Located<&str>, diags: &mut Diags) -> Option<T> {
        if let Some((_, value)) = self.allowed.iter().find(|(w, _)| *w == word) {
            return Some(*value);
        }
        let words: Vec<String> = self
            .allowed
            .iter()
            .map(|(w, _)| format!("\"{w}\""))
            .collect();
        let words = words.join(" or ");
        if let Some((_, why, instead)) = self
            .refused
            .iter()
            .find(|(w, _, _)| w.eq_ignore_ascii_case(word))
        {
            diags.error(
                at,
                format!("{} = \"{word}\" is not allowed: {why}", self.key),
                (*instead).to_string(),
            );
        } else if let Some((w, _)) = self
            .allowed
            .iter()
            .find(|(w, _)| w.eq_ignore_ascii_case(word))
        {
            diags.error(
                at,
                format!("{} = \"{word}\" is not spelled right", self.key),
                format!("write {} = \"{w}\" (values are case-sensitive)", self.key),
            );
        } else {
            diags.error(
                at,
                format!("unknown {} \"{word}\"", self.key),
                format!("write {} = {words}", self.key),
            );
        }
        None
    }
}
