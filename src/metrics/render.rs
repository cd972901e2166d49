//! The Prometheus text exposition format (version 0.0.4) of a [`Snapshot`]. Names follow
//! Prometheus conventions: `kvstrap_` prefix, base units (bytes, seconds, ratios),
//! `_total` on counters only; every family has HELP and TYPE.

use super::stats::STEP_BUCKETS_SECONDS;
use super::{Snapshot, DISK_STATES};
use crate::health::{Assessment, Health};
use std::collections::BTreeMap;
use std::fmt::Write;

/// The text for `snapshot`. The same snapshot always gives the same bytes.
pub fn render(s: &Snapshot) -> String {
    let mut out = Out::default();
    disks(&mut out, s);
    multipath(&mut out, s);
    health_figures(&mut out, s);
    io_figures(&mut out, s);
    volumes(&mut out, s);
    pools(&mut out, s);
    runs(&mut out, s);
    out.family(
        "kvstrap_publications_pending",
        "gauge",
        "PersistentVolumes rendered but not yet accepted by the API server.",
    );
    out.sample(
        "kvstrap_publications_pending",
        &[],
        s.publications_pending as f64,
    );
    out.family(
        "kvstrap_publication_errors_total",
        "counter",
        "Failed attempts to publish to the API server.",
    );
    out.sample(
        "kvstrap_publication_errors_total",
        &[],
        s.publication_errors as f64,
    );
    out.text
}

#[derive(Default)]
struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.text, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn disks(out: &mut Out, s: &Snapshot) {
    out.family(
        "kvstrap_disks",
        "gauge",
        "Disks of the node by ownership verdict (ours, free, foreign, in_use, excluded) or service state (draining, drained).",
    );
    for state in DISK_STATES {
        let n = s.disks.iter().filter(|d| d.state == state).count();
        out.sample("kvstrap_disks", &[("state", state)], n as f64);
    }
    out.family(
        "kvstrap_disks_health",
        "gauge",
        "Disks a disk group selects, by SMART health (passed, failed, unknown, sleeping).",
    );
    for a in Assessment::ALL {
        let n = s
            .disks
            .iter()
            .filter(|d| d.health.as_ref().map(|h| h.assessment) == Some(a))
            .count();
        out.sample("kvstrap_disks_health", &[("health", a.as_str())], n as f64);
    }
    out.family(
        "kvstrap_disk_health",
        "gauge",
        "1 for the SMART health assessment a selected disk is in, 0 for the others.",
    );
    for d in &s.disks {
        let Some(h) = &d.health else { continue };
        let disk = d.path.to_string_lossy();
        let group = d.group.as_deref().unwrap_or("");
        for a in Assessment::ALL {
            let v = if h.assessment == a { 1.0 } else { 0.0 };
            out.sample(
                "kvstrap_disk_health",
                &[("disk", &disk), ("group", group), ("health", a.as_str())],
                v,
            );
        }
    }
}

/// The measured reads of each disk kvstrap measured, and its class.
fn io_figures(out: &mut Out, s: &Snapshot) {
    let measured: Vec<_> = s
        .disks
        .iter()
        .filter_map(|d| d.io.map(|io| (d.path.to_string_lossy(), io)))
        .collect();
    out.family(
        "kvstrap_disk_random_read_iops",
        "gauge",
        "Random 4 KiB reads per second at queue depth 16, measured while the disk was blank.",
    );
    for (disk, io) in &measured {
        let v = io.random_read_iops as f64;
        out.sample("kvstrap_disk_random_read_iops", &[("disk", disk)], v);
    }
    out.family(
        "kvstrap_disk_sequential_read_bytes_per_second",
        "gauge",
        "Sequential 1 MiB reads, bytes per second, measured while the disk was blank.",
    );
    for (disk, io) in &measured {
        let v = io.seq_read_mib_s as f64 * 1_048_576.0;
        out.sample(
            "kvstrap_disk_sequential_read_bytes_per_second",
            &[("disk", disk)],
            v,
        );
    }
    out.family(
        "kvstrap_disk_io_class",
        "gauge",
        "1 for the IO class (fast, standard, slow) a measured disk is in, 0 for the others.",
    );
    for (disk, io) in &measured {
        for class in crate::model::IoClass::ALL {
            let v = if io.class == class { 1.0 } else { 0.0 };
            out.sample(
                "kvstrap_disk_io_class",
                &[("disk", disk), ("class", class.as_str())],
                v,
            );
        }
    }
}

