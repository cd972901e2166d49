//! Build-time assets generated from the CLI definition: gzipped man pages and shell
//! completions, written by the hidden `kvstrap generate-assets DIR` for the packages.
//!
//! Layout of `DIR` (what packaging/build-packages and Cargo.toml's package metadata expect):
//! `man/kvstrap.1.gz`, `man/kvstrap-<subcommand>.1.gz`, `completions/kvstrap.bash`,
//! `completions/_kvstrap` (zsh), `completions/kvstrap.fish`.

use flate2::{write::GzEncoder, Compression, GzBuilder};
use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// The binary name the man pages and completions speak about.
const BIN: &str = "kvstrap";

/// Sections appended to kvstrap(1): where things live, so an operator reading the page on a
/// node can find the policy, the state and the units without the README.
const EXTRA_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/kvstrap/policy.toml\fR, \fI/etc/kvstrap/policy.d/*.toml\fR
The node's policy and its drop-ins.
.TP
\fI/usr/lib/kvstrap/policy.d/*.toml\fR
Vendor defaults; a file of the same name in /etc/kvstrap/policy.d masks one here.
.TP
\fI/var/lib/kvstrap/\fR
State file, rendered PersistentVolume and StorageClass manifests, mount points.
.TP
\fI/run/kvstrap/lock\fR
Held by whoever applies (the daemon or the CLI): one applier at a time.
.TP
\fI/usr/share/doc/kvstrap/example-policy.toml\fR
A commented example policy.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBbusctl\fR(1), \fBmkfs.xfs\fR(8), \fBmkfs.ext4\fR(8),
the units \fIkvstrap.service\fR and \fIkubelet.service.d/10-kvstrap.conf\fR.
"#;

/// Writes the man pages and the bash, zsh and fish completions below `out_dir`.
pub fn generate(out_dir: &Path) -> io::Result<()> {
    let mut cmd = super::args::command();
    // Subcommand paths ("kvstrap apply") and global arguments are filled in by build().
    cmd.build();
    generate_man_pages(&cmd, &out_dir.join("man"))?;
    generate_completions(
        &mut without_hidden(super::args::command()),
        &out_dir.join("completions"),
    )
}

/// The command without hidden subcommands: clap_complete would offer them otherwise.
fn without_hidden(cmd: clap::Command) -> clap::Command {
    let visible: Vec<clap::Command> = visible_subcommands(&cmd).cloned().collect();
    let args: Vec<clap::Arg> = cmd.get_arguments().cloned().collect();
    clap::Command::new(BIN)
        .version(env!("CARGO_PKG_VERSION"))
        .args(args)
        .subcommands(visible)
}

/// Entry point of the hidden `generate-assets` subcommand: exit status 0 or 1.
pub fn run_generate_assets(out_dir: &Path) -> i32 {
    match generate(out_dir) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!(
                "kvstrap: cannot write assets to {}: {err}\n  \
                 check that the directory is writable and the disk is not full",
                out_dir.display()
            );
            1
        }
    }
}

fn generate_man_pages(cmd: &clap::Command, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    write_gzipped(&dir.join(format!("{BIN}.1.gz")), &render_main_page(cmd)?)?;
    for sub in visible_subcommands(cmd) {
        let name = format!("{BIN}-{}", sub.get_name());
        // After build() the title is "kvstrap-apply" and the synopsis "kvstrap apply".
        let page = clap_mangen::Man::new(sub.clone());
        let mut buf = Vec::new();
        page.render(&mut buf)?;
        write_gzipped(&dir.join(format!("{name}.1.gz")), &buf)?;
    }
    Ok(())
}

/// kvstrap(1): clap_mangen's sections, with FILES and SEE ALSO before VERSION.
fn render_main_page(cmd: &clap::Command) -> io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut buf = Vec::new();
    man.render_title(&mut buf)?;
    man.render_name_section(&mut buf)?;
    man.render_synopsis_section(&mut buf)?;
    man.render_description_section(&mut buf)?;
    man.render_options_section(&mut buf)?;
    man.render_subcommands_section(&mut buf)?;
    buf.extend_from_slice(EXTRA_SECTIONS.as_bytes());
    man.render_version_section(&mut buf)?;
    Ok(buf)
}

/// Subcommands an operator can see: not hidden ones (generate-assets), not clap's `help`.
fn visible_subcommands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands()
        .filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
}

/// gzip with maximum compression and no name or timestamp, so builds are reproducible.
fn write_gzipped(path: &Path, data: &[u8]) -> io::Result<()> {
    let file = fs::File::create(path)?;
    let mut gz: GzEncoder<fs::File> = GzBuilder::new().mtime(0).write(file, Compression::best());
    gz.write_all(data)?;
    gz.finish()?.sync_all()
}

fn generate_completions(cmd: &mut clap::Command, dir: &Path) -> io::Result<()> {
    use clap_complete::Shell;
    fs::create_dir_all(dir)?;
    for (shell, file) in [
        (Shell::Bash, format!("{BIN}.bash")),
        (Shell::Zsh, format!("_{BIN}")),
        (Shell::Fish, format!("{BIN}.fish")),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, cmd, BIN, &mut buf);
        fs::write(dir.join(file), buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::io::Read;

    fn gunzip(path: &Path) -> String {
        let mut text = String::new();
        GzDecoder::new(fs::File::open(path).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        text
    }

    #[test]
    fn writes_man_pages_and_completions() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();

        let main = gunzip(&dir.path().join("man/kvstrap.1.gz"));
        assert!(
            main.starts_with(".ie \\n(.g .ds Aq"),
            "roff prologue: {main:.80}"
        );
        assert!(main.contains(".TH kvstrap 1"), "{main}");
        assert!(main.contains(".SH FILES"));
        assert!(main.contains("\\-\\-policy"), "global flags documented");
        for sub in [
            "validate", "disks", "plan", "apply", "status", "volumes", "daemon",
        ] {
            assert!(main.contains(sub), "subcommand {sub} listed");
            let page = gunzip(&dir.path().join(format!("man/kvstrap-{sub}.1.gz")));
            assert!(page.contains(&format!("kvstrap {sub}")), "{page}");
        }
        assert!(gunzip(&dir.path().join("man/kvstrap-apply.1.gz")).contains("lock\\-timeout"));

        let bash = fs::read_to_string(dir.path().join("completions/kvstrap.bash")).unwrap();
        assert!(bash.contains("complete -F _kvstrap"), "{bash:.200}");
        let zsh = fs::read_to_string(dir.path().join("completions/_kvstrap")).unwrap();
        assert!(zsh.starts_with("#compdef kvstrap"));
        let fish = fs::read_to_string(dir.path().join("completions/kvstrap.fish")).unwrap();
        assert!(fish.contains("complete -c kvstrap"));
    }

    #[test]
    fn hidden_generate_assets_is_neither_documented_nor_completed() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        assert!(!dir.path().join("man/kvstrap-generate-assets.1.gz").exists());
        assert!(!dir.path().join("man/kvstrap-help.1.gz").exists());
        assert!(!gunzip(&dir.path().join("man/kvstrap.1.gz")).contains("generate\\-assets"));
        let bash = fs::read_to_string(dir.path().join("completions/kvstrap.bash")).unwrap();
        assert!(
            !bash.contains("generate-assets"),
            "hidden command must not complete"
        );
    }

    #[test]
    fn output_is_reproducible() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        generate(a.path()).unwrap();
        generate(b.path()).unwrap();
        let read = |d: &Path| fs::read(d.join("man/kvstrap.1.gz")).unwrap();
        assert_eq!(read(a.path()), read(b.path()));
    }

    #[test]
    fn unwritable_directory_is_an_error() {
        let file = tempfile::NamedTempFile::new().unwrap();
        // A regular file where the directory should be: create_dir_all must fail.
        assert!(generate(&file.path().join("sub")).is_err());
        assert_eq!(run_generate_assets(&file.path().join("sub")), 1);
    }
}
