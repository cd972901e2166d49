//! Disk health as the CLI asks for it: the last reading kept in the state directory, or one made now.
//!
//! A run, `plan` and `disks` never read health themselves: they take the reading the
//! daemon's monitor kept (with its time). Only `kvstrap disks --health` reads now, and
//! keeps what it read for the others.

use super::Node;
use crate::health::{self, store, HealthMap, Selected};
use crate::model::Inventory;
use crate::policy::Policy;

impl Node {
    /// The last reading of each disk a group selects, where there is one (no smartctl).
    pub fn kept_health(&self, policy: &Policy, inventory: &Inventory) -> HealthMap {
        let service = self.disk_service().unwrap_or_default();
        store::load(&self.inputs.state_dir).of(&health::selected_disks(policy, inventory, &service))
    }

    /// Read the health of `disks` (those a group selects) now (smartctl, which never wakes a
    /// disk in standby), and keep it in the state directory. A disk found asleep keeps
    /// the figures of its last reading. A record that cannot be written (a read-only
    /// state directory, not root) is logged: the reading is shown all the same.
    pub fn read_health_now(&self, disks: &[Selected]) -> HealthMap {
        let paths: Vec<_> = disks.iter().map(|d| d.path.clone()).collect();
        let mut kept = store::load(&self.inputs.state_dir);
        let before = kept.of(disks);
        let fresh: HealthMap = health::read::Reader::discover()
            .read_all(&paths)
            .into_iter()
            .map(|(disk, h)| {
                let h = health::keep_while_asleep(before.get(&disk), h);
                (disk, h)
            })
            .collect();
        kept.record(disks, &fresh);
        if let Err(e) = store::save(&self.inputs.state_dir, &kept) {
            tracing::debug!("the health reading is not kept: {e}");
        }
        fresh
    }
}
