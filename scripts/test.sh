#!/usr/bin/env bash
# Runs hostvol's whole test suite: unit tests, and the end-to-end tests, which each start a real
# Kubernetes 1.20.2 control plane with real `hostvol agent` processes, or (tests/real_nodes.rs) a whole
# cluster of real nodes with hostvol installed from deploy/ with its image. Installs what it needs,
# idempotently. Run as root on Debian bookworm (apt-get). Exits non-zero if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/ensure-tools.sh  # cargo, kubectl, a C linker
scripts/setup-control-plane.sh >/dev/null  # etcd + Kubernetes 1.20.2 control-plane binaries
scripts/setup-quotas.sh >/dev/null         # btrfs-progs (loop-mounted btrfs tests) and the XFS/ext4 quota VM
scripts/setup-real-nodes.sh >/dev/null     # containerd, kubelet, kube-proxy and node images (tests/real_nodes.rs)
scripts/setup-monitoring.sh >/dev/null     # promtool (tests/monitoring.rs)
scripts/build-image.sh >/dev/null          # the hostvol image tests/real_nodes.rs installs from deploy/

cargo build --all-targets
# Each e2e test runs its own control plane: two at a time fits 2 cores.
# --no-fail-fast: run every test binary and report all failures (the exit status still fails).
# Benchmarks are built above but not run here: they print figures (`cargo bench`), they are not tests.
cargo test --no-fail-fast --lib --bins --tests --examples -- --test-threads=2
# Doc tests (--all-targets does not include them); only a library has any.
if [[ -f src/lib.rs ]]; then
  cargo test --doc
fi
