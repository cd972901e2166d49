//! Kubernetes name rules (DNS-1123) and "did you mean" suggestions.

/// RFC 1123 label: what a Kubernetes label value or a short object name may be.
pub const LABEL_MAX: usize = 63;
/// RFC 1123 subdomain: what a Kubernetes object name (node, StorageClass) may be.
pub const SUBDOMAIN_MAX: usize = 253;

/// Why `name` is not a DNS-1123 label (lower-case letters, digits and '-', starting and
/// ending with a letter or digit, at most 63 characters), or None when it is one.
pub fn label_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".into());
    }
    if name.len() > LABEL_MAX {
        return Some(format!(
            "is {} characters long, more than {LABEL_MAX}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!("contains '{c}'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some("starts or ends with '-'".into());
    }
    None
}

/// Why `name` is not a DNS-1123 subdomain (dot-separated labels, at most 253
/// characters), or None when it is one.
pub fn subdomain_problem(name: &str) -> Option<String> {
    if name.len() > SUBDOMAIN_MAX {
        return Some(format!(
            "is {} characters long, more than {SUBDOMAIN_MAX}",
            name.len()
        ));
    }
    name.split('.').find_map(label_problem)
}

/// A name that follows the rules, close to what was written, for the hint.
pub fn dns_suggestion(name: &str) -> String {
    let mut out: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let trimmed = out.trim_matches('-');
    let short: String = trimmed.chars().take(LABEL_MAX).collect();
    let short = short.trim_end_matches('-');
    if short.is_empty() {
        "my-name".into()
    } else {
        short.to_string()
    }
}

/// The known word closest to `word`, if it is close enough to be a likely typo.
pub fn closest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| {
            (
                strsim::damerau_levenshtein(&word.to_ascii_lowercase(), k),
                *k,
            )
        })
        .filter(|(distance, k)| *distance <= (k.len() / 3).max(2))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, k)| k)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(label_problem("nvme-fast0"), None);
        assert!(label_problem("Nvme").is_some());
        assert!(label_problem("a_b").is_some());
        assert!(label_problem("-a").is_some());
        assert!(label_problem("").is_some());
        assert!(label_problem(&"a".repeat(64)).is_some());
    }

    #[test]
    fn subdomains() {
        assert_eq!(subdomain_problem("worker-07.example.com"), None);
        assert!(subdomain_problem("worker..x").is_some());
        assert!(subdomain_problem("Worker").is_some());
    }

    #[test]
    fn suggestions() {
        assert_eq!(dns_suggestion("Fast_NVMe"), "fast-nvme");
        assert_eq!(dns_suggestion("__"), "my-name");
        assert_eq!(
            closest("transprot", &["transport", "rotational"]),
            Some("transport")
        );
        assert_eq!(closest("zzzzzz", &["transport", "rotational"]), None);
    }
}