/// The selected dm-multipath maps: their state and their paths.
fn multipath(out: &mut Out, s: &Snapshot) {
    const STATES: [&str; 3] = ["healthy", "degraded", "lost"];
    let maps: Vec<(String, &str, &crate::model::Multipath)> = s
        .disks
        .iter()
        .filter_map(|d| {
            let m = d.multipath.as_ref()?;
            Some((
                d.path.to_string_lossy().into_owned(),
                d.group.as_deref().unwrap_or(""),
                m,
            ))
        })
        .collect();
    out.family(
        "kvstrap_multipath_state",
        "gauge",
        "1 for the state a selected multipath map is in (healthy, degraded: a failed path or a single one, lost: no working path), 0 for the others.",
    );
    for (disk, group, m) in &maps {
        for state in STATES {
            let v = if m.state() == state { 1.0 } else { 0.0 };
            out.sample(
                "kvstrap_multipath_state",
                &[("disk", disk), ("group", group), ("state", state)],
                v,
            );
        }
    }
    out.family(
        "kvstrap_multipath_paths",
        "gauge",
        "Paths of a selected multipath map, active or failed.",
    );
    for (disk, group, m) in &maps {
        let active = m.active_paths();
        for (state, n) in [("active", active), ("failed", m.paths.len() - active)] {
            out.sample(
                "kvstrap_multipath_paths",
                &[("disk", disk), ("group", group), ("state", state)],
                n as f64,
            );
        }
    }
}

/// One gauge per SMART figure, with a line for each disk that reports it.
fn health_figures(out: &mut Out, s: &Snapshot) {
    type Figure = fn(&Health) -> Option<f64>;
    let figures: [(&str, &str, Figure); 7] = [
        (
            "kvstrap_disk_media_errors",
            "Media and data integrity errors (NVMe), uncorrectable errors (ATA 187/198).",
            |h| h.media_errors.map(|v| v as f64),
        ),
        (
            "kvstrap_disk_crc_errors",
            "Interface CRC errors (ATA 199): usually the cable.",
            |h| h.crc_errors.map(|v| v as f64),
        ),
        (
            "kvstrap_disk_reallocated_sectors",
            "Reallocated sectors (ATA 5) or grown defects (SCSI).",
            |h| h.reallocated_sectors.map(|v| v as f64),
        ),
        (
            "kvstrap_disk_pending_sectors",
            "Sectors waiting to be reallocated (ATA 197).",
            |h| h.pending_sectors.map(|v| v as f64),
        ),
        (
            "kvstrap_disk_endurance_used_ratio",
            "NVMe percentage used as a ratio; may exceed 1.",
            |h| h.percentage_used.map(|v| v as f64 / 100.0),
        ),
        (
            "kvstrap_disk_critical_warning",
            "NVMe critical warning bits; 0 when none.",
            |h| h.critical_warning.map(|v| v as f64),
        ),
        (
            "kvstrap_disk_temperature_celsius",
            "Current temperature of the disk.",
            |h| h.temperature_celsius.map(|v| v as f64),
        ),
    ];
    for (name, help, get) in figures {
        let lines: Vec<(String, f64)> = s
            .disks
            .iter()
            .filter_map(|d| {
                Some((
                    d.path.to_string_lossy().into_owned(),
                    get(d.health.as_ref()?)?,
                ))
            })
            .collect();
        if lines.is_empty() {
            continue;
        }
        out.family(name, "gauge", help);
        for (disk, v) in lines {
            out.sample(name, &[("disk", &disk)], v);
        }
    }
}

fn volumes(out: &mut Out, s: &Snapshot) {
    out.family(
        "kvstrap_volumes",
        "gauge",
        "Volumes under the policy by storage class and state (ready, pending).",
    );
    let mut by: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for v in &s.volumes {
        *by.entry((v.storage_class.as_str(), "ready")).or_default() += 0;
        *by.entry((v.storage_class.as_str(), "pending")).or_default() += 0;
        *by.entry((v.storage_class.as_str(), v.state.as_str()))
            .or_default() += 1;
    }
    for ((class, state), n) in by {
        out.sample(
            "kvstrap_volumes",
            &[("storage_class", class), ("state", state)],
            n as f64,
        );
    }
    out.family(
        "kvstrap_volume_capacity_bytes",
        "gauge",
        "Published capacity of each volume.",
    );
    for v in &s.volumes {
        out.sample(
            "kvstrap_volume_capacity_bytes",
            &volume_labels(v).as_refs(),
            v.capacity_bytes as f64,
        );
    }
    out.family(
        "kvstrap_volume_encrypted",
        "gauge",
        "1 when the volume is on a LUKS2 volume (an encrypted group), else 0.",
    );
    for v in &s.volumes {
        out.sample(
            "kvstrap_volume_encrypted",
            &volume_labels(v).as_refs(),
            if v.encrypted { 1.0 } else { 0.0 },
        );
    }
    out.family(
        "kvstrap_luks_volumes_locked",
        "gauge",
        "LUKS2 volumes of kvstrap's that nothing opened in the last run (left as they are, unpublished).",
    );
    out.sample("kvstrap_luks_volumes_locked", &[], s.luks_locked as f64);
    out.family(
        "kvstrap_volume_used_bytes",
        "gauge",
        "Bytes used in each volume, from its project quota or its own filesystem.",
    );
    for v in &s.volumes {
        if let Some(used) = v.used_bytes {
            out.sample(
                "kvstrap_volume_used_bytes",
                &volume_labels(v).as_refs(),
                used as f64,
            );
        }
    }
}

