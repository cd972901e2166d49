//! Active swap areas from /proc/swaps, mapped to device numbers.

use super::InventoryError;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapArea {
    pub path: PathBuf,
    /// `major:minor` of the block device, when the area is a device that could be stat'ed.
    pub devno: Option<String>,
}

impl SwapArea {
    /// True when this area is the device `name` with `devno`.
    pub fn is_device(&self, devno: &str, name: &str) -> bool {
        self.devno.as_deref() == Some(devno) || self.path == Path::new("/dev").join(name)
    }
}

/// Reads `<proc_root>/swaps`; no such file means no swap support, hence no swap.
pub fn read(proc_root: &Path) -> Result<Vec<SwapArea>, InventoryError> {
    let path = proc_root.join("swaps");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(parse(&text)
            .into_iter()
            .map(|(p, is_partition)| resolve(p, is_partition))
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(InventoryError::Read { path, source }),
    }
}

/// (path, is a block device) for each area after the header line.
pub fn parse(text: &str) -> Vec<(PathBuf, bool)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let path = crate::host::mount::unescape(fields.next()?);
            let kind = fields.next()?;
            Some((PathBuf::from(path), kind == "partition"))
        })
        .collect()
}

fn resolve(path: PathBuf, is_partition: bool) -> SwapArea {
    // A swap file lives on a mounted filesystem, which is reported as mounted already.
    let devno = is_partition
        .then(|| std::fs::metadata(&path).ok())
        .flatten()
        .map(|m| super::devno_string(m.rdev()));
    SwapArea { path, devno }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_partitions_and_files() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /dev/sdb2                               partition\t8388604\t\t0\t\t-2\n\
                    /var/swap\\040file                       file\t\t1048572\t\t0\t\t-3\n";
        assert_eq!(
            parse(text),
            vec![
                (PathBuf::from("/dev/sdb2"), true),
                (PathBuf::from("/var/swap file"), false)
            ]
        );
    }

    #[test]
    fn matches_by_path_when_not_stat_able() {
        let area = SwapArea {
            path: "/dev/sdb2".into(),
            devno: None,
        };
        assert!(area.is_device("8:18", "sdb2"));
        assert!(!area.is_device("8:17", "sdb1"));
    }
}
