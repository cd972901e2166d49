//! Running external programs (mkfs.xfs, mkfs.ext4, xfs_db, e2label, cryptsetup,
//! systemd-cryptenroll, kpartx; smartctl beside the runs): absolute paths resolved once at
//! start-up, failures that carry argv, exit status and stderr; a secret reaches a program
//! on a file descriptor, never in its arguments or environment.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

/// Directories searched for programs, in order. PATH is deliberately not used: a daemon
/// that formats disks must not run whatever `mkfs.xfs` comes first in someone's PATH.
pub const SEARCH_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The programs kvstrap runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Program {
    MkfsXfs,
    MkfsExt4,
    /// Writes the planned label once mkfs.xfs has finished, for a superblock
    /// `host::xfs_label` does not know (what `xfs_admin -L` runs, without the shell
    /// script around it, which looks xfs_db up in PATH).
    XfsDb,
    /// Writes the planned label once mkfs.ext4 has finished.
    E2label,
    /// LUKS2: format, label, open, close, erase.
    Cryptsetup,
    /// Seals a LUKS2 volume's key to the TPM2.
    SystemdCryptenroll,
    /// Makes the partition mappings of a dm-multipath map (multipath-tools' own way).
    Kpartx,
}

impl Program {
    pub const ALL: [Program; 7] = [
        Program::MkfsXfs,
        Program::MkfsExt4,
        Program::XfsDb,
        Program::E2label,
        Program::Cryptsetup,
        Program::SystemdCryptenroll,
        Program::Kpartx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Program::MkfsXfs => "mkfs.xfs",
            Program::MkfsExt4 => "mkfs.ext4",
            Program::XfsDb => "xfs_db",
            Program::E2label => "e2label",
            Program::Cryptsetup => "cryptsetup",
            Program::SystemdCryptenroll => "systemd-cryptenroll",
            Program::Kpartx => "kpartx",
        }
    }

    /// The distribution package that ships the program, for error messages.
    pub fn package(self) -> &'static str {
        match self {
            Program::MkfsXfs | Program::XfsDb => "xfsprogs",
            Program::MkfsExt4 | Program::E2label => "e2fsprogs",
            Program::Cryptsetup => "cryptsetup-bin (Debian) or cryptsetup",
            Program::SystemdCryptenroll => "systemd (252 or later)",
            Program::Kpartx => "kpartx",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("{program} not found in {searched}: install the {package} package")]
    NotFound {
        program: &'static str,
        package: &'static str,
        searched: String,
    },
    #[error("could not start `{argv}`: {source}")]
    Spawn {
        argv: String,
        source: std::io::Error,
    },
    #[error("`{argv}` did not finish within {limit:?} and was killed: the device may be failing; check `dmesg`")]
    TimedOut { argv: String, limit: Duration },
    #[error("`{argv}` failed ({status}): {stderr}")]
    Failed {
        argv: String,
        status: String,
        stderr: String,
    },
}

/// Absolute paths of the programs found on this machine.
#[derive(Debug, Clone, Default)]
pub struct Programs {
    found: Vec<(Program, PathBuf)>,
}

impl Programs {
    /// Look every program up once, in [`SEARCH_DIRS`]. Missing programs are not an error
    /// here: only the steps that need them fail (see [`Programs::require`]).
    pub fn discover() -> Programs {
        Programs::discover_in(SEARCH_DIRS.iter().map(Path::new))
    }

