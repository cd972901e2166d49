//! Merging fragments in order: tables merge key by key (the later value wins), and the
//! entries of `[[storage_class]]` and `[[disk_group]]` merge by `name`.
//!
//! A drop-in can therefore change one key of one group, e.g. replace `devices` of
//! `[[disk_group]] name = "demo-shared"`, without repeating the rest.

use super::diag::{Diags, Loc};
use super::raw::{Entry, Node, Table, Value};

/// Arrays of tables whose entries are identified by their `name`.
const NAMED_ARRAYS: [&str; 2] = ["storage_class", "disk_group"];

/// Merge the fragments, first to last, into one tree.
pub fn merge_all(fragments: Vec<Table>, diags: &mut Diags) -> Table {
    let mut merged = Table::default();
    for fragment in fragments {
        merge_fragment(&mut merged, fragment, diags);
    }
    merged
}

fn merge_fragment(base: &mut Table, next: Table, diags: &mut Diags) {
    for entry in next.entries {
        let named = NAMED_ARRAYS.contains(&entry.key.as_str());
        match base.get_mut(&entry.key) {
            Some(old) if named => merge_named_entry(old, entry, diags),
            Some(old) => merge_entry(old, entry),
            None if named => {
                let empty = Node {
                    at: entry.node.at,
                    value: Value::Array(Vec::new()),
                };
                let mut fresh = Entry {
                    key: entry.key.clone(),
                    key_at: entry.key_at,
                    node: empty,
                };
                merge_named_entry(&mut fresh, entry, diags);
                base.entries.push(fresh);
            }
            None => base.entries.push(entry),
        }
    }
}

/// Tables merge key by key; anything else is replaced by the later value.
fn merge_entry(old: &mut Entry, new: Entry) {
    match (&mut old.node.value, new.node.value) {
        (Value::Table(old_table), Value::Table(new_table)) => merge_tables(old_table, new_table),
        (_, value) => {
            old.key_at = new.key_at;
            old.node = Node {
                at: new.node.at,
                value,
            };
        }
    }
}

fn merge_tables(base: &mut Table, next: Table) {
    for entry in next.entries {
        match base.get_mut(&entry.key) {
            Some(old) => merge_entry(old, entry),
            None => base.entries.push(entry),
        }
    }
}

/// `[[storage_class]]` / `[[disk_group]]`: entries with a known name merge into it,
/// others are appended. Within one fragment a name may appear only once.
fn merge_named_entry(old: &mut Entry, new: Entry, diags: &mut Diags) {
    let new_items = match (&old.node.value, new.node.value) {
        (Value::Array(_), Value::Array(items)) => items,
        (_, value) => {
            // Not arrays of tables: validation reports the wrong type; the later value wins.
            old.key_at = new.key_at;
            old.node = Node {
                at: new.node.at,
                value,
            };
            return;
        }
    };
    let Value::Array(base_items) = &mut old.node.value else {
        return;
    };
    let mut seen: Vec<(String, Loc)> = Vec::new();
    for item in new_items {
        if let Some((name, at)) = name_of(&item) {
            report_duplicate(&seen, name, at, &new.key, diags);
            seen.push((name.to_string(), at));
        }
        merge_named_item(base_items, item);
    }
}

/// Same name earlier in this very fragment: a duplicate, not an override.
fn report_duplicate(seen: &[(String, Loc)], name: &str, at: Loc, what: &str, diags: &mut Diags) {
    let Some((_, first_at)) = seen.iter().find(|(n, _)| n == name) else {
        return;
    };
    diags.error(
        at,
        format!("duplicate {what} name \"{name}\""),
        format!(
            "\"{name}\" is already defined at {}; give this one another name (a later drop-in file may override an entry by name, the same file may not)",
            diags.sources.describe(*first_at)
        ),
    );
}

fn merge_named_item(items: &mut Vec<Node>, item: Node) {
    let name = name_of(&item).map(|(n, _)| n.to_string());
    let target = name.and_then(|name| {
        items
            .iter_mut()
            .find(|n| name_of(n).is_some_and(|(m, _)| m == name))
    });
    match (target, item) {
        (
            Some(Node {
                value: Value::Table(base),
                ..
            }),
            Node {
                value: Value::Table(next),
                ..
            },
        ) => merge_tables(base, next),
        (_, item) => items.push(item),
    }
}

fn name_of(node: &Node) -> Option<(&str, Loc)> {
    let Value::Table(table) = &node.value else {
        return None;
    };
    let entry = table.get("name")?;
    match &entry.node.value {
        Value::Str(s) => Some((s.as_str(), entry.node.at)),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::policy::raw;
    use std::path::Path;

    fn merged(texts: &[&str]) -> (Diags, Table) {
        let mut diags = Diags::default();
        let mut fragments = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let f = diags.sources.add(Path::new(&format!("{i}.toml")), text);
            fragments.push(raw::parse(f, text, &mut diags).expect("parses"));
        }
        let t = merge_all(fragments, &mut diags);
        (diags, t)
    }

    fn groups(t: &Table) -> Vec<Table> {
        let Some(Entry {
            node:
                Node {
                    value: Value::Array(items),
                    ..
                },
            ..
        }) = t.get("disk_group")
        else {
            panic!("no groups")
        };
        items
            .iter()
            .map(|n| match &n.value {
                Value::Table(t) => t.clone(),
                _ => panic!(),
            })
            .collect()
    }

    #[test]
    fn tables_merge_key_by_key_later_wins() {
        let (_, t) = merged(&[
            "[node]\nname = \"a\"\nstorage_root = \"/x\"\n",
            "[node]\nname = \"b\"\n",
        ]);
        let Value::Table(node) = &t.get("node").expect("node").node.value else {
            panic!()
        };
        assert_eq!(node.str("name"), Some("b"));
        assert_eq!(node.str("storage_root"), Some("/x"));
        // The winning value remembers the file it came from.
        assert_eq!(node.get("name").expect("name").node.at.file, 1);
    }

    #[test]
    fn named_entries_merge_by_name_and_new_names_append() {
        let (diags, t) = merged(&[
            "[[disk_group]]\nname = \"a\"\ndevices = [\"/dev/loop0\"]\nallow_loop = true\n",
            "[[disk_group]]\nname = \"a\"\ndevices = [\"/dev/loop7\"]\n[[disk_group]]\nname = \"b\"\n",
        ]);
        assert!(diags.is_empty());
        let g = groups(&t);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].str("name"), Some("a"));
        assert!(g[0].get("allow_loop").is_some());
        let Value::Array(devices) = &g[0].get("devices").expect("devices").node.value else {
            panic!()
        };
        assert_eq!(devices[0].value, Value::Str("/dev/loop7".into()));
        assert_eq!(g[1].str("name"), Some("b"));
    }

    #[test]
    fn same_name_twice_in_one_file_is_a_duplicate() {
        let (diags, _) = merged(&["[[disk_group]]\nname = \"a\"\n[[disk_group]]\nname = \"a\"\n"]);
        let d = diags.into_diagnostics();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].line, 4);
        assert!(d[0].message.contains("duplicate disk_group name \"a\""));
    }
}
