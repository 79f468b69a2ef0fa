#!/usr/bin/env bash
# Runs the hostvol demo (examples/demo.rs) on a throwaway cluster of two real nodes (kubelet +
# containerd each, in a network namespace of their own): hostvol installed from deploy/ with its
# image, the example StatefulSet, a page written with `kubectl exec` and read back over HTTP before and
# after its pod is deleted, then `kubectl hostvol`. ~2 minutes once built; the first run also builds
# the control plane, kubelet and images (~10 minutes, cached). Installs what it needs, idempotently.
# Run as root on Debian bookworm (apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/ensure-tools.sh            # cargo, kubectl, a C linker
scripts/setup-real-nodes.sh >/dev/null    # control plane, containerd, kubelet, node images
scripts/build-image.sh >/dev/null         # the hostvol image the DaemonSet runs

cargo build --bin hostvol --example demo
exec cargo run --quiet --example demo
