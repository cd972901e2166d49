//! placeholder
use super::effects::Effects;
use super::ApplyError;
use crate::host::Outcome;
use crate::model::{DiskLayout, FsType, Owner};
use std::path::Path;
pub struct HostEffects;
impl HostEffects { pub fn new(_: &Path) -> Result<HostEffects, ApplyError> { Ok(HostEffects) } }
impl Effects for HostEffects {
    fn wipe_disk(&self, _: &Path, _: &str) -> Result<Outcome, ApplyError> { todo!() }
    fn write_partition_table(&self, _: &DiskLayout) -> Result<Outcome, ApplyError> { todo!() }
    fn sync_partitions(&self, _: &Path) -> Result<Outcome, ApplyError> { todo!() }
    fn make_filesystem(&self, _: &Path, _: FsType, _: &uuid::Uuid, _: &str, _: bool) -> Result<Outcome, ApplyError> { todo!() }
    fn mount(&self, _: &Path, _: &uuid::Uuid, _: FsType, _: &Path, _: &[String]) -> Result<Outcome, ApplyError> { todo!() }
    fn directory(&self, _: &Path, _: &Owner) -> Result<Outcome, ApplyError> { todo!() }
    fn quota(&self, _: &Path, _: &Path, _: u32, _: u64) -> Result<Outcome, ApplyError> { todo!() }
    fn link_block_device(&self, _: &Path, _: &Path, _: &uuid::Uuid) -> Result<Outcome, ApplyError> { todo!() }
}
