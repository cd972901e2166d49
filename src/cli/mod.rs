//! The command-line interface: arguments, human and JSON output, exit status.

pub mod args;
pub mod assets;

pub fn main() -> i32 {
    let cli = <args::Cli as clap::Parser>::parse();
    match cli.command {
        args::Command::GenerateAssets { out_dir } => assets::run_generate_assets(&out_dir),
        _ => 0,
    }
}
