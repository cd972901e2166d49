//! No input may panic the policy loader. Property tests over arbitrary text, TOML-like
//! text, mutations of the shipped policies, and random mixes of known keys with odd
//! values. Every diagnostic must point inside the file it names.
//!
//! Bounded by PROPTEST_CASES (default 256 per property); CI runs it longer, e.g.
//! `PROPTEST_CASES=4000 cargo test --release --test policy_fuzz`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvstrap::policy::{load_many, load_str, PolicyError, DEMO_POLICY, EXAMPLE_POLICY};
use proptest::prelude::*;
use std::path::PathBuf;

/// Load, render every diagnostic, and check each position lies inside its file.
fn check(text: &str) {
    let file = (PathBuf::from("fuzz.toml"), text.to_string());
    let result = load_str(&file.0, text);
    // Same input, same answer.
    assert_eq!(
        format!("{result:?}"),
        format!("{:?}", load_str(&file.0, text))
    );
    if let Err(e) = result {
        check_positions(&e, &[file]);
    }
}

fn check_positions(e: &PolicyError, files: &[(PathBuf, String)]) {
    assert!(
        !e.diagnostics.is_empty(),
        "an error must carry at least one diagnostic"
    );
    for d in &e.diagnostics {
        let shown = d.to_string();
        assert!(shown.contains(": error: "), "{shown}");
        if d.line == 0 {
            continue;
        }
        let Some((_, text)) = files.iter().find(|(p, _)| *p == d.file) else {
            panic!("diagnostic names a file that was not loaded: {shown}");
        };
        let lines: Vec<&str> = text.split('\n').collect();
        assert!(
            d.line <= lines.len(),
            "line {} outside 1..={}: {shown}",
            d.line,
            lines.len()
        );
        let width = lines[d.line - 1].chars().count() + 1;
        assert!(
            d.column >= 1 && d.column <= width,
            "column {} outside 1..={width}: {shown}",
            d.column
        );
    }
}

/// Text made of the characters TOML policies are made of.
fn tomlish() -> impl Strategy<Value = String> {
    proptest::string::string_regex(
        r#"([\[\]{}=",.\n #%*/_\-0-9a-zA-Z'\\]|name|disk_group|storage_class|match|true|0o7){0,300}"#,
    )
    .expect("regex")
}

const TOKENS: &[&str] = &[
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    "\"",
    "'",
    ",",
    "\n",
    "#",
    "0",
    "-1",
    "0o777",
    "1.5",
    "1e999",
    "\"\"",
    "\"0\"",
    "\"10 parsecs\"",
    "\"500G\"",
    "\"99999999999999999999E\"",
    "\"1.5TiB\"",
    "\"%\"",
    "\"0750\"",
    "true",
    "[[disk_group]]\nname = \"x\"\n",
    "[[storage_class]]\nname = \"x\"\n",
    "\"/dev/loop*\"",
    "\"/dev/[\"",
    "\"None\"",
    "\"Block\"",
    "\"force\"",
    "é",
    "\u{0}",
    "1979-05-27T07:32:00Z",
    "[node]",
    "[kubernetes]",
    "match.serial = \"A\"",
];

#[derive(Debug, Clone)]
enum Mutation {
    Insert(usize, usize),
    Delete(usize, usize),
    DropLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, t)| Mutation::Insert(at, t)),
        (any::<usize>(), 1usize..20).prop_map(|(at, n)| Mutation::Delete(at, n)),
        any::<usize>().prop_map(Mutation::DropLine),
        any::<usize>().prop_map(Mutation::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
    ]
}

fn apply(text: &str, mutation: &Mutation) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let mut lines: Vec<&str> = text.split('\n').collect();
    let n = lines.len().max(1);
    match *mutation {
        Mutation::Insert(at, t) => {
            let at = at % (chars.len() + 1);
            chars.splice(at..at, TOKENS[t].chars());
            chars.into_iter().collect()
        }
        Mutation::Delete(at, len) => {
            let at = at % (chars.len() + 1);
            let end = (at + len).min(chars.len());
            chars.drain(at..end);
            chars.into_iter().collect()
        }
        Mutation::DropLine(i) => {
            lines.remove(i % n);
            lines.join("\n")
        }
        Mutation::DuplicateLine(i) => {
            let line = lines[i % n];
            lines.insert(i % n, line);
            lines.join("\n")
        }
        Mutation::SwapLines(a, b) => {
            lines.swap(a % n, b % n);
            lines.join("\n")
        }
    }
}

