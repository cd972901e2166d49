//! promtool (Debian's prometheus package) for the metrics tests, and reading values out
//! of a metrics text. Without promtool a test is skipped with a message — except in CI,
//! where scripts/install-deps.sh installs it and its absence is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Run `promtool ARGS` (with `stdin`, if given) in `dir`; `None` when promtool is missing
/// outside CI. Panics with promtool's output when it fails.
pub fn promtool(test: &str, args: &[&str], dir: &Path, stdin: Option<&str>) -> Option<String> {
    let spawned = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("{test}: CI must not skip promtool checks: cannot run promtool: {e}")
        }
        Err(e) => {
            eprintln!("skipping {test}: cannot run promtool ({e}); apt-get install prometheus");
            return None;
        }
    };
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{said}");
    Some(said)
}

/// The value of the sample written exactly as `series` (`name{label="v",...}`).
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}
