//! `kvstrap disks --probe`: measure blank disks' reads again and print the figures.

use super::args::{DisksArgs, GlobalArgs, OutputFormat};
use anyhow::Result;
use std::time::Duration;

pub fn probe(g: &GlobalArgs, a: &DisksArgs) -> Result<i32> {
    let node = super::node(g);
    // Thresholds from the policy when it loads; the figures do not depend on it.
    let policy = node.load_policy().ok();
    let outcomes = node.measure_disks(
        policy.as_ref(),
        &a.devices,
        Duration::from_secs(a.lock_timeout),
    )?;
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    match g.output {
        OutputFormat::Json => {
            let rows: Vec<serde_json::Value> = outcomes
                .iter()
                .map(|o| match &o.result {
                    Ok(io) => serde_json::json!({
                        "disk": o.disk,
                        "io": io,
                        "took_ms": o.took.as_millis(),
                    }),
                    Err(e) => serde_json::json!({ "disk": o.disk, "error": e }),
                })
                .collect();
            super::print_json(&serde_json::json!({ "measured": rows }));
        }
        OutputFormat::Human => {
            if outcomes.is_empty() {
                println!("no blank, eligible disk to measure (name one: kvstrap disks --probe /dev/DISK)");
            }
            println!(
                "{:<16} {:>14} {:>12} {:<9} TOOK",
                "NAME", "RANDOM READ/S", "SEQ MiB/S", "CLASS"
            );
            for o in &outcomes {
                match &o.result {
                    Ok(io) => println!(
                        "{:<16} {:>14} {:>12} {:<9} {:.1}s",
                        o.disk.display(),
                        io.random_read_iops,
                        io.seq_read_mib_s,
                        io.class,
                        o.took.as_secs_f64()
                    ),
                    Err(e) => println!("{:<16} not measured: {e}", o.disk.display()),
                }
            }
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}
