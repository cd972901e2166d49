//! The command-line interface: arguments, human and JSON output, exit status.

pub mod args;

pub fn main() -> i32 {
    let _cli = <args::Cli as clap::Parser>::parse();
    0
}
