//! The part of smartctl's JSON output (`smartctl --json -a -n standby,3`, schema of
//! smartmontools 7.x) that kvstrap reads, and how it becomes a [`Health`]. Pure: the
//! arguments and the text in, the record out.

use super::{Assessment, Health};
use serde::Deserialize;

/// smartctl's exit status bits (smartctl(8), "RETURN VALUES") that mean it could not talk
/// to the device at all: bad command line (bit 0), device open failed or type unknown
/// (bit 1). Bit 2 (a SMART command failed) still leaves the rest of the report usable.
const EXIT_CANNOT_READ: i32 = 0b11;

/// The exit status smartctl is told to give for a disk in standby or sleep
/// (`-n standby,3`): bits 0 and 1 together, which no real run returns (a command line
/// that does not parse exits at once with bit 0 alone), so it is smartctl(8)'s own
/// suggestion for "a unique exit status".
pub const EXIT_ASLEEP: i32 = 3;

/// The arguments of one reading: everything (`-a`) as JSON, unless the disk is spun down
/// (`-n standby`: checked with CHECK POWER MODE, which does not wake it), then nothing.
pub fn args(disk: &std::path::Path) -> Vec<std::ffi::OsString> {
    vec![
        "--json".into(),
        "-a".into(),
        "-n".into(),
        format!("standby,{EXIT_ASLEEP}").into(),
        disk.as_os_str().to_owned(),
    ]
}

#[derive(Debug, Default, Deserialize)]
struct Report {
    #[serde(default)]
    smartctl: Meta,
    smart_support: Option<Support>,
    smart_status: Option<Status>,
    ata_smart_attributes: Option<AtaAttributes>,
    nvme_smart_health_information_log: Option<NvmeLog>,
    /// SAS/SCSI disks: defects found since manufacture, their reallocated sectors.
    scsi_grown_defect_list: Option<u64>,
    temperature: Option<Temperature>,
}

#[derive(Debug, Default, Deserialize)]
struct Meta {
    #[serde(default)]
    exit_status: i32,
    #[serde(default)]
    messages: Vec<Message>,
}

#[derive(Debug, Deserialize)]
struct Message {
    string: String,
}

