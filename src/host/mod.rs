//! host: placeholder until the host branch lands.
pub mod cmd {
    use std::ffi::OsString;
    use std::path::Path;
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub struct CmdError(String);
    pub fn run_path(path: &Path, args: &[OsString]) -> Result<String, CmdError> {
        let out = std::process::Command::new(path).args(args).output().map_err(|e| CmdError(e.to_string()))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome { Unchanged, Changed(String) }
#[derive(Debug, thiserror::Error)]
#[error("host error")]
pub struct Error;