struct Labels(Vec<(&'static str, String)>);

impl Labels {
    fn as_refs(&self) -> Vec<(&str, &str)> {
        self.0.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }
}

/// Each dynamic pool: what its claims' quotas may add up to, what they take, how many.
fn pools(out: &mut Out, s: &Snapshot) {
    type Figure = fn(&super::PoolSample) -> u64;
    let families: [(&str, &str, Figure); 3] = [
        (
            "kvstrap_pool_capacity_bytes",
            "What the quotas of a dynamic pool's volumes may add up to (the filesystem less the reserve, times overcommit).",
            |p| p.capacity_bytes,
        ),
        (
            "kvstrap_pool_used_bytes",
            "What the quotas of a dynamic pool's volumes add up to.",
            |p| p.used_bytes,
        ),
        (
            "kvstrap_pool_volumes",
            "Dynamic volumes on a pool.",
            |p| p.volumes,
        ),
    ];
    for (name, help, value) in families {
        out.family(name, "gauge", help);
        for p in &s.pools {
            let disk = p.disk.display().to_string();
            out.sample(
                name,
                &[
                    ("group", p.group.as_str()),
                    ("storage_class", p.storage_class.as_str()),
                    ("disk", disk.as_str()),
                ],
                value(p) as f64,
            );
        }
    }
}

fn volume_labels(v: &super::VolumeSample) -> Labels {
    Labels(vec![
        ("volume", v.name.clone()),
        ("storage_class", v.storage_class.clone()),
        ("group", v.group.clone()),
        ("disk", v.disk.to_string_lossy().into_owned()),
    ])
}

fn runs(out: &mut Out, s: &Snapshot) {
    let st = &s.stats;
    out.family("kvstrap_apply_runs_total", "counter", "Apply runs.");
    out.sample("kvstrap_apply_runs_total", &[], st.runs as f64);
    out.family(
        "kvstrap_apply_failures_total",
        "counter",
        "Apply runs with a failed step or that could not run.",
    );
    out.sample("kvstrap_apply_failures_total", &[], st.failures as f64);
    out.family(
        "kvstrap_last_successful_apply_timestamp_seconds",
        "gauge",
        "When the last apply run without a failed step finished (0: never).",
    );
    out.sample(
        "kvstrap_last_successful_apply_timestamp_seconds",
        &[],
        st.last_success_unix.unwrap_or(0) as f64,
    );
    out.family(
        "kvstrap_step_duration_seconds",
        "histogram",
        "How long each executed step took, by action.",
    );
    for (action, h) in &st.steps {
        let mut cumulative = 0;
        for (le, n) in STEP_BUCKETS_SECONDS.iter().zip(&h.buckets) {
            cumulative += n;
            out.sample(
                "kvstrap_step_duration_seconds_bucket",
                &[("action", action), ("le", &le.to_string())],
                cumulative as f64,
            );
        }
        out.sample(
            "kvstrap_step_duration_seconds_bucket",
            &[("action", action), ("le", "+Inf")],
            h.count as f64,
        );
        out.sample(
            "kvstrap_step_duration_seconds_sum",
            &[("action", action)],
            h.sum_seconds,
        );
        out.sample(
            "kvstrap_step_duration_seconds_count",
            &[("action", action)],
            h.count as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn an_empty_node_still_has_every_state_at_zero() {
        let text = render(&Snapshot::default());
        assert!(
            text.contains("kvstrap_disks{state=\"in_use\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("kvstrap_disks_health{health=\"failed\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("kvstrap_apply_runs_total 0\n"), "{text}");
        assert!(text.contains("kvstrap_last_successful_apply_timestamp_seconds 0\n"));
    }
}
