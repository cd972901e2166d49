//! D-Bus `Status` round trip against a running daemon: N calls on one connection, then
//! the percentiles. Run through bench/daemon-dbus-latency.sh, which starts a private bus
//! and the daemon on the simulated engine (32 disks, 320 volumes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvstrap::cli::bus_client::Client;
use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    let last = sorted.len().saturating_sub(1);
    sorted[(last * percent).div_ceil(100).min(last)]
}

fn main() {
    // `cargo bench` passes --bench; only the count matters here.
    let calls: usize = std::env::var("CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let Ok(address) = std::env::var("DBUS_SYSTEM_BUS_ADDRESS") else {
        eprintln!(
            "daemon_dbus_latency: set DBUS_SYSTEM_BUS_ADDRESS (run bench/daemon-dbus-latency.sh)"
        );
        return;
    };
    let mut times = zbus::block_on(async {
        let client = Client::connect(Some(&address))
            .await
            .expect("daemon on the bus");
        let proxy = client.proxy().await.unwrap();
        proxy.status().await.unwrap(); // warm-up: introspection caches, first allocations
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls {
            let start = Instant::now();
            let json = proxy.status().await.unwrap();
            times.push(start.elapsed());
            assert!(json.starts_with('{'));
        }
        times
    });
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "Status round trip over {calls} calls: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        ms(percentile(&times, 50)),
        ms(percentile(&times, 90)),
        ms(percentile(&times, 99)),
        ms(times[times.len() - 1])
    );
}
