//! The node policy of the dynamic-volume tests against the real control plane: one pool
//! (`provisioning = "dynamic"`, shared ext4, 5% reserve) on one loop disk, publishing.

use std::path::Path;

/// The policy of node `node`: class `class`, the pool on `disk`, volumes below `root`,
/// the API reached with `kubeconfig`.
pub fn dynamic_node_policy(
    node: &str,
    class: &str,
    root: &Path,
    disk: &Path,
    kubeconfig: &Path,
) -> String {
    format!(
        r#"[node]
name = "{node}"
storage_root = "{root}"

[kubernetes]
publish = true
kubeconfig = "{kubeconfig}"

[[storage_class]]
name = "{class}"
fs_type = "ext4"
reclaim_policy = "Delete"

[[disk_group]]
name = "pool"
storage_class = "{class}"
layout = "shared"
provisioning = "dynamic"
devices = ["{disk}"]
allow_loop = true
reserve = "5%"
# This machine's kernel has no project quotas; tests/vm proves them.
quota = "if-supported"
"#,
        root = root.display(),
        kubeconfig = kubeconfig.display(),
        disk = disk.display()
    )
}
