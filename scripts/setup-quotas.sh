#!/usr/bin/env bash
# What the quota tests need, idempotently, as root on Debian: btrfs-progs (mkfs.btrfs and `btrfs quota
# enable` for the loop-mounted btrfs tests; the agent itself uses ioctls, not these tools) and the
# QEMU VM in which the XFS and ext4 project-quota tests run (scripts/setup-quota-vm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mkfs.btrfs >/dev/null || ! command -v losetup >/dev/null; then
  echo "setup-quotas: installing btrfs-progs and mount from Debian" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq btrfs-progs mount >/dev/null
fi
scripts/setup-quota-vm.sh
