//! Health from recorded `smartctl --json -a` outputs (smartmontools 7.3's schema): a
//! healthy and a failing SATA disk, a worn-out NVMe drive, and a device smartctl cannot
//! read (a loop device), a disk in standby. No root, no smartctl needed.

use kvstrap::health::{smartctl, Assessment, Health};

fn fixture(name: &str) -> Health {
    let path = format!(
        "{}/tests/fixtures/smartctl/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    smartctl::parse(&text)
}

#[test]
fn healthy_sata_disk_passes_with_its_figures() {
    assert_eq!(
        fixture("sata-healthy.json"),
        Health {
            assessment: Assessment::Passed,
            detail: None,
            media_errors: Some(0),
            crc_errors: Some(0),
            reallocated_sectors: Some(0),
            pending_sectors: Some(0),
            percentage_used: None,
            critical_warning: None,
            temperature_celsius: Some(34),
            read_unix: None,
        }
    );
}

#[test]
fn failing_sata_disk_fails_with_its_bad_sectors() {
    assert_eq!(
        fixture("sata-failing.json"),
        Health {
            assessment: Assessment::Failed,
            detail: Some("SMART overall-health self-assessment: FAILED".into()),
            media_errors: Some(2311),
            crc_errors: Some(17),
            reallocated_sectors: Some(61432),
            pending_sectors: Some(1184),
            percentage_used: None,
            critical_warning: None,
            temperature_celsius: Some(41),
            read_unix: None,
        }
    );
}

#[test]
fn worn_nvme_drive_fails_with_its_critical_warning() {
    assert_eq!(
        fixture("nvme-worn.json"),
        Health {
            assessment: Assessment::Failed,
            detail: Some(
                "NVMe critical warning 0x05: available spare below threshold, \
                 reliability degraded by media or internal errors"
                    .into()
            ),
            media_errors: Some(14),
            crc_errors: None,
            reallocated_sectors: None,
            pending_sectors: None,
            percentage_used: Some(107),
            critical_warning: Some(5),
            temperature_celsius: Some(48),
            read_unix: None,
        }
    );
}

#[test]
fn a_device_smartctl_cannot_read_is_unknown_never_failed() {
    assert_eq!(
        fixture("unsupported.json"),
        Health::unknown(
            "smartctl cannot read the device: /dev/loop0: Unable to detect device type"
        )
    );
}

/// `smartctl --json -a -n standby,3` on a spun-down SATA disk: it stops before reading
/// (what smartmontools 7.3's ataprint.cpp prints, with the exit status asked for).
#[test]
fn a_disk_in_standby_is_sleeping_never_failed_or_unknown() {
    let h = fixture("sata-standby.json");
    assert_eq!(h.assessment, Assessment::Sleeping, "{h:?}");
    assert!(h.detail.unwrap_or_default().contains("standby"));
}
