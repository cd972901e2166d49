//! Read-only observation of the machine (sysfs, libblkid, mountinfo, swaps); it writes nothing.
//!
//! Read-only observation of the machine: sysfs, libblkid, mountinfo, /proc/swaps.
//! `scan` never fails because of one device: what cannot be read about a disk is
//! reported on that disk (`InUse::Unreadable`), and the scan goes on.

pub mod byid;
pub mod crypt;
pub mod eligibility;
pub mod mountinfo;
pub mod multipath;
pub mod paths;
pub mod probe;
pub mod swaps;
pub mod sysfs;

use crate::model::{Disk, Inventory, Partition, Signature};
use eligibility::Observed;
use mountinfo::Mount;
use probe::{DiskContents, TableEntry};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use swaps::SwapArea;
use sysfs::{SysDisk, SysPartition};

/// Where to look; tests point these at fixture trees.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    pub sys_root: PathBuf,
    pub dev_root: PathBuf,
    pub proc_root: PathBuf,
    /// Directories whose contents (mount points, volume dirs, symlinks) are observed
    /// into `Inventory::paths`: storage_root and the state directory's block links.
    pub managed_roots: Vec<PathBuf>,
    /// Filesystems whose project-quota support the planner needs to know.
    pub quota_filesystems: Vec<crate::model::FsType>,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            sys_root: "/sys".into(),
            dev_root: "/dev".into(),
            proc_root: "/proc".into(),
            managed_roots: Vec::new(),
            quota_filesystems: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read {path}: {source} (is {path} mounted and readable? kvstrap needs sysfs and procfs)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Observes every disk and the managed paths. Fails only when the machine-wide sources
/// (/sys/block, mountinfo, /proc/swaps) cannot be read: without them no disk can be
/// judged safe.
/// Which of these filesystems' project quotas the kernel cannot enforce, and why.
/// Finding out for ext4 reads /proc/kallsyms (~200 ms), so the answer is remembered in
/// /run/kvstrap for the rest of this boot: a kernel's configuration cannot change
/// while it runs.
fn quota_unsupported(
    filesystems: &[crate::model::FsType],
) -> std::collections::BTreeMap<String, String> {
    filesystems
        .iter()
        .filter_map(|fs| quota_verdict(*fs).map(|why| (fs.as_str().to_string(), why)))
        .collect()
}

const QUOTA_CACHE_DIR: &str = "/run/kvstrap";

fn quota_verdict(fs: crate::model::FsType) -> Option<String> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = Path::new(QUOTA_CACHE_DIR).join(format!("quota-support-{}", fs.as_str()));
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Some((id, verdict)) = text.split_once('\n') {
            if !boot_id.is_empty() && id == boot_id.trim() {
                return (!verdict.is_empty()).then(|| verdict.to_string());
            }
        }
    }
    let verdict = match crate::host::quota::kernel_support(fs) {
        crate::host::quota::QuotaSupport::Unsupported(why) => Some(why),
        _ => None,
    };
    // Best effort: without the cache the next scan just asks the kernel again.
    let _ = std::fs::create_dir_all(QUOTA_CACHE_DIR).and_then(|()| {
        std::fs::write(
            &cache,
            format!("{}\n{}", boot_id.trim(), verdict.as_deref().unwrap_or("")),
        )
    });
    verdict
}

/// A TPM 2.0 behind the kernel's resource manager (`/dev/tpmrm0`), which
/// systemd-cryptenroll and the unlock at boot use.
fn tpm2_present(sys_root: &Path, dev_root: &Path) -> bool {
    let version = sysfs::attr(&sys_root.join("class/tpm/tpm0"), "tpm_version_major");
    version.as_deref() == Some("2") && dev_root.join("tpmrm0").exists()
}

