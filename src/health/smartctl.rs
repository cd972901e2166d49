//! The part of smartctl's JSON output (`smartctl --json -a`, schema of smartmontools 7.x)
//! that kvstrap reads, and how it becomes a [`Health`]. Pure: the text in, the record out.

use super::{Assessment, Health};
use serde::Deserialize;

/// smartctl's exit status bits (smartctl(8), "RETURN VALUES") that mean it could not talk
/// to the device at all: bad command line (bit 0), device open failed or type unknown
/// (bit 1). Bit 2 (a SMART command failed) still leaves the rest of the report usable.
const EXIT_CANNOT_READ: i32 = 0b11;

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
    fn every_critical_warning_bit_is_named() {
        assert_eq!(
            critical_warning_text(0x05),
            "available spare below threshold, reliability degraded by media or internal errors"
        );
        assert_eq!(critical_warning_text(0x80), "unknown warning");
    }
}