    pub fn discover_in<'a>(dirs: impl Iterator<Item = &'a Path> + Clone) -> Programs {
        let found = Program::ALL
            .iter()
            .filter_map(|&p| find_executable(dirs.clone(), p.name()).map(|path| (p, path)))
            .collect();
        Programs { found }
    }

    /// The absolute path of `program`, or an error naming the package to install.
    pub fn require(&self, program: Program) -> Result<&Path, CmdError> {
        self.found
            .iter()
            .find(|(p, _)| *p == program)
            .map(|(_, path)| path.as_path())
            .ok_or(CmdError::NotFound {
                program: program.name(),
                package: program.package(),
                searched: SEARCH_DIRS.join(", "),
            })
    }

    /// Check at start-up that every program a plan needs is there.
    pub fn check(&self, needed: &[Program]) -> Result<(), CmdError> {
        needed.iter().try_for_each(|&p| self.require(p).map(|_| ()))
    }

    /// Run `program` with `args`; Ok(stdout) when it exits 0.
    pub fn run(&self, program: Program, args: &[OsString]) -> Result<String, CmdError> {
        let path = self.require(program)?;
        run_path(path, args)
    }

    /// Run `program` with `secret` readable on its file descriptor 3 ([`SECRET_PATH`] in
    /// `args`): a memory file, never on disk, in argv or in the environment, wiped when
    /// the program has ended.
    pub fn run_with_secret(
        &self,
        program: Program,
        args: &[OsString],
        secret: &[u8],
    ) -> Result<String, CmdError> {
        let path = self.require(program)?;
        let argv = || render_argv(path, args);
        let fd = secret_file(secret).map_err(|source| CmdError::Spawn {
            argv: argv(),
            source,
        })?;
        let out = {
            let _running = RunningGuard::new(COMMAND_TIMEOUT);
            run_output(path, args, COMMAND_TIMEOUT, Some(&fd))
        };
        wipe_secret_file(&fd, secret.len());
        let out = out?;
        if !out.status.success() {
            return Err(CmdError::Failed {
                argv: argv(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Where a program run by [`Programs::run_with_secret`] reads the secret.
pub const SECRET_PATH: &str = "/dev/fd/3";
const SECRET_FD: i32 = 3;

/// A memory file (close-on-exec) holding `secret`, read from its start.
fn secret_file(secret: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::io::{Seek, Write};
    let fd = nix::sys::memfd::memfd_create(
        c"kvstrap-secret",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(secret)?;
    // A program that reads the descriptor itself (not a fresh open of /dev/fd/3) starts
    // at the beginning too.
    file.rewind()?;
    Ok(std::os::fd::OwnedFd::from(file))
}

/// Overwrite the memory file before it is closed: its pages go back to the kernel zeroed.
fn wipe_secret_file(fd: &std::os::fd::OwnedFd, len: usize) {
    use std::os::unix::fs::FileExt;
    if let Ok(file) = fd.try_clone().map(std::fs::File::from) {
        let _ = file.write_all_at(&vec![0u8; len], 0);
        let _ = file.set_len(0);
    }
}

/// No program kvstrap runs should take longer (mkfs of a large disk without discard
/// takes seconds); one that hangs on a dying disk is killed so the run can go on.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Run an absolute path with arguments; stdin is closed so a program never waits for a
/// confirmation that no one will type. Killed after [`COMMAND_TIMEOUT`].
pub fn run_path(path: &Path, args: &[OsString]) -> Result<String, CmdError> {
    run_path_within(path, args, COMMAND_TIMEOUT)
}

/// Deadlines of the programs running now, by a number of their own. A program inside its
/// time limit is bounded work, not a hang: mkfs.xfs discarding a large SSD may take minutes
/// without a step finishing, and the daemon's watchdog must not restart it for that.
/// Programs start under a shared hold of this gate, and [`without_spawns`] holds it alone.
/// A child gets a copy of every descriptor kvstrap has open when it forks and keeps it
/// until its exec: a device opened `O_EXCL` by another thread and closed in that window
/// stays claimed by the child, and the mount or mkfs that follows fails with EBUSY (seen
/// on a 60-disk apply, where mkfs runs start while labels are written).
static SPAWN_GATE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Run `f` while no program is being started: what it opens and closes is never
/// inherited by a child. `f` must not start a program itself.
pub fn without_spawns<T>(f: impl FnOnce() -> T) -> T {
    let _alone = SPAWN_GATE
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f()
}

static RUNNING: Mutex<Vec<(u64, Instant)>> = Mutex::new(Vec::new());
static NEXT_RUN_ID: AtomicU64 = AtomicU64::new(0);

/// Whether a program is running inside its time limit right now. Past the limit the
/// program is killed; one that does not die (a process stuck in the kernel) stops
/// counting, so a watchdog fed by this still fires.
pub fn program_running_within_limit() -> bool {
    let now = Instant::now();
    RUNNING
        .lock()
        .map(|running| running.iter().any(|(_, deadline)| *deadline > now))
        .unwrap_or(false)
}

/// Registers one running program for [`program_running_within_limit`] while it lives.
struct RunningGuard(u64);

impl RunningGuard {
    fn new(timeout: Duration) -> RunningGuard {
        let id = NEXT_RUN_ID.fetch_add(1, Ordering::Relaxed);
        // A grace beyond the limit covers the kill and the reaping.
        let deadline = Instant::now()
            .checked_add(timeout.saturating_add(Duration::from_secs(5)))
            .unwrap_or_else(Instant::now);
        if let Ok(mut running) = RUNNING.lock() {
            running.push((id, deadline));
        }
        RunningGuard(id)
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if let Ok(mut running) = RUNNING.lock() {
            running.retain(|(id, _)| *id != self.0);
        }
    }
}

/// [`run_path`] with another time limit.
pub fn run_path_within(
    path: &Path,
    args: &[OsString],
    timeout: Duration,
) -> Result<String, CmdError> {
    let out = run_path_output_within(path, args, timeout)?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            argv: render_argv(path, args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a program to the end (or the time limit) and hand back its exit status and output
/// whatever the status: some programs (smartctl) report what they found in the status bits.
pub fn run_path_output_within(
    path: &Path,
    args: &[OsString],
    timeout: Duration,
) -> Result<std::process::Output, CmdError> {
    let _running = RunningGuard::new(timeout);
    run_output(path, args, timeout, None)
}

/// [`run_path_output_within`] for a reader beside the runs (smartctl on the health
/// thread): it does not count as a run's program making progress, so it never feeds the
/// watchdog of a run that is stuck.
pub fn run_beside_within(
    path: &Path,
    args: &[OsString],
    timeout: Duration,
) -> Result<std::process::Output, CmdError> {
    run_output(path, args, timeout, None)
}

fn run_output(
    path: &Path,
    args: &[OsString],
    timeout: Duration,
    secret: Option<&std::os::fd::OwnedFd>,
) -> Result<std::process::Output, CmdError> {
    let argv = render_argv(path, args);
    tracing::debug!(%argv, "running");
    let mut command = Command::new(path);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C")
        // Its own process group, so a kill reaches what it started too (and their
        // hold on the output pipes).
        .process_group(0);
    if let Some(fd) = secret {
        let raw = std::os::fd::AsRawFd::as_raw_fd(fd);
        // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl) run,
        // on descriptors this process owns; the memory file is close-on-exec everywhere
        // else, so no other program started meanwhile by another thread inherits it.
        unsafe {
            command.pre_exec(move || {
                let rc = if raw == SECRET_FD {
                    libc::fcntl(SECRET_FD, libc::F_SETFD, 0)
                } else {
                    libc::dup2(raw, SECRET_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    // spawn() returns once the child has exec'd: it then holds only what it inherited
    // on purpose.
    let spawned = {
        let _shared = SPAWN_GATE
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        command.spawn()
    };
    let child = spawned.map_err(|source| CmdError::Spawn {
        argv: argv.clone(),
        source,
    })?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // A thread collects the output and the exit status; this one keeps the clock.
    let (done, finished) = mpsc::channel();
    let waiter = std::thread::Builder::new()
        .name("program-wait".into())
        .spawn(move || {
            let out = child.wait_with_output();
            let _ = done.send(());
            out
        });
    let waiter = match waiter {
        Ok(w) => w,
        Err(source) => {
            // The child went with the closure that never ran: end it here, and reap it
            // if it is gone already (no waiting on a program stuck in the kernel).
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            return Err(CmdError::Spawn { argv, source });
        }
    };
    let timed_out = match finished.recv_timeout(timeout) {
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // Not reaped yet (the waiter reaps, then signals), so the group is still ours.
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            true
        }
        _ => false,
    };
    let out = waiter
        .join()
        .map_err(|_| CmdError::Spawn {
            argv: argv.clone(),
            source: std::io::Error::other("the thread waiting for the program panicked"),
        })?
        .map_err(|source| CmdError::Spawn {
            argv: argv.clone(),
            source,
        })?;
    if timed_out {
        return Err(CmdError::TimedOut {
            argv,
            limit: timeout,
        });
    }
    Ok(out)
}

/// The first executable called `name` in `$PATH`, then in [`SEARCH_DIRS`]. Only for
/// programs that merely read (smartctl): those that write to disks are looked up in
/// [`SEARCH_DIRS`] alone.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .filter(|d| d.is_absolute())
        .chain(SEARCH_DIRS.iter().map(PathBuf::from))
        .collect();
    find_executable(dirs.iter().map(PathBuf::as_path), name)
}

fn find_executable<'a>(mut dirs: impl Iterator<Item = &'a Path>, name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dirs.find_map(|d| {
        let candidate = d.join(name);
        let meta = std::fs::metadata(&candidate).ok()?;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

fn render_argv(path: &Path, args: &[OsString]) -> String {
    std::iter::once(path.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_program(dir: &Path, name: &str, script: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn a_program_counts_as_running_while_it_runs_and_not_after() {
        let sleeper = std::thread::spawn(|| {
            run_path_within(
                Path::new("/bin/sleep"),
                &["0.5".into()],
                Duration::from_secs(10),
            )
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(program_running_within_limit());
        assert!(sleeper.join().is_ok_and(|r| r.is_ok()));
        // Other tests may run programs at the same time: check this registration only.
        let guard = RunningGuard::new(Duration::from_secs(10));
        let id = guard.0;
        let registered = |id| {
            RUNNING
                .lock()
                .is_ok_and(|r| r.iter().any(|(i, _)| *i == id))
        };
        assert!(registered(id));
        drop(guard);
        assert!(!registered(id));
    }

    #[test]
    fn discovers_only_executables_in_the_given_dirs() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        fake_program(b.path(), "mkfs.xfs", "exit 0");
        std::fs::write(a.path().join("mkfs.ext4"), "not executable").unwrap();
        let progs = Programs::discover_in([a.path(), b.path()].into_iter());
        assert_eq!(
            progs.require(Program::MkfsXfs).unwrap(),
            b.path().join("mkfs.xfs")
        );
        let err = progs.require(Program::MkfsExt4).unwrap_err().to_string();
        assert!(
            err.contains("mkfs.ext4 not found") && err.contains("e2fsprogs"),
            "{err}"
        );
        assert!(progs.check(&[Program::MkfsXfs]).is_ok());
        assert!(progs.check(&[Program::MkfsXfs, Program::E2label]).is_err());
    }

    #[test]
    fn failure_carries_argv_status_and_stderr() {
        let d = tempfile::tempdir().unwrap();
        fake_program(d.path(), "mkfs.xfs", "echo 'no such device' >&2; exit 3");
        let progs = Programs::discover_in([d.path()].into_iter());
        let err = progs
            .run(Program::MkfsXfs, &["-f".into(), "/dev/x".into()])
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("mkfs.xfs -f /dev/x"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("no such device"), "{msg}");
    }

    #[test]
    fn a_reader_beside_the_runs_does_not_count_as_a_run_making_progress() {
        let d = tempfile::tempdir().unwrap();
        fake_program(d.path(), "smartctl", "sleep 1; echo '{}'; exit 8");
        let path = d.path().join("smartctl");
        let reader = std::thread::spawn(move || {
            run_beside_within(&path, &["-a".into()], Duration::from_secs(10))
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!program_running_within_limit());
        let out = reader.join().unwrap().unwrap();
        assert_eq!((out.status.code(), out.stdout), (Some(8), b"{}\n".to_vec()));
    }

    #[test]
    fn a_program_that_hangs_is_killed_at_the_time_limit() {
        let d = tempfile::tempdir().unwrap();
        fake_program(d.path(), "mkfs.xfs", "sleep 30");
        let started = std::time::Instant::now();
        let err = run_path_within(
            &d.path().join("mkfs.xfs"),
            &["/dev/x".into()],
            Duration::from_millis(300),
        )
        .unwrap_err()
        .to_string();
        assert!(started.elapsed() < Duration::from_secs(10), "{err}");
        assert!(
            err.contains("did not finish within 300ms and was killed"),
            "{err}"
        );
    }

    #[test]
    fn a_secret_reaches_the_program_on_fd_3_only() {
        let d = tempfile::tempdir().unwrap();
        // Prints the secret, its argv and environment, and whether fd 3 is a memory file.
        fake_program(
            d.path(),
            "cryptsetup",
            "cat /dev/fd/3; echo; echo \"args: $*\"; env; readlink /proc/self/fd/3",
        );
        let progs = Programs::discover_in([d.path()].into_iter());
        let secret = b"0123456789abcdef-not-in-argv";
        let out = progs
            .run_with_secret(
                Program::Cryptsetup,
                &["--key-file".into(), SECRET_PATH.into()],
                secret,
            )
            .unwrap();
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("0123456789abcdef-not-in-argv"));
        assert_eq!(lines.next(), Some("args: --key-file /dev/fd/3"));
        assert_eq!(out.matches("not-in-argv").count(), 1, "{out}");
        assert!(out.contains("/memfd:kvstrap-secret"), "{out}");
        // A program started meanwhile without the secret does not inherit it.
        fake_program(
            d.path(),
            "mkfs.xfs",
            "test -e /dev/fd/3 && echo leaked || echo none",
        );
        let progs = Programs::discover_in([d.path()].into_iter());
        assert_eq!(progs.run(Program::MkfsXfs, &[]).unwrap(), "none\n");
        // A failure says what ran, not what it read.
        fake_program(
            d.path(),
            "cryptsetup",
            "cat /dev/fd/3 >/dev/null; echo 'No key available' >&2; exit 2",
        );
        let progs = Programs::discover_in([d.path()].into_iter());
        let err = progs
            .run_with_secret(Program::Cryptsetup, &["open".into()], secret)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("No key available") && !err.contains("not-in-argv"),
            "{err}"
        );
    }

    #[test]
    fn success_returns_stdout() {
        let d = tempfile::tempdir().unwrap();
        fake_program(d.path(), "xfs_db", "echo \"$@\"");
        let progs = Programs::discover_in([d.path()].into_iter());
        assert_eq!(progs.run(Program::XfsDb, &["-x".into()]).unwrap(), "-x\n");
    }

    /// What a descriptor closed inside `without_spawns` leaves is never held by a child
    /// started meanwhile: the read end of a pipe sees EOF at once. Without the gate, one
    /// of these iterations sees the write end still open in a child that has forked but
    /// not yet exec'd (EAGAIN instead of EOF).
    #[test]
    fn nothing_closed_without_spawns_lives_on_in_a_child() {
        use std::io::Read;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spawner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = run_output(Path::new("/bin/true"), &[], Duration::from_secs(10), None);
                }
            })
        };
        let started = Instant::now();
        let mut rounds = 0;
        while started.elapsed() < Duration::from_secs(2) {
            // Opened and closed inside, as the label writer and `prove_unheld` do.
            let mut reader = without_spawns(|| {
                let (reader, writer) = std::io::pipe().unwrap();
                drop(writer);
                reader
            });
            // Non-blocking: EOF now, or EAGAIN while a child still holds the write end.
            // SAFETY: fcntl on a descriptor this test owns.
            unsafe {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&reader);
                libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
            }
            let mut byte = [0u8; 1];
            match reader.read(&mut byte) {
                Ok(0) => {}
                other => panic!("round {rounds}: the closed write end lives on: {other:?}"),
            }
            rounds += 1;
        }
        stop.store(true, Ordering::Relaxed);
        spawner.join().unwrap();
        assert!(rounds > 100, "only {rounds} rounds");
    }
}