pub fn scan(opts: &ScanOptions) -> Result<Inventory, InventoryError> {
    // Nothing here waits for anything else: the machine-wide facts and the managed paths
    // are read on a thread of their own while the disks are read and probed, each disk
    // by one of a few workers (sysfs, then libblkid).
    let (machine, observed, paths) = std::thread::scope(|scope| {
        let read_machine = || {
            let machine = Machine::read(opts)?;
            let paths = paths::observe(&opts.managed_roots, &machine.mounts);
            Ok::<_, InventoryError>((machine, paths))
        };
        // No thread to spare (the process is out of them): read it here, after the disks.
        let machine = std::thread::Builder::new()
            .name("inventory".into())
            .spawn_scoped(scope, read_machine)
            .ok();
        let observed = sysfs::disk_names(&opts.sys_root)
            .map(|names| observe_all(&names, &opts.sys_root, &opts.dev_root));
        let joined = match machine {
            Some(thread) => thread.join().unwrap_or_else(|_| {
                Err(InventoryError::Read {
                    path: opts.proc_root.clone(),
                    source: std::io::Error::other("reading the mounts failed unexpectedly"),
                })
            }),
            None => read_machine(),
        };
        joined.and_then(|(machine, paths)| Ok((machine, observed?, paths)))
    })?;
    let mut disks: Vec<Disk> = observed
        .into_iter()
        .map(|(sys, probed)| assemble(sys, probed, &machine, opts))
        .collect();
    disks.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    link_loop_devices(&mut disks, &machine);
    Ok(Inventory {
        disks,
        paths,
        quota_unsupported: quota_unsupported(&opts.quota_filesystems),
        tpm2: tpm2_present(&opts.sys_root, &opts.dev_root),
    })
}

/// What uses one partition now, read afresh and without opening any device: mounts of it
/// in every mount namespace, bind mounts of its node, loop devices over it, holders. The
/// reclaim path asks this right before a scrub (`plan::usage::volume_uses` judges it).
pub fn partition_users_now(device: &Path) -> Result<Partition, InventoryError> {
    let opts = ScanOptions::default();
    let machine = Machine::read(&opts)?;
    let name = kernel_name_of(device);
    let class = opts.sys_root.join("class/block").join(&name);
    let devno = sysfs::attr(&class, "dev").unwrap_or_default();
    let loop_devices = loops_over(&machine, &opts, &name);
    let holders = sysfs::list_names(&class.join("holders"));
    let mut crypt = crypt::mapping(&machine, &holders);
    if let Some(c) = crypt.as_mut() {
        c.loop_devices = loops_over(&machine, &opts, &c.kernel_name);
    }
    Ok(Partition {
        path: device.to_path_buf(),
        crypt,
        holders,
        mountpoints: machine.mountpoints(&devno, &name),
        mounts: machine.mount_facts(&devno, &name),
        node_binds: machine.node_binds(&name),
        loop_devices,
        in_kernel: !devno.is_empty(),
        ..Partition::default()
    })
}

/// Loop devices whose backing file is the block device `name` (or a bind mount of it).
fn loops_over(machine: &Machine, opts: &ScanOptions, name: &str) -> Vec<crate::model::LoopOver> {
    sysfs::list_names(&opts.sys_root.join("block"))
        .into_iter()
        .filter_map(|d| {
            let dir = opts.sys_root.join("block").join(&d).join("loop");
            let backing = PathBuf::from(sysfs::attr(&dir, "backing_file")?);
            (machine.block_device_behind(&backing)? == name).then(|| crate::model::LoopOver {
                device: Path::new("/dev").join(d),
                backing_file: backing,
            })
        })
        .collect()
}

/// The kernel name of a device node: its own file name, or for a `/dev/mapper` link (a
/// multipath map's partition mapping, `mpatha-part1`) the `dm-N` it points at, which is
/// the name sysfs, mountinfo and device-node bind mounts know it by.
fn kernel_name_of(device: &Path) -> String {
    let resolved = if device.starts_with(multipath::MAPPER_DIR) {
        std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf())
    } else {
        device.to_path_buf()
    };
    resolved
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Machine-wide facts read once per scan.
struct Machine {
    mounts: Vec<Mount>,
    /// Block-device and /dev mounts of the other mount namespaces.
    other_mounts: Vec<Mount>,
    /// `major:minor` of the filesystem mounted at /dev.
    dev_devno: Option<String>,
    swaps: Vec<SwapArea>,
    by_id_links: Option<BTreeMap<String, Vec<String>>>,
    root_spec: Option<String>,
    dev_root: PathBuf,
    sys_root: PathBuf,
}

