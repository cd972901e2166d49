//! The `kvstrap` binary: the only place that knows both the command line and the daemon.

use kvstrap::cli::{self, args::Command};

fn main() {
    let parsed = cli::parse();
    let outcome = match &parsed.command {
        Command::Daemon => kvstrap::daemon::main(&cli::inputs(&parsed.global)),
        command => cli::run(&parsed.global, command),
    };
    std::process::exit(cli::exit_status(outcome));
}
