//! `[health]` and `[metrics]`: how often disk health is read, and where the Prometheus
//! metrics go. Both sections are optional; their defaults are what a node wants.

use super::diag::Diags;
use super::fields::Section;
use super::types::{HealthSettings, MetricsSettings};
use std::net::SocketAddr;
use std::path::{Component, PathBuf};
use std::time::Duration;

pub const HEALTH_KEYS: &[&str] = &["interval"];
pub const METRICS_KEYS: &[&str] = &["textfile", "listen"];

/// Shorter than this would keep disks answering SMART queries all the time.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longer than a week and a failing disk goes unseen for too long; it also keeps every
/// deadline computed from the interval far from overflowing.
pub const MAX_INTERVAL: Duration = Duration::from_secs(7 * 86_400);
const INTERVAL_HINT: &str =
    "write a duration from 1s to 7d, like interval = \"1h\", \"30m\" or \"90s\" (units s, m, h, d), or a number of seconds";

pub fn health(s: &Section, diags: &mut Diags) -> Option<HealthSettings> {
    s.check_keys(HEALTH_KEYS, diags);
    let interval = match s.entry("interval") {
        None => Some(HealthSettings::default().interval),
        Some(entry) => {
            let parsed = match &entry.node.value {
                super::raw::Value::Str(text) => parse_duration(text),
                super::raw::Value::Int { value, .. } => u64::try_from(*value)
                    .map(Duration::from_secs)
                    .map_err(|_| format!("interval {value} is negative")),
                other => Err(format!(
                    "interval must be a string or an integer, found {}",
                    other.kind()
                )),
            };
            match parsed {
                Ok(d) if (MIN_INTERVAL..=MAX_INTERVAL).contains(&d) => Some(d),
                Ok(d) if d < MIN_INTERVAL => {
                    diags.error(
                        entry.node.at,
                        "[health] interval must be at least one second",
                        INTERVAL_HINT,
                    );
                    None
                }
                Ok(d) => {
                    diags.error(
                        entry.node.at,
                        format!(
                            "[health] interval must be at most 7 days (604800 seconds), not {} seconds",
                            d.as_secs()
                        ),
                        INTERVAL_HINT,
                    );
                    None
                }
                Err(message) => {
                    diags.error(entry.node.at, message, INTERVAL_HINT);
                    None
                }
            }
        }
    };
    Some(HealthSettings {
        interval: interval?,
    })
}

/// "90s", "30m", "1h", "2d", or "3600" (seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "interval \"{text}\" has an unknown unit \"{other}\""
            ))
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("interval \"{text}\" is not a whole number with a unit"))
}

pub fn metrics(s: &Section, diags: &mut Diags) -> Option<MetricsSettings> {
    s.check_keys(METRICS_KEYS, diags);
    let textfile = match s.string(
        "textfile",
        "\"/var/lib/prometheus/node-exporter/kvstrap.prom\"",
        diags,
    ) {
        // The empty string turns the file off.
        Some(("", _)) => Some(None),
        Some((text, at)) => {
            let path = PathBuf::from(text);
            if path.is_absolute()
                && path.file_name().is_some()
                && !path.components().any(|c| c == Component::ParentDir)
            {
                Some(Some(path))
            } else {
                diags.error(
                    at,
                    format!("textfile \"{text}\" is not an absolute file path without \"..\""),
                    "write textfile = \"/var/lib/prometheus/node-exporter/kvstrap.prom\", or \"\" to write no file",
                );
                None
            }
        }
        None if s.entry("textfile").is_some() => None,
        None => Some(MetricsSettings::default().textfile),
    };
    let listen = match s.string("listen", "\"127.0.0.1:9741\"", diags) {
        Some(("", _)) => Some(None),
        Some((text, at)) => match listen_address(text) {
            Some(addr) => Some(Some(addr)),
            None => {
                diags.error(
                    at,
                    format!("listen \"{text}\" is not an address and port"),
                    "write listen = \"9741\" (loopback, 127.0.0.1:9741) or an address and port such as \"[::1]:9741\" or \"10.0.0.7:9741\"; leave it out to serve no metrics over HTTP",
                );
                None
            }
        },
        None if s.entry("listen").is_some() => None,
        None => Some(None),
    };
    Some(MetricsSettings {
        textfile: textfile?,
        listen: listen?,
        textfile_is_default: s.entry("textfile").is_none(),
    })
}

/// `"9741"` or `":9741"`: loopback (127.0.0.1) on that port; anything else must name its
/// address, so the metrics reach beyond the node only where a policy says so in full.
fn listen_address(text: &str) -> Option<SocketAddr> {
    let port = text.strip_prefix(':').unwrap_or(text);
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        let port = port.parse::<u16>().ok()?;
        return Some(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)));
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_with_and_without_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("3600"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("1w")
            .unwrap_err()
            .contains("unknown unit \"w\""));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn a_bare_port_listens_on_loopback_only() {
        let at = |t: &str| super::listen_address(t).map(|a| a.to_string());
        assert_eq!(at("9741").as_deref(), Some("127.0.0.1:9741"));
        assert_eq!(at(":9741").as_deref(), Some("127.0.0.1:9741"));
        assert_eq!(at("0.0.0.0:9741").as_deref(), Some("0.0.0.0:9741"));
        assert_eq!(at("[::1]:9741").as_deref(), Some("[::1]:9741"));
        assert_eq!(at("97410"), None);
        assert_eq!(at(":"), None);
        assert_eq!(at("localhost:9741"), None);
    }
}