impl Machine {
    fn read(opts: &ScanOptions) -> Result<Machine, InventoryError> {
        let cmdline = std::fs::read_to_string(opts.proc_root.join("cmdline")).unwrap_or_default();
        let mounts = mountinfo::read(&opts.proc_root)?;
        let dev_devno = mounts
            .iter()
            .rev()
            .find(|m| m.mountpoint == Path::new("/dev"))
            .map(|m| m.devno.clone());
        Ok(Machine {
            other_mounts: mountinfo::read_other_namespaces(&opts.proc_root),
            dev_devno,
            mounts,
            swaps: swaps::read(&opts.proc_root)?,
            by_id_links: byid::read_links(&opts.dev_root.join("disk/by-id")),
            root_spec: eligibility::root_spec(&cmdline),
            dev_root: opts.dev_root.clone(),
            sys_root: opts.sys_root.clone(),
        })
    }

    fn mountpoints(&self, devno: &str, name: &str) -> Vec<PathBuf> {
        mountinfo::mountpoints_of(&self.mounts, devno, name)
            .into_iter()
            .map(|m| m.mountpoint.clone())
            .collect()
    }

    /// Every mount of a device's filesystem, in every mount namespace.
    fn mount_facts(&self, devno: &str, name: &str) -> Vec<crate::model::MountFact> {
        let dev_path = format!("/dev/{name}");
        self.all_mounts()
            .filter(|m| m.devno == devno || m.source == dev_path)
            .map(Mount::fact)
            .collect()
    }

    /// Bind mounts of the device node `/dev/<name>` itself, in every mount namespace.
    fn node_binds(&self, name: &str) -> Vec<crate::model::MountFact> {
        self.node_binds_at(&Path::new("/").join(name))
    }

    /// Bind mounts of the node at `node` in /dev (`/dm-3`, `/mapper/kvs-...`).
    fn node_binds_at(&self, node: &Path) -> Vec<crate::model::MountFact> {
        self.all_mounts()
            .filter(|m| m.root == node && self.is_dev_filesystem(m))
            .map(Mount::fact)
            .collect()
    }

    fn all_mounts(&self) -> impl Iterator<Item = &Mount> {
        self.mounts.iter().chain(&self.other_mounts)
    }

    fn is_dev_filesystem(&self, m: &Mount) -> bool {
        m.fstype == "devtmpfs" || self.dev_devno.as_deref() == Some(m.devno.as_str())
    }

    /// The block device a loop device's backing file is, by kernel name: `/dev/<name>`
    /// itself, or a bind mount of that node (kubelet's Block volume mapping). Decided
    /// from mountinfo alone, so a backing file on a hung network filesystem is never
    /// touched.
    fn block_device_behind(&self, backing: &Path) -> Option<String> {
        let text = backing.to_string_lossy();
        let path = Path::new(text.trim_end_matches(" (deleted)"));
        if let Ok(name) = path.strip_prefix("/dev") {
            return Some(self.kernel_name_of(name));
        }
        self.mounts
            .iter()
            .rev()
            .find(|m| m.mountpoint == path)
            .filter(|m| self.is_dev_filesystem(m))
            .and_then(|m| m.root.strip_prefix("/").ok())
            .map(|n| self.kernel_name_of(n))
    }

