#!/bin/sh
# Dynamic volumes benchmarks, release build, as root (loop devices, mounts), against a
# throw-away etcd + kube-apiserver + kube-controller-manager started from
# KVSTRAP_KUBE_ASSETS (default ../shared/kube-control-plane). The benchmark plays
# kube-scheduler: claims are created with volume.kubernetes.io/selected-node set.
#
#   bench/dynamic.sh
#     - one node: 100 claims from selected-node to Bound; claims/s (goal >= 20), p50 and
#       p99 latency (goal p99 < 2 s), API requests per claim;
#     - 100 simulated nodes, each with its own provisioner and pool: the same figures
#       and the watch events of claims delivered per claim.
set -eu
cd "$(dirname "$0")/.."
filter='BENCH|SKIPPED|test result|panicked|goal'
for t in dynamic_100_claims_one_node dynamic_100_claims_100_nodes; do
    cargo test --release --test dynamic_bench -- --ignored --nocapture --exact "$t" 2>&1 | grep -E "$filter"
done
