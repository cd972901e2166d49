#!/bin/sh
# A fleet of simulated nodes against one real kube-apiserver (started from
# KVSTRAP_KUBE_ASSETS, default ../shared/kube-control-plane). Each node is the fleet
# watcher and the Node state publisher in-process, with its own Node object. Prints
#   - the time for a changed policy fragment to be cached on every node;
#   - the API requests per node per hour while nothing changes (apiserver_request_total):
#     watches only, no periodic LIST (goal: 0 LIST).
#
#   bench/fleet.sh [NODES [IDLE_SECONDS]]     defaults: 100 nodes, 300 s idle
set -eu
cd "$(dirname "$0")/.."
KVSTRAP_BENCH_NODES=${1:-100}
KVSTRAP_BENCH_IDLE_SECS=${2:-300}
export KVSTRAP_BENCH_NODES KVSTRAP_BENCH_IDLE_SECS
cargo test --test fleet_bench -- --ignored --nocapture --exact fleet_of_nodes_real 2>&1 |
    grep -E 'BENCH|SKIPPED|test result|panicked|control plane up'