    /// The kernel name of a node below /dev: `sdb1`, or `dm-3` for `mapper/kvs-...` or
    /// `mapper/mpatha-part1` (a symlink to it with udev, a node of its own without).
    fn kernel_name_of(&self, below_dev: &Path) -> String {
        let text = below_dev.to_string_lossy().into_owned();
        if let Some(name) = text.strip_prefix("mapper/") {
            let dm = sysfs::list_names(&self.sys_root.join("block"))
                .into_iter()
                .find(|d| {
                    d.starts_with("dm-")
                        && sysfs::attr(&self.sys_root.join("block").join(d).join("dm"), "name")
                            .as_deref()
                            == Some(name)
                });
            return dm.unwrap_or_else(|| kernel_name_of(&Path::new("/dev").join(below_dev)));
        }
        text
    }

    fn is_swap(&self, devno: &str, name: &str) -> bool {
        self.swaps.iter().any(|s| s.is_device(devno, name))
    }
}

/// What probing one disk's device nodes gave.
#[derive(Debug, Default)]
struct Probed {
    contents: DiskContents,
    /// Signatures per partition number.
    partition_signatures: BTreeMap<u32, Vec<Signature>>,
    busy: Option<String>,
    unreadable: Option<String>,
}

/// At most this many disks are read at once.
const MAX_PROBE_THREADS: usize = 16;

/// Reads and probes the disks in parallel: a probe mostly waits for its own device (a
/// cold read of each region libblkid looks at, some tens of them per disk, ms each on a
/// disk that seeks), and sysfs answers from the kernel's memory. More threads than that
/// only compete for the CPUs (loop devices).
fn observe_all(names: &[String], sys_root: &Path, dev_root: &Path) -> Vec<(SysDisk, Probed)> {
    let read = in_workers(names, |name| sysfs::read_disk(sys_root, name));
    let sys_disks: Vec<SysDisk> = read
        .into_iter()
        .zip(names)
        .map(|(sys, name)| {
            sys.unwrap_or_else(|| SysDisk {
                name: name.clone(),
                ..SysDisk::default()
            })
        })
        .collect();
    // The maps are found among all the disks at once (a map names its paths), before
    // anything is opened: a path is never probed.
    let sys_disks = multipath::fold(sys_root, sys_disks);
    let probes = in_workers(&sys_disks, |disk| probe_one(disk, dev_root));
    // A missing result must not read as "probed, nothing found".
    let unfinished = || Probed {
        unreadable: Some("reading the disk did not finish".into()),
        ..Default::default()
    };
    sys_disks
        .into_iter()
        .zip(probes)
        .map(|(sys, probed)| (sys, probed.unwrap_or_else(unfinished)))
        .collect()
}

