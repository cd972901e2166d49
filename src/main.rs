//! The `kvstrap` binary: the only place that knows both the command line and the daemon.

use kvstrap::cli::{self, args::Command};

fn main() {
    no_group_or_world_write();
    let parsed = cli::parse();
    let outcome = match &parsed.command {
        Command::Daemon => kvstrap::daemon::main(&cli::inputs(&parsed.global)),
        command => cli::run(&parsed.global, command),
    };
    std::process::exit(cli::exit_status(outcome));
}

/// Whatever umask the caller had (a root shell with `umask 000`), nothing kvstrap creates
/// without an explicit mode (mount points, link directories) is writable by group or
/// world; a stricter umask stays as it is.
fn no_group_or_world_write() {
    use nix::sys::stat::{umask, Mode};
    let inherited = umask(Mode::S_IWGRP | Mode::S_IWOTH);
    umask(inherited | Mode::S_IWGRP | Mode::S_IWOTH);
}
