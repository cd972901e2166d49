#!/bin/sh
# Publication benchmarks, release build.
#
#   bench/publish.sh
#       1000 PVs to the in-process API-server double: time and RSS growth of the publisher
#       (goals: under 3 s, under 20 MiB).
#   bench/publish.sh --real [KUBECONFIG]
#       1000 PVs to a real kube-apiserver: the one KUBECONFIG points at (it creates and then
#       deletes PVs labelled kvstrap.io/node=bench-create and bench-kvstrap there), or else a
#       throw-away etcd + kube-apiserver + kube-controller-manager started from
#       KVSTRAP_KUBE_ASSETS (default ../shared/kube-control-plane). Prints
#         - the baseline: the same 1000 PVs created one after the other (one POST each,
#           sequential, through the same client: what `kubectl create -f list.yaml` does,
#           without kubectl's own start-up; kubectl is not needed);
#         - kvstrap's first publication (server-side apply, 16 in flight) and its ratio to
#           the baseline (goal: within 1.2x);
#         - a no-op pass by a fresh process: writes counted from the apiserver's /metrics
#           (apiserver_request_total, verb APPLY) and its time (goals: 0 writes, under 0.3 s).
set -eu
cd "$(dirname "$0")/.."
filter='BENCH|SKIPPED|test result|panicked|goal|control plane up'
case "${1:-}" in
--real)
    if [ -n "${2:-}" ]; then
        KVSTRAP_BENCH_KUBECONFIG=$(realpath "$2")
        export KVSTRAP_BENCH_KUBECONFIG
    fi
    cargo test --release --test kube_bench -- --ignored --nocapture --exact publish_1000_pvs_real 2>&1 | grep -E "$filter"
    ;;
"")
    cargo test --release --test kube_bench -- --ignored --nocapture --exact publish_1000_pvs 2>&1 | grep -E "$filter"
    ;;
*)
    echo "usage: bench/publish.sh [--real [KUBECONFIG]]" >&2
    exit 2
    ;;
esac