#[derive(Debug, Deserialize)]
struct Support {
    available: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Status {
    passed: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct AtaAttributes {
    #[serde(default)]
    table: Vec<AtaAttribute>,
}

#[derive(Debug, Deserialize)]
struct AtaAttribute {
    id: u32,
    raw: Raw,
}

#[derive(Debug, Deserialize)]
struct Raw {
    value: u64,
}

#[derive(Debug, Deserialize)]
struct NvmeLog {
    critical_warning: Option<u64>,
    percentage_used: Option<u64>,
    media_errors: Option<u64>,
    temperature: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct Temperature {
    current: Option<i64>,
}

/// ATA attribute ids (the de-facto standard numbering smartctl's drive database uses).
const ATA_REALLOCATED: u32 = 5;
const ATA_REPORTED_UNCORRECTABLE: u32 = 187;
const ATA_PENDING: u32 = 197;
const ATA_OFFLINE_UNCORRECTABLE: u32 = 198;
const ATA_CRC_ERRORS: u32 = 199;

/// The health smartctl's JSON describes. Output that is not smartctl JSON gives
/// `unknown` with the reason, never an error: health must not stop anything else.
pub fn parse(json: &str) -> Health {
    let report: Report = match serde_json::from_str(json) {
        Ok(r) => r,
        Err(e) => {
            return Health::unknown(format!("smartctl printed no JSON kvstrap can read: {e}"))
        }
    };
    if asleep(&report.smartctl) {
        return Health {
            assessment: Assessment::Sleeping,
            detail: Some(
                "the disk was in standby (spun down): not read, so as not to wake it".into(),
            ),
            ..Health::default()
        };
    }
    if report.smartctl.exit_status & EXIT_CANNOT_READ != 0 {
        return Health::unknown(cannot_read(&report.smartctl));
    }
    let figures = figures(&report);
    let (assessment, detail) = assess(&report);
    Health {
        assessment,
        detail,
        ..figures
    }
}

/// smartctl stopped before reading because the disk is in a low-power mode: it says
/// `Device is in STANDBY mode, exit(3)` (or SLEEP, or `STANDBY (OS)`), with the exit
/// status asked for.
fn asleep(meta: &Meta) -> bool {
    let said = meta.messages.iter().any(|m| {
        let s = m.string.as_str();
        s.contains("Device is in ")
            && (s.contains("STANDBY") || s.contains("SLEEP"))
            && s.contains(" mode")
    });
    said || meta.exit_status == EXIT_ASLEEP
}

fn cannot_read(meta: &Meta) -> String {
    let said: Vec<&str> = meta.messages.iter().map(|m| m.string.trim()).collect();
    if said.is_empty() {
        format!(
            "smartctl cannot read the device (exit status {})",
            meta.exit_status
        )
    } else {
        format!("smartctl cannot read the device: {}", said.join("; "))
    }
}

/// The temperature bit of the NVMe critical warning: a hot drive (a failed fan, a hot
/// aisle) is not a failing one, and `on_failure = "drain"` must not drain good disks for
/// good over it. Alone it is a warning; with any other bit the drive has failed.
const TEMPERATURE_BIT: u64 = 1 << 1;

fn assess(report: &Report) -> (Assessment, Option<String>) {
    let warning = report
        .nvme_smart_health_information_log
        .as_ref()
        .and_then(|l| l.critical_warning)
        .unwrap_or(0);
    let hot = (warning == TEMPERATURE_BIT).then(|| {
        format!(
            "NVMe critical warning 0x{warning:02x}: {} (a warning, not a failure: check the drive's cooling)",
            critical_warning_text(warning)
        )
    });
    match report.smart_status.as_ref().and_then(|s| s.passed) {
        _ if warning != 0 && hot.is_none() => (
            Assessment::Failed,
            Some(format!(
                "NVMe critical warning 0x{warning:02x}: {}",
                critical_warning_text(warning)
            )),
        ),
        Some(true) => (Assessment::Passed, hot),
        Some(false) => (
            Assessment::Failed,
            Some("SMART overall-health self-assessment: FAILED".into()),
        ),
        None if report.smart_support.as_ref().and_then(|s| s.available) == Some(false) => (
            Assessment::Unknown,
            Some("the device does not support SMART".into()),
        ),
        None => (
            Assessment::Unknown,
            Some("the device reported no overall-health assessment".into()),
        ),
    }
}

/// The NVMe critical warning bits (NVMe base specification, SMART / Health log, byte 0).
fn critical_warning_text(bits: u64) -> String {
    const BITS: [&str; 6] = [
        "available spare below threshold",
        "temperature out of range",
        "reliability degraded by media or internal errors",
        "media placed in read-only mode",
        "volatile memory backup failed",
        "persistent memory region read-only",
    ];
    let said: Vec<&str> = BITS
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, text)| *text)
        .collect();
    if said.is_empty() {
        "unknown warning".into()
    } else {
        said.join(", ")
    }
}

fn figures(report: &Report) -> Health {
    let ata = |id: u32| {
        report
            .ata_smart_attributes
            .as_ref()?
            .table
            .iter()
            .find(|a| a.id == id)
            .map(|a| a.raw.value)
    };
    let nvme = report.nvme_smart_health_information_log.as_ref();
    Health {
        media_errors: nvme
            .and_then(|l| l.media_errors)
            .or_else(|| ata(ATA_REPORTED_UNCORRECTABLE))
            .or_else(|| ata(ATA_OFFLINE_UNCORRECTABLE)),
        crc_errors: ata(ATA_CRC_ERRORS),
        reallocated_sectors: ata(ATA_REALLOCATED).or(report.scsi_grown_defect_list),
        pending_sectors: ata(ATA_PENDING),
        percentage_used: nvme.and_then(|l| l.percentage_used),
        critical_warning: nvme.and_then(|l| l.critical_warning),
        temperature_celsius: report
            .temperature
            .as_ref()
            .and_then(|t| t.current)
            .or_else(|| nvme.and_then(|l| l.temperature)),
        ..Health::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_json_is_unknown_with_the_reason() {
        let h = parse("smartctl: command not found");
        assert_eq!(h.assessment, Assessment::Unknown);
        assert!(h.detail.unwrap_or_default().contains("no JSON"));
    }

    #[test]
    fn an_open_failure_without_messages_names_the_exit_status() {
        let h = parse(r#"{"smartctl": {"exit_status": 2}}"#);
        assert_eq!(h.assessment, Assessment::Unknown);
        assert_eq!(
            h.detail.as_deref(),
            Some("smartctl cannot read the device (exit status 2)")
        );
    }

    #[test]
    fn a_failed_smart_command_keeps_what_was_read() {
        // Bit 2: a SMART command failed; the status that was read still counts.
        let h = parse(r#"{"smartctl": {"exit_status": 4}, "smart_status": {"passed": true}}"#);
        assert_eq!(h.assessment, Assessment::Passed);
    }

    #[test]
    fn no_smart_support_is_unknown() {
        let h = parse(r#"{"smartctl": {"exit_status": 0}, "smart_support": {"available": false}}"#);
        assert_eq!(h.assessment, Assessment::Unknown);
        assert_eq!(
            h.detail.as_deref(),
            Some("the device does not support SMART")
        );
    }

    #[test]
    fn scsi_grown_defects_are_reallocated_sectors() {
        let h = parse(
            r#"{"smart_status": {"passed": true}, "scsi_grown_defect_list": 12, "temperature": {"current": 33}}"#,
        );
        assert_eq!(h.reallocated_sectors, Some(12));
        assert_eq!(h.temperature_celsius, Some(33));
    }

    #[test]
    fn the_temperature_bit_alone_is_a_warning_not_a_failure() {
        let nvme = |bits: u64| {
            parse(&format!(
                r#"{{"smartctl": {{"exit_status": 0}}, "smart_status": {{"passed": true}},
                   "nvme_smart_health_information_log": {{"critical_warning": {bits}, "temperature": 81}}}}"#
            ))
        };
        let hot = nvme(0x02);
        assert_eq!(hot.assessment, Assessment::Passed);
        let said = hot.detail.unwrap_or_default();
        assert!(
            said.contains("temperature out of range") && said.contains("a warning"),
            "{said}"
        );
        // With any other bit the drive has failed, hot or not.
        assert_eq!(nvme(0x06).assessment, Assessment::Failed);
        assert_eq!(nvme(0x04).assessment, Assessment::Failed);
    }

    #[test]
    fn a_disk_in_standby_is_sleeping_not_unreadable() {
        let said = r#"{"smartctl": {"exit_status": 3, "messages": [{"string": "Device is in STANDBY mode, exit(3)", "severity": "information"}]}}"#;
        let h = parse(said);
        assert_eq!(h.assessment, Assessment::Sleeping, "{h:?}");
        // The default exit status (2) of `-n standby`, and the OS's own standby.
        let os = r#"{"smartctl": {"exit_status": 2, "messages": [{"string": "Device is in STANDBY (OS) mode, exit(2)", "severity": "information"}]}}"#;
        assert_eq!(parse(os).assessment, Assessment::Sleeping);
        // An open failure says no such thing.
        let failed = r#"{"smartctl": {"exit_status": 2, "messages": [{"string": "Smartctl open device: /dev/sdx failed: No such device", "severity": "error"}]}}"#;
        assert_eq!(parse(failed).assessment, Assessment::Unknown);
    }

    #[test]
    fn every_reading_asks_smartctl_not_to_wake_the_disk() {
        let a: Vec<String> = args(std::path::Path::new("/dev/sdb"))
            .into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(a, ["--json", "-a", "-n", "standby,3", "/dev/sdb"]);
    }

    #[test]
    fn every_critical_warning_bit_is_named() {
        assert_eq!(
            critical_warning_text(0x05),
            "available spare below threshold, reliability degraded by media or internal errors"
        );
        assert_eq!(critical_warning_text(0x80), "unknown warning");
    }
}