/// `f` of every item, on a few workers; `None` where a result went missing.
fn in_workers<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<Option<R>> {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let workers = (cores * 4)
        .clamp(4, MAX_PROBE_THREADS)
        .min(items.len())
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    crate::host::threads::run_workers(workers, "probe", || loop {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(item) = items.get(i) else { break };
        let r = f(item);
        if let Ok(mut slot) = results[i].lock() {
            *slot = Some(r);
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().ok().flatten())
        .collect()
}

fn probe_one(disk: &SysDisk, dev_root: &Path) -> Probed {
    // A multipath path is never a candidate, and reading it directly (or a map with no
    // working path, whose IO may queue forever) could block the whole scan.
    if !multipath::may_probe(&disk.multipath) {
        return Probed::default();
    }
    let node = dev_root.join(&disk.name);
    let opened = probe::open(&node);
    let mut probed = Probed {
        busy: opened.busy.clone(),
        unreadable: opened.error.clone(),
        ..Default::default()
    };
    let Some(file) = opened.file else {
        return probed;
    };
    let exclusive = opened.busy.is_none();
    // Only writes through a partition node can leave the whole disk's cache stale.
    if exclusive && !disk.partitions.is_empty() {
        drop_cached_pages(&file);
    }
    match probe::probe_disk(&file, &node.display().to_string()) {
        Ok(contents) => probed.contents = contents,
        Err(e) => probed.unreadable = Some(e.to_string()),
    }
    let numbers = partition_numbers(&disk.partitions, &probed.contents.entries);
    for number in numbers {
        let sys = disk.partitions.iter().find(|p| p.number == number);
        let entry = probed.contents.entries.iter().find(|e| e.number == number);
        match probe_partition(&file, dev_root, sys, entry, exclusive) {
            Ok(signatures) => {
                probed.partition_signatures.insert(number, signatures);
            }
            // An unprobed partition could hold anything: the whole disk is unreadable.
            Err(e) => probed.unreadable = Some(e.to_string()),
        }
    }
    probed
}

/// Probes a partition through its own node when the kernel has one (the page cache of
/// the whole disk can hold stale blocks after writes through the partition), else
/// through the whole disk at the entry's offset.
fn probe_partition(
    disk: &File,
    dev_root: &Path,
    sys: Option<&SysPartition>,
    entry: Option<&TableEntry>,
    exclusive: bool,
) -> Result<Vec<Signature>, probe::ProbeError> {
    if let Some(p) = sys {
        let node = dev_root.join(&p.name);
        if let Ok(file) = File::open(&node) {
            if exclusive {
                drop_cached_pages(&file);
            }
            return probe::signatures_at(&file, 0, 0, &node.display().to_string());
        }
    }
    let (number, start, size) = match (entry, sys) {
        (Some(e), _) => (e.number, e.start_bytes, e.size_bytes),
        (None, Some(p)) => (p.number, p.start_bytes, p.size_bytes),
        (None, None) => return Ok(Vec::new()),
    };
    probe::signatures_at(
        disk,
        start,
        size,
        &format!("partition {number} at byte {start}"),
    )
}

/// Forgets clean cached blocks so that libblkid reads what is on the device now, not
/// what an earlier reader saw before another node of the same disk was written.
fn drop_cached_pages(file: &File) {
    // SAFETY: plain advisory call on an open fd; failure only means a stale cache.
    unsafe {
        libc::posix_fadvise(
            std::os::unix::io::AsRawFd::as_raw_fd(file),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

fn partition_numbers(sys: &[SysPartition], entries: &[TableEntry]) -> Vec<u32> {
    let mut numbers: Vec<u32> = sys
        .iter()
        .map(|p| p.number)
        .chain(entries.iter().map(|e| e.number))
        .collect();
    numbers.sort_unstable();
    numbers.dedup();
    numbers
}

fn assemble(sys: SysDisk, mut probed: Probed, machine: &Machine, opts: &ScanOptions) -> Disk {
    let by_id = disk_by_id(&sys, machine);
    let partitions = partitions(&sys, &mut probed, machine, &by_id);
    let (path, name) = match &sys.multipath {
        multipath::Role::Map { name, .. } => {
            (Path::new(multipath::MAPPER_DIR).join(name), name.clone())
        }
        _ => (PathBuf::from("/dev").join(&sys.name), sys.name.clone()),
    };
    let mut disk = Disk {
        path,
        mountpoints: machine.mountpoints(&sys.devno, &sys.name),
        swap: machine.is_swap(&sys.devno, &sys.name),
        name,
        devno: sys.devno.clone(),
        size_bytes: sys.size_bytes,
        logical_sector_size: sys.logical_sector_size,
        physical_sector_size: sys.physical_sector_size,
        rotational: sys.rotational,
        removable: sys.removable,
        read_only: sys.read_only,
        model: sys.model.clone(),
        vendor: sys.vendor.clone(),
        serial: sys.serial.clone(),
        wwn: sys.wwn.clone(),
        transport: sys.transport.clone(),
        by_id,
        backing_file: sys.backing_file.clone(),
        partition_table: probed.contents.table.take(),
        partitions,
        signatures: std::mem::take(&mut probed.contents.signatures),
        holders: sys.holders.clone(),
        in_use: Vec::new(),
        io: None,
        multipath: match &sys.multipath {
            multipath::Role::Map { multipath, .. } => Some(multipath.clone()),
            _ => None,
        },
    };
    let observed = observe_stack(&disk, &sys, &probed, machine, opts);
    disk.in_use = eligibility::in_use(&disk, &observed, &opts.managed_roots);
    multipath::judge(&sys.multipath, &mut disk.in_use);
    disk
}

fn observe_stack(
    disk: &Disk,
    sys: &SysDisk,
    probed: &Probed,
    machine: &Machine,
    opts: &ScanOptions,
) -> Observed {
    let holders = disk
        .holders
        .iter()
        .chain(disk.partitions.iter().flat_map(|p| p.holders.iter()));
    let stacked = stacked_devices(&opts.sys_root, holders.cloned().collect());
    let boot_device = machine
        .root_spec
        .clone()
        .filter(|spec| eligibility::boots_from(disk, spec));
    Observed {
        stacked_mounts: stacked
            .iter()
            .flat_map(|(n, d)| {
                machine
                    .mountpoints(d, n)
                    .into_iter()
                    .map(move |m| (n.clone(), m))
            })
            .collect(),
        stacked_swaps: stacked
            .iter()
            .filter(|(n, d)| machine.is_swap(d, n))
            .map(|(n, _)| PathBuf::from("/dev").join(n))
            .collect(),
        scsi_type: sys.scsi_type,
        boot_device,
        busy: probed.busy.clone(),
        unreadable: probed.unreadable.clone(),
    }
}

/// (name, devno) of every device stacked on the given holders, transitively.
fn stacked_devices(sys_root: &Path, mut pending: Vec<String>) -> Vec<(String, String)> {
    let mut seen: Vec<(String, String)> = Vec::new();
    while let Some(name) = pending.pop() {
        // dm and md devices are whole disks, so their holders are under /sys/block.
        if seen.iter().any(|(n, _)| *n == name) || seen.len() > 64 {
            continue;
        }
        let dir = sys_root.join("block").join(&name);
        pending.extend(sysfs::list_names(&dir.join("holders")));
        seen.push((name, sysfs::attr(&dir, "dev").unwrap_or_default()));
    }
    seen
}

fn disk_by_id(sys: &SysDisk, machine: &Machine) -> Vec<String> {
    // udev's links when it made them; computed ones for a disk it has not got to yet (a
    // hot-plugged disk is judged on its kernel uevent, before udev's links exist, and
    // udev making them raises no uevent that would trigger another run).
    let names = match machine.by_id_links.as_ref().and_then(|l| l.get(&sys.name)) {
        Some(linked) if !linked.is_empty() => linked.clone(),
        _ => match &sys.multipath {
            multipath::Role::Map { name, multipath } => {
                multipath::by_id_names(name, &multipath.wwid)
            }
            _ => byid::compute(&sys.ids),
        },
    };
    names
        .into_iter()
        .map(|n| format!("/dev/disk/by-id/{n}"))
        .collect()
}

fn partitions(
    sys: &SysDisk,
    probed: &mut Probed,
    machine: &Machine,
    disk_ids: &[String],
) -> Vec<Partition> {
    let numbers = partition_numbers(&sys.partitions, &probed.contents.entries);
    numbers
        .into_iter()
        .map(|number| {
            let kernel = sys.partitions.iter().find(|p| p.number == number);
            let entry = probed.contents.entries.iter().find(|e| e.number == number);
            let signatures = probed
                .partition_signatures
                .remove(&number)
                .unwrap_or_default();
            partition(sys, number, kernel, entry, signatures, machine, disk_ids)
        })
        .collect()
}

fn partition(
    disk: &SysDisk,
    number: u32,
    kernel: Option<&SysPartition>,
    entry: Option<&TableEntry>,
    signatures: Vec<Signature>,
    machine: &Machine,
    disk_ids: &[String],
) -> Partition {
    let name = kernel.map_or_else(|| partition_name(&disk.name, number), |k| k.name.clone());
    let map = match &disk.multipath {
        multipath::Role::Map { name, multipath } => Some((name, &multipath.wwid)),
        _ => None,
    };
    let (mountpoints, swap, mounts, node_binds) = match kernel {
        Some(k) => (
            machine.mountpoints(&k.devno, &k.name),
            machine.is_swap(&k.devno, &k.name),
            machine.mount_facts(&k.devno, &k.name),
            machine.node_binds(&k.name),
        ),
        None => (Vec::new(), false, Vec::new(), Vec::new()),
    };
    // As for disks: udev's links, or computed ones while udev has not made them.
    let by_id = match machine.by_id_links.as_ref().and_then(|l| l.get(&name)) {
        Some(linked) if !linked.is_empty() => linked
            .iter()
            .map(|n| format!("/dev/disk/by-id/{n}"))
            .collect(),
        _ => match map {
            Some((map, wwid)) => multipath::partition_by_id_names(map, wwid, number)
                .into_iter()
                .map(|n| format!("/dev/disk/by-id/{n}"))
                .collect(),
            None => byid::partition_names(disk_ids, number),
        },
    };
    // The on-disk table is what the planner compares its layout with; the kernel's
    // view only fills in when the table could not be read.
    let (start_bytes, size_bytes) = match (entry, kernel) {
        (Some(e), _) => (e.start_bytes, e.size_bytes),
        (None, Some(k)) => (k.start_bytes, k.size_bytes),
        (None, None) => (0, 0),
    };
    let part_uuid = entry.and_then(|e| e.part_uuid.clone());
    // A map's partition mapping has a stable name of its own (`/dev/mapper/mpatha-part1`).
    let by_partuuid = kernel.is_some()
        && map.is_none()
        && part_uuid
            .as_deref()
            .is_some_and(|u| udev_names_partition(&machine.dev_root, u, &name));
    Partition {
        path: match map {
            Some((map, _)) => multipath::partition_path(map, number),
            None => PathBuf::from("/dev").join(&name),
        },
        number,
        start_bytes,
        size_bytes,
        type_id: entry.and_then(|e| e.type_id.clone()),
        part_uuid,
        name: entry.and_then(|e| e.name.clone()),
        signatures,
        holders: kernel.map(|k| k.holders.clone()).unwrap_or_default(),
        mountpoints,
        swap,
        by_id,
        in_kernel: kernel.is_some(),
        by_partuuid,
        role: entry
            .filter(|e| is_kvstrap_type(e.type_id.as_deref()))
            .map_or_else(Default::default, |e| {
                crate::model::PartitionRole::from_attributes(e.attributes)
            }),
        encrypted: entry.is_some_and(|e| {
            is_kvstrap_type(e.type_id.as_deref())
                && e.attributes & crate::model::ENCRYPTED_ATTRIBUTE != 0
        }),
        crypt: kernel.and_then(|k| crypt::mapping(machine, &k.holders)),
        mounts,
        node_binds,
        loop_devices: Vec::new(),
    }
}

fn is_kvstrap_type(type_id: Option<&str>) -> bool {
    type_id.and_then(|t| uuid::Uuid::parse_str(t).ok()) == Some(crate::model::KVSTRAP_PART_TYPE)
}

/// A loop device over a block device (kubelet attaches one to each Block volume it maps)
/// is recorded on the partition it holds, and is itself never a disk to provision: what
/// it shows is that partition's data.
fn link_loop_devices(disks: &mut [Disk], machine: &Machine) {
    let over: Vec<(usize, String, PathBuf)> = disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let backing = d.backing_file.clone()?;
            Some((i, machine.block_device_behind(&backing)?, backing))
        })
        .collect();
    // A map's partitions are `/dev/mapper` links to the `dm-N` a loop's backing names.
    let is_node = |path: &Path, name: &str| {
        path == Path::new("/dev").join(name) || kernel_name_of(path) == name
    };
    let known = |name: &str| {
        disks.iter().any(|d| {
            d.name == name
                || d.multipath.as_ref().is_some_and(|m| m.kernel_name == name)
                || d.partitions.iter().any(|p| {
                    is_node(&p.path, name)
                        || p.crypt.as_ref().is_some_and(|c| c.kernel_name == name)
                })
        })
    };
    // Only block devices of this scan: a loop over a file that lives in /dev/shm is a disk.
    let over: Vec<_> = over.into_iter().filter(|(_, n, _)| known(n)).collect();
    for (i, name, backing_file) in over {
        let loop_over = crate::model::LoopOver {
            device: disks[i].path.clone(),
            backing_file,
        };
        disks[i].in_use.push(crate::model::InUse::Virtual {
            detail: format!("a loop device over the block device /dev/{name}"),
        });
        for p in disks.iter_mut().flat_map(|d| d.partitions.iter_mut()) {
            if is_node(&p.path, &name) {
                p.loop_devices.push(loop_over.clone());
            } else if let Some(c) = p.crypt.as_mut().filter(|c| c.kernel_name == name) {
                c.loop_devices.push(loop_over.clone());
            }
        }
    }
}

/// Whether udev's `disk/by-partuuid/<part_uuid>` below `dev_root` exists and resolves to
/// the same node as the kernel name `name` (a stale or cloned partition UUID may name
/// another one). The same test `host::dirs::block_link_target` makes before linking.
fn udev_names_partition(dev_root: &Path, part_uuid: &str, name: &str) -> bool {
    let by_uuid = dev_root.join("disk/by-partuuid").join(part_uuid);
    match (
        std::fs::canonicalize(by_uuid),
        std::fs::canonicalize(dev_root.join(name)),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The kernel's partition naming: `sda1`, but `nvme0n1p1` and `loop3p1` after a digit.
pub fn partition_name(disk: &str, number: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{number}")
    } else {
        format!("{disk}{number}")
    }
}

/// `major:minor` of a `dev_t`.
pub fn devno_string(dev: u64) -> String {
    format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    )
}

/// Orders names with their digit runs compared as numbers: loop2 before loop10.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    natural_key(a).cmp(&natural_key(b))
}

fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut key = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let text_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (text, tail) = rest.split_at(text_len);
        let digits_len = tail
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (digits, tail) = tail.split_at(digits_len);
        key.push((text.to_string(), digits.parse().unwrap_or(u64::MAX)));
        rest = tail;
    }
    key
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut names = vec![
            "loop10", "loop2", "nvme0n1", "loop1", "sda", "nvme10n1", "nvme2n1",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            vec!["loop1", "loop2", "loop10", "nvme0n1", "nvme2n1", "nvme10n1", "sda"]
        );
    }

    #[test]
    fn by_partuuid_counts_only_when_udev_names_that_very_partition() {
        let dev = tempfile::tempdir().unwrap();
        let by_uuid = dev.path().join("disk/by-partuuid");
        std::fs::create_dir_all(&by_uuid).unwrap();
        for node in ["vdb1", "vdc1"] {
            std::fs::write(dev.path().join(node), b"").unwrap();
        }
        let (ours, stale) = (
            "5a0c7d2e-3b8f-4b61-8f0d-000000000001",
            "5a0c7d2e-3b8f-4b61-8f0d-000000000002",
        );
        std::os::unix::fs::symlink("../../vdb1", by_uuid.join(ours)).unwrap();
        std::os::unix::fs::symlink("../../vdc1", by_uuid.join(stale)).unwrap();
        assert!(udev_names_partition(dev.path(), ours, "vdb1"));
        // Another node under that UUID, or no link at all (no udev).
        assert!(!udev_names_partition(dev.path(), stale, "vdb1"));
        assert!(!udev_names_partition(
            dev.path(),
            "5a0c7d2e-3b8f-4b61-8f0d-000000000003",
            "vdb1"
        ));
        // No node for the kernel name.
        assert!(!udev_names_partition(dev.path(), ours, "vdd1"));
    }

    #[test]
    fn partition_names_follow_the_kernel() {
        assert_eq!(partition_name("sda", 1), "sda1");
        assert_eq!(partition_name("nvme0n1", 2), "nvme0n1p2");
        assert_eq!(partition_name("loop3", 1), "loop3p1");
    }
}
