//! Does the object the API server holds already say what kvstrap wants? Compared on the
//! JSON: every field kvstrap sets must be there with the same value; fields the server
//! or other managers add (defaults, status, claimRef, other labels) do not matter.
//! Quantities compare by value ("1000" is "1k"). Pure: no I/O.

use serde::Serialize;
use serde_json::Value;

/// Optional fields kvstrap sets or leaves out: if the wanted object leaves one out but the
/// server has it, kvstrap set it earlier and an apply must remove it.
const OPTIONAL_OWNED: &[&[&str]] = &[
    &["spec", "mountOptions"],
    &["spec", "local", "fsType"],
    &["mountOptions"],
];

/// True when `have` (as listed) already carries everything in `want`: applying `want`
/// would change nothing.
pub fn covers<H: Serialize, W: Serialize>(have: &H, want: &W) -> bool {
    let (Ok(have), Ok(want)) = (serde_json::to_value(have), serde_json::to_value(want)) else {
        return false;
    };
    let stale = OPTIONAL_OWNED
        .iter()
        .any(|path| lookup(&want, path).is_none() && lookup(&have, path).is_some());
    !stale && subset(&have, &want, false)
}

fn lookup<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

fn subset(have: &Value, want: &Value, quantity: bool) -> bool {
    match (have, want) {
        (_, Value::Null) => true,
        (Value::Object(h), Value::Object(w)) => w.iter().all(|(k, wv)| {
            let q = quantity || k == "capacity";
            h.get(k).map_or(wv.is_null(), |hv| subset(hv, wv, q))
        }),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(a, b)| subset(a, b, quantity))
        }
        (Value::String(h), Value::String(w)) if quantity && h != w => {
            matches!((parse_quantity(h), parse_quantity(w)), (Some(a), Some(b)) if a == b)
        }
        _ => have == want,
    }
}

/// Integer Kubernetes quantities: `123`, `100Gi`, `1k`, `5M`. Fractions and exponents are
/// not produced by kvstrap; they compare as different (costing one apply, not a mistake).
fn parse_quantity(s: &str) -> Option<u128> {
    const SUFFIXES: [(&str, u128); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    let (digits, unit) = SUFFIXES
        .iter()
        .find_map(|(suffix, unit)| s.strip_suffix(suffix).map(|d| (d, *unit)))
        .unwrap_or((s, 1));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u128>().ok()?.checked_mul(unit)
}

/// Bytes of a Kubernetes quantity as claims write it: `30Gi`, `1.5Gi`, `500M`, `1e9`,
/// rounded up to a whole byte (a claim gets at least what it asked for). None for what
/// is not a size (negative, milli-units of bytes below one, garbage) or beyond u64.
pub fn quantity_bytes(s: &str) -> Option<u64> {
    const BINARY: [(&str, u32); 6] = [
        ("Ki", 10),
        ("Mi", 20),
        ("Gi", 30),
        ("Ti", 40),
        ("Pi", 50),
        ("Ei", 60),
    ];
    const DECIMAL: [(&str, i32); 7] = [
        ("k", 3),
        ("M", 6),
        ("G", 9),
        ("T", 12),
        ("P", 15),
        ("E", 18),
        ("m", -3),
    ];
    let s = s.trim();
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    // The number as an integer mantissa and a power of ten.
    let mantissa: u128 = format!("{whole}{frac}").parse().ok()?;
    let mut ten: i32 = -i32::try_from(frac.len()).ok()?;
    let mut two: u32 = 0;
    if let Some((_, p)) = BINARY.iter().find(|(x, _)| *x == suffix) {
        two = *p;
    } else if let Some((_, p)) = DECIMAL.iter().find(|(x, _)| *x == suffix) {
        ten += p;
    } else if let Some(exp) = suffix.strip_prefix(['e', 'E']) {
        ten += exp.parse::<i32>().ok()?;
    } else if !suffix.is_empty() {
        return None;
    }
    let mut value = mantissa.checked_mul(1u128.checked_shl(two)?)?;
    if ten >= 0 {
        value = value.checked_mul(10u128.checked_pow(u32::try_from(ten).ok()?)?)?;
    } else {
        let div = 10u128.checked_pow(ten.unsigned_abs())?;
        value = value.div_ceil(div);
    }
    u64::try_from(value).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {

    #[test]
    fn claim_quantities_in_bytes() {
        assert_eq!(quantity_bytes("30Gi"), Some(30 << 30));
        assert_eq!(quantity_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(quantity_bytes("500M"), Some(500_000_000));
        assert_eq!(quantity_bytes("1e9"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("1E"), Some(1_000_000_000_000_000_000));
        assert_eq!(
            quantity_bytes("1500m"),
            Some(2),
            "rounded up to a whole byte"
        );
        assert_eq!(quantity_bytes("12345"), Some(12345));
        assert_eq!(quantity_bytes("-1Gi"), None);
        assert_eq!(quantity_bytes("lots"), None);
        assert_eq!(quantity_bytes("99999Ei"), None, "beyond u64");
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn server_additions_do_not_matter() {
        let want = json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "spec": {"capacity": {"storage": "100Gi"}}});
        let have = json!({"metadata": {"name": "a", "uid": "u", "labels": {"x": "1", "other": "y"}},
            "spec": {"capacity": {"storage": "100Gi"}, "claimRef": {"name": "c"}}, "status": {"phase": "Bound"}});
        assert!(covers(&have, &want));
    }

    #[test]
    fn a_changed_or_missing_field_is_a_difference() {
        let want = json!({"spec": {"accessModes": ["ReadWriteOnce"], "local": {"path": "/a"}}});
        assert!(!covers(
            &json!({"spec": {"accessModes": ["ReadWriteOnce"], "local": {"path": "/b"}}}),
            &want
        ));
        assert!(!covers(&json!({"spec": {"local": {"path": "/a"}}}), &want));
        assert!(!covers(
            &json!({"spec": {"accessModes": ["ReadWriteOnce", "ReadOnlyMany"], "local": {"path": "/a"}}}),
            &want
        ));
    }

    #[test]
    fn quantities_compare_by_value() {
        let want = json!({"spec": {"capacity": {"storage": "1000"}}});
        assert!(covers(
            &json!({"spec": {"capacity": {"storage": "1k"}}}),
            &want
        ));
        assert!(!covers(
            &json!({"spec": {"capacity": {"storage": "1Ki"}}}),
            &want
        ));
        assert_eq!(parse_quantity("100Gi"), Some(100 << 30));
        assert_eq!(parse_quantity("1.5Gi"), None);
    }

    #[test]
    fn an_option_kvstrap_dropped_must_be_removed() {
        let want = json!({"spec": {"local": {"path": "/a"}}});
        let have = json!({"spec": {"local": {"path": "/a"}, "mountOptions": ["noatime"]}});
        assert!(!covers(&have, &want));
    }
}
