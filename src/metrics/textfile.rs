//! The metrics file for node_exporter's textfile collector. It is replaced atomically (a
//! temp file ending in `.tmp`, which the collector ignores, then a rename), so a scrape
//! never reads half a file.

use crate::state::{self, StateError};
use std::path::Path;

pub fn write(path: &Path, text: &str) -> Result<(), StateError> {
    state::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_file_is_replaced_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("node-exporter/kvstrap.prom");
        super::write(&path, "a 1\n").unwrap_or_else(|e| panic!("{e}"));
        super::write(&path, "a 2\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::read_to_string(&path).unwrap_or_default(), "a 2\n");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("node-exporter"))
            .map(|r| r.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["kvstrap.prom"]);
    }
}