/// Random sections of known keys with values of every kind.
fn mixed_policy() -> impl Strategy<Value = String> {
    const HEADERS: &[&str] = &[
        "[node]",
        "[kubernetes]",
        "[[storage_class]]",
        "[[disk_group]]",
        "[match]",
        "",
    ];
    const KEYS: &[&str] = &[
        "name",
        "storage_root",
        "publish",
        "kubeconfig",
        "volume_mode",
        "fs_type",
        "reclaim_policy",
        "access_modes",
        "mount_options",
        "binding_mode",
        "storage_class",
        "layout",
        "devices",
        "match",
        "max_disks",
        "volume_size",
        "volume_count",
        "reserve",
        "owner",
        "wipe",
        "allow_loop",
        "allow_removable",
        "match.min_size",
        "owner.mode",
        "match.transport",
        "match.serial",
        "typo",
    ];
    const VALUES: &[&str] = &[
        "\"a\"",
        "\"c\"",
        "\"g\"",
        "\"\"",
        "\"/x\"",
        "\"x\"",
        "0",
        "-1",
        "4294967295",
        "9223372036854775807",
        "0o7777",
        "0o17777",
        "1.5",
        "true",
        "false",
        "[]",
        "[\"ReadWriteOnce\", \"ReadWriteMany\"]",
        "[\"/dev/sd*\", 1]",
        "{}",
        "{ transport = \"nvme\", min_size = \"2T\", max_size = \"1T\" }",
        "{ uid = -1, mode = 755 }",
        "\"Block\"",
        "\"separate\"",
        "\"shared\"",
        "\"force\"",
        "\"10%\"",
        "\"95%\"",
        "\"1G\"",
        "\"100M\"",
        "\"None\"",
        "\"nfs\"",
        "\"Recycle\"",
        "\"Immediate\"",
        "1979-05-27",
    ];
    let line =
        (0..KEYS.len(), 0..VALUES.len()).prop_map(|(k, v)| format!("{} = {}", KEYS[k], VALUES[v]));
    let section = (0..HEADERS.len(), proptest::collection::vec(line, 0..6))
        .prop_map(|(h, lines)| format!("{}\n{}\n", HEADERS[h], lines.join("\n")));
    proptest::collection::vec(section, 0..8).prop_map(|s| s.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_strings_never_panic(text in any::<String>()) {
        check(&text);
    }

    #[test]
    fn toml_like_text_never_panics(text in tomlish()) {
        check(&text);
    }

    #[test]
    fn mutated_example_never_panics(mutations in proptest::collection::vec(mutation(), 1..6)) {
        let text = mutations.iter().fold(EXAMPLE_POLICY.to_string(), |t, m| apply(&t, m));
        check(&text);
    }

    #[test]
    fn mutated_demo_never_panics(mutations in proptest::collection::vec(mutation(), 1..6)) {
        let text = mutations.iter().fold(DEMO_POLICY.to_string(), |t, m| apply(&t, m));
        check(&text);
    }

    #[test]
    fn mixed_known_keys_never_panic(text in mixed_policy(), dropin in mixed_policy()) {
        check(&text);
        let files = [(PathBuf::from("a.toml"), text), (PathBuf::from("b.toml"), dropin)];
        if let Err(e) = load_many(&files) {
            check_positions(&e, &files);
        }
    }
}

/// Deep nesting must end in a syntax error, not a stack overflow.
#[test]
fn deep_nesting_is_a_syntax_error() {
    let n = 50_000;
    let inputs = [
        format!("{} = 1\n", vec!["a"; n].join(".")),
        format!("[{}]\nx = 1\n", vec!["a"; n].join(".")),
        format!("x = {}{}\n", "[".repeat(n), "]".repeat(n)),
        format!("x = {}{}\n", "{a=".repeat(n), "}".repeat(n)),
    ];
    for text in inputs {
        let e = load_str(&PathBuf::from("deep.toml"), &text).expect_err("too deep");
        assert!(
            e.diagnostics[0].message.starts_with("TOML syntax error"),
            "{}",
            e.report()
        );
    }
}
