//! The cluster layer: policy fragments from ConfigMaps, chosen by the node's labels, and
//! the cache of the last good set under the state directory.
//!
//! The loader only ever reads the cache ([`read_cache`]); whoever talks to the API server
//! (the daemon's fleet watcher, `kvstrap validate --cluster`) selects fragments with
//! [`select`], checks them with `policy::evaluate_cluster` and writes the cache only when
//! the result is good. So a boot without the API server applies the last good policy,
//! and a broken fragment never replaces it.

use super::selector::Selector;
use super::Diagnostic;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// ConfigMaps with this label hold policy fragments.
pub const POLICY_LABEL: &str = "kvstrap.io/policy";
/// Optional label selector choosing the nodes a fragment is for (absent: every node).
pub const SELECTOR_ANNOTATION: &str = "kvstrap.io/node-selector";
/// The data key holding the TOML.
pub const POLICY_KEY: &str = "policy.toml";
/// The cache file, below the state directory.
pub const CACHE_FILE: &str = "cluster-policy.json";
const CACHE_VERSION: u32 = 1;

/// One ConfigMap's fragment, as read from the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fragment {
    pub namespace: String,
    pub name: String,
    /// The `kvstrap.io/node-selector` annotation as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `None` when the ConfigMap has no `policy.toml` key (refused by [`select`]).
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

impl Fragment {
    /// The name diagnostics use: `configmap/NAMESPACE/NAME`.
    pub fn source(&self) -> PathBuf {
        PathBuf::from(format!("configmap/{}/{}", self.namespace, self.name))
    }
}

/// The last good cluster layer of this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCache {
    pub version: u32,
    /// The Node the fragments were selected for, and its labels then.
    pub node: String,
    pub node_labels: BTreeMap<String, String>,
    /// The selected fragments in merge order (by name).
    pub fragments: Vec<Fragment>,
}

impl ClusterCache {
    pub fn new(node: &str, labels: BTreeMap<String, String>, fragments: Vec<Fragment>) -> Self {
        ClusterCache {
            version: CACHE_VERSION,
            node: node.to_string(),
            node_labels: labels,
            fragments,
        }
    }

    pub fn to_json(&self) -> String {
        // A struct of strings and maps always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CACHE_FILE)
}

/// The cached cluster layer; `Ok(None)` when there is none yet. A cache that cannot be
/// read or parsed is a diagnostic on the cache file (it is written atomically, so that
/// means someone edited it: the node must not guess).
pub fn read_cache(state_dir: &Path) -> Result<Option<ClusterCache>, Diagnostic> {
    let path = cache_path(state_dir);
    let problem = |message: String| Diagnostic {
        file: path.clone(),
        line: 0,
        column: 0,
        message,
        hint: Some(format!(
            "delete {} and let kvstrap.service fetch the fragments again",
            path.display()
        )),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(problem(format!(
                "cannot read the cluster policy cache: {e}"
            )))
        }
    };
    let cache: ClusterCache = serde_json::from_str(&text)
        .map_err(|e| problem(format!("the cluster policy cache is not valid: {e}")))?;
    if cache.version != CACHE_VERSION {
        return Err(problem(format!(
            "the cluster policy cache has version {}, this kvstrap reads version {CACHE_VERSION}",
            cache.version
        )));
    }
    Ok(Some(cache))
}

/// The fragments for a node with `labels`, in name order, and the refusals of those
/// that cannot be used at all (a selector that does not parse, no `policy.toml`).
/// A refused fragment names itself, so the caller can tell the operator which one.
pub fn select(
    all: &[Fragment],
    labels: &BTreeMap<String, String>,
) -> (Vec<Fragment>, Vec<Diagnostic>) {
    let mut sorted: Vec<&Fragment> = all.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut selected = Vec::new();
    let mut refused = Vec::new();
    for f in sorted {
        let refuse = |message: String, hint: &str| Diagnostic {
            file: f.source(),
            line: 0,
            column: 0,
            message,
            hint: Some(hint.to_string()),
        };
        let selector = match Selector::parse(f.selector.as_deref().unwrap_or("")) {
            Ok(s) => s,
            Err(e) => {
                refused.push(refuse(
                    format!(
                        "annotation {SELECTOR_ANNOTATION} \"{}\": {e}",
                        f.selector.as_deref().unwrap_or("")
                    ),
                    "write a label selector like \"hw=gpu,zone in (a,b),!maintenance\"",
                ));
                continue;
            }
        };
        if !selector.matches(labels) {
            continue;
        }
        if f.text.is_none() {
            refused.push(refuse(
                format!("the ConfigMap has no data[\"{POLICY_KEY}\"]"),
                "put the TOML fragment under the key policy.toml",
            ));
            continue;
        }
        selected.push(f.clone());
    }
    (selected, refused)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn fragment(name: &str, selector: Option<&str>, text: Option<&str>) -> Fragment {
        Fragment {
            namespace: "kvstrap".into(),
            name: name.into(),
            selector: selector.map(Into::into),
            text: text.map(Into::into),
            resource_version: None,
        }
    }

    #[test]
    fn selection_by_labels_in_name_order_with_refusals() {
        let all = [
            fragment("z-all", None, Some("")),
            fragment("gpu", Some("hw=gpu"), Some("")),
            fragment("nvme", Some("hw=nvme"), Some("")),
            fragment("broken", Some("hw in gpu"), Some("")),
            fragment("empty", Some("hw"), None),
        ];
        let labels = BTreeMap::from([("hw".to_string(), "gpu".to_string())]);
        let (selected, refused) = select(&all, &labels);
        let names: Vec<&str> = selected.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["gpu", "z-all"]);
        let refused: Vec<String> = refused.iter().map(ToString::to_string).collect();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].starts_with("configmap/kvstrap/broken: error: annotation kvstrap.io/node-selector \"hw in gpu\": column 7"), "{refused:?}");
        assert!(
            refused[1].starts_with(
                "configmap/kvstrap/empty: error: the ConfigMap has no data[\"policy.toml\"]"
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn cache_round_trips_and_a_bad_cache_is_a_diagnostic() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_cache(dir.path()), Ok(None));
        let cache = ClusterCache::new(
            "w1",
            BTreeMap::from([("hw".into(), "gpu".into())]),
            vec![fragment("gpu", Some("hw=gpu"), Some("[node]\n"))],
        );
        std::fs::write(cache_path(dir.path()), cache.to_json()).expect("write");
        assert_eq!(read_cache(dir.path()), Ok(Some(cache)));
        std::fs::write(cache_path(dir.path()), "{").expect("write");
        let e = read_cache(dir.path()).expect_err("broken");
        assert!(
            e.to_string()
                .contains("cluster-policy.json: error: the cluster policy cache is not valid"),
            "{e}"
        );
    }
}
