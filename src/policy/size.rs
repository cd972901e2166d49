//! Sizes ("500G", "1.5TiB", bytes), percentages ("10%") and file modes ("0750"),
//! parsed exactly (integer arithmetic, no floating point rounding surprises).

/// Why a value was refused, and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub hint: String,
}

fn refuse(message: impl Into<String>, hint: impl Into<String>) -> Refusal {
    Refusal {
        message: message.into(),
        hint: hint.into(),
    }
}

const SIZE_HINT: &str = "write a size like \"500G\", \"1.5TiB\", \"100GB\" or a number of bytes; \
K M G T P E are powers of 1000, Ki Mi Gi Ti Pi Ei powers of 1024, a trailing B is optional";

/// A size in bytes from a string with a unit. Units are case-insensitive:
/// `K M G T P E` (and `KB`...) are decimal like Kubernetes quantities,
/// `Ki Mi Gi Ti Pi Ei` (and `KiB`...) binary; no unit or `B` means bytes.
/// Fractions are allowed ("1.5TiB") and rounded down to whole bytes.
pub fn parse_size(text: &str) -> Result<u64, Refusal> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    if trimmed.starts_with('-') {
        return Err(refuse(format!("size \"{text}\" is negative"), SIZE_HINT));
    }
    let multiplier = unit_multiplier(unit.trim()).ok_or_else(|| {
        refuse(
            format!("size \"{text}\" has an unknown unit \"{}\"", unit.trim()),
            SIZE_HINT,
        )
    })?;
    let bytes = scaled(number, multiplier).ok_or_else(|| {
        refuse(
            format!("size \"{text}\" is not a number with a unit"),
            SIZE_HINT,
        )
    })?;
    check_size(bytes, text)
}

/// A size given as a TOML integer: a number of bytes.
pub fn size_from_int(value: i64) -> Result<u64, Refusal> {
    if value < 0 {
        return Err(refuse(format!("size {value} is negative"), SIZE_HINT));
    }
    check_size(u128::from(value.unsigned_abs()), &value.to_string())
}

fn check_size(bytes: u128, text: &str) -> Result<u64, Refusal> {
    if bytes == 0 {
        return Err(refuse(format!("size \"{text}\" is zero"), SIZE_HINT));
    }
    u64::try_from(bytes).map_err(|_| refuse(format!("size \"{text}\" is too large"), SIZE_HINT))
}

fn unit_multiplier(unit: &str) -> Option<u128> {
    let lower = unit.to_ascii_lowercase();
    let unit = lower.strip_suffix('b').unwrap_or(&lower);
    let (prefix, binary) = match unit.strip_suffix('i') {
        Some(p) if !p.is_empty() => (p, true),
        _ => (unit, false),
    };
    let power = match prefix {
        "" if !binary => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        "p" => 5,
        "e" => 6,
        _ => return None,
    };
    let base: u128 = if binary { 1024 } else { 1000 };
    Some(base.pow(power))
}

/// `number` (digits with at most one '.') times `multiplier`, rounded down.
fn scaled(number: &str, multiplier: u128) -> Option<u128> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    // 18 fractional digits are plenty; more could overflow the denominator.
    if fraction.len() > 18 || fraction.contains('.') || whole.len() > 30 {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let digits: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().ok()?
    };
    let denominator = 10u128.pow(u32::try_from(fraction.len()).ok()?);
    let whole_bytes = whole.checked_mul(multiplier)?;
    let fraction_bytes = digits.checked_mul(multiplier)? / denominator;
    whole_bytes.checked_add(fraction_bytes)
}

/// Most of each disk that may be kept back; more leaves nothing worth publishing.
pub const MAX_RESERVE_PERCENT: u32 = 90;

/// "10%" -> 10, within 0..=90.
pub fn parse_percent(text: &str) -> Result<u32, Refusal> {
    let hint =
        format!("write a whole percentage from 0 to {MAX_RESERVE_PERCENT}, like reserve = \"10%\"");
    let Some(number) = text.trim().strip_suffix('%') else {
        return Err(refuse(format!("\"{text}\" is not a percentage"), hint));
    };
    let value: u32 = number.trim().parse().map_err(|_| {
        refuse(
            format!("\"{text}\" is not a whole percentage"),
            hint.clone(),
        )
    })?;
    if value > MAX_RESERVE_PERCENT {
        return Err(refuse(
            format!("{value}% is more than {MAX_RESERVE_PERCENT}%"),
            hint,
        ));
    }
    Ok(value)
}

/// An octal mode string: "0750", "750", "2770" (at most 0o7777).
pub fn parse_mode(text: &str) -> Result<u32, Refusal> {
    let hint = "write the mode as an octal string, like mode = \"0750\"";
    let digits = text.trim();
    let valid = (3..=4).contains(&digits.len()) && digits.chars().all(|c| ('0'..='7').contains(&c));
    if !valid {
        return Err(refuse(
            format!("\"{text}\" is not an octal file mode"),
            hint,
        ));
    }
    u32::from_str_radix(digits, 8)
        .map_err(|_| refuse(format!("\"{text}\" is not an octal file mode"), hint))
}

/// "1.5 GiB"-style rendering for messages.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("500G"), Ok(500_000_000_000));
        assert_eq!(parse_size("100GB"), Ok(100_000_000_000));
        assert_eq!(parse_size("1.5TiB"), Ok(3 * (1u64 << 39)));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("1 MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2k"), Ok(2000));
        assert_eq!(parse_size(".5K"), Ok(500));
    }

    #[test]
    fn bad_sizes_are_refused() {
        for bad in [
            "10 parsecs",
            "-5G",
            "0",
            "0G",
            "G",
            "",
            "1.2.3G",
            "1iB",
            "99999999999E",
            "1e3",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} should be refused");
        }
        assert!(parse_size("10 parsecs")
            .unwrap_err()
            .message
            .contains("unknown unit \"parsecs\""));
        assert!(parse_size("-5G").unwrap_err().message.contains("negative"));
        assert!(size_from_int(-1).is_err());
        assert!(size_from_int(0).is_err());
        assert_eq!(size_from_int(1 << 30), Ok(1 << 30));
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("10%"), Ok(10));
        assert_eq!(parse_percent("0%"), Ok(0));
        assert_eq!(parse_percent("90%"), Ok(90));
        for bad in ["91%", "10", "-1%", "ten%", "10.5%", "%"] {
            assert!(parse_percent(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0750"), Ok(0o750));
        assert_eq!(parse_mode("750"), Ok(0o750));
        assert_eq!(parse_mode("2770"), Ok(0o2770));
        for bad in ["0999", "75", "07500", "rwx", ""] {
            assert!(parse_mode(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536 << 20), "1.5 GiB");
    }
}
