//! The TOML policy: raw fragments, drop-in merge, validation with file:line:col.
//! (Owned by the policy work; `types` is the validated result the planner consumes.)

pub mod types;
pub use types::*;

use std::path::Path;

/// Every problem found in a policy, each with its location. Displayed one per line as
/// `FILE:LINE:COL: error: what\n  hint: what to write instead`.
#[derive(Debug, thiserror::Error)]
#[error("invalid policy")]
pub struct PolicyError {
    pub diagnostics: Vec<Diagnostic>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: std::path::PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

/// Load the policy from a file or a drop-in directory, or (None) from the system
/// locations merged with systemd's rules.
pub fn load(_source: Option<&Path>) -> Result<Policy, PolicyError> {
    todo!("policy::load")
}

/// Parse and validate one policy text; `file` is used in diagnostics.
pub fn load_str(_file: &Path, _text: &str) -> Result<Policy, PolicyError> {
    todo!("policy::load_str")
}

/// Placeholder until the policy branch lands.
pub const DEMO_POLICY: &str = "";

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: error: {}", self.file.display(), self.line, self.column, self.message)
    }
}
