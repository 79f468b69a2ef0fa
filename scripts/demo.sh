#!/usr/bin/env bash
# Runs the hostvol demo (examples/demo.rs): a local Kubernetes 1.20.2 control plane with two nodes and
# their hostvol agents, the example StatefulSet, and a tour of what hostvol provisioned. ~1 minute
# (plus a one-time ~5 minute build of the control-plane binaries and the first cargo build).
# Installs what it needs, idempotently. Run as root on Debian bookworm (apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/ensure-tools.sh  # cargo, kubectl, a C linker
scripts/setup-control-plane.sh >/dev/null  # etcd + Kubernetes 1.20.2 control-plane binaries

cargo build --bin hostvol --example demo
exec cargo run --quiet --example demo
