//! The code's layout, checked from the sources: the module table in docs/architecture.md
//! matches `src/`, every module opens with a line saying what it is for, nothing below the
//! CLI imports it, and the top-level modules import each other without a cycle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, with its path relative to `src/`.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src(), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(src())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// `apply` for `apply/mod.rs` or `apply/cli.rs`, `state` for `state.rs`; `None` for the
/// crate roots.
fn top_module(rel: &str) -> Option<String> {
    let first = rel.split('/').next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

fn top_modules() -> BTreeSet<String> {
    sources()
        .iter()
        .filter_map(|(rel, _)| top_module(rel))
        .collect()
}

#[test]
fn the_module_table_matches_the_tree() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .unwrap();
    let section = doc.split("## Modules").nth(1).expect("a Modules section");
    let table: BTreeSet<String> = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .filter_map(|cell| cell.trim().strip_prefix('`')?.strip_suffix('`'))
        .map(str::to_string)
        .collect();
    assert_eq!(
        table,
        top_modules(),
        "docs/architecture.md's module table and src/ disagree"
    );
}

#[test]
fn every_module_opens_with_one_line_on_what_it_is_for() {
    let mut missing = Vec::new();
    for (rel, text) in sources() {
        let module_root = !rel.contains('/') || rel.ends_with("/mod.rs");
        if !module_root {
            continue;
        }
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default();
        let second = lines.next().unwrap_or_default();
        // One line that stands alone: more may follow after an empty `//!`.
        let alone = !second.starts_with("//!") || second.trim() == "//!";
        if !first.starts_with("//! ") || !alone {
            missing.push(rel);
        }
    }
    assert!(missing.is_empty(), "no one-line `//!` summary: {missing:?}");
}

#[test]
fn nothing_below_the_cli_imports_it() {
    let offenders: Vec<String> = sources()
        .into_iter()
        .filter(|(rel, _)| !rel.starts_with("cli/") && rel != "main.rs")
        .filter(|(_, text)| text.contains("crate::cli"))
        .map(|(rel, _)| rel)
        .collect();
    assert!(offenders.is_empty(), "import crate::cli: {offenders:?}");
}

/// Top-level module -> the top-level modules its files name as `crate::NAME`.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let modules = top_modules();
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in sources() {
        let Some(from) = top_module(&rel) else {
            continue;
        };
        let entry = deps.entry(from.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if name != from && modules.contains(&name) {
                entry.insert(name);
            }
        }
    }
    deps
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let deps = dependencies();
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for next in deps.get(&m).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        false
    };
    let cycles: Vec<String> = deps
        .iter()
        .flat_map(|(a, bs)| bs.iter().map(move |b| (a, b)))
        .filter(|(a, b)| reaches(b, a))
        .map(|(a, b)| format!("{a} -> {b} -> ... -> {a}"))
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}\n{deps:#?}");
    // Neither caller knows the other: main.rs wires them.
    for (a, b) in [("cli", "daemon"), ("daemon", "cli")] {
        assert!(!deps[a].contains(b), "{a} imports {b}");
    }
}

/// The files of `kube/` -> the sibling files each names as `super::NAME`.
fn kube_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in sources() {
        let Some(name) = rel
            .strip_prefix("kube/")
            .and_then(|f| f.strip_suffix(".rs"))
            .filter(|f| *f != "mod")
        else {
            continue;
        };
        let entry = deps.entry(name.to_string()).or_default();
        for (i, _) in text.match_indices("super::") {
            let other: String = text[i + "super::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if other != name
                && !other.is_empty()
                && other.chars().all(|c| c.is_lowercase() || c == '_')
            {
                entry.insert(other);
            }
        }
    }
    deps
}

#[test]
fn the_files_of_kube_import_each_other_without_a_cycle() {
    let deps = kube_dependencies();
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for next in deps.get(&m).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        false
    };
    let cycles: Vec<String> = deps
        .iter()
        .flat_map(|(a, bs)| bs.iter().map(move |b| (a, b)))
        .filter(|(a, b)| reaches(b, a))
        .map(|(a, b)| format!("kube::{a} -> kube::{b} -> ... -> kube::{a}"))
        .collect();
    assert!(
        cycles.is_empty(),
        "import cycles in kube/: {cycles:#?}\n{deps:#?}"
    );
    // The connection is at the bottom.
    assert!(
        deps["client"].is_empty(),
        "kube::client imports {:?}",
        deps["client"]
    );
}

/// A thread that cannot be started must never panic the daemon: outside tests, threads
/// start through `std::thread::Builder` (whose error is handled), never `thread::spawn`,
/// a scope's `spawn` or tokio's `spawn_blocking`, which panic then.
#[test]
fn no_thread_is_started_in_a_way_that_panics() {
    let panicking = [
        "thread::spawn(",
        "scope.spawn(",
        "s.spawn(",
        "spawn_blocking(",
    ];
    let mut found = Vec::new();
    for (rel, text) in sources() {
        // The code before the file's test module (tests may panic as they like).
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in code.lines().enumerate() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            if let Some(p) = panicking.iter().find(|p| line.contains(*p)) {
                found.push(format!("src/{rel}:{}: {p}", n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "use std::thread::Builder and handle its error:\n{}",
        found.join("\n")
    );
}
