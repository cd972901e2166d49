#!/bin/sh
# Publishes 1000 PVs to the in-process API-server double (release build) and prints
# the time and the RSS growth. Goals: under 3 s, under 20 MiB.
set -eu
cd "$(dirname "$0")/.."
cargo test --release --test kube_bench -- --ignored --nocapture publish_1000_pvs 2>&1 | grep -E 'BENCH|test result|panicked|goal'
