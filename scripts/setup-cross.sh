#!/usr/bin/env bash
# Cross toolchains for linux/arm64 and linux/arm/v7 (issue 17), from Debian: rustc-web (bookworm-security)
# with its standard libraries for arm64 and armhf as multiarch packages, the cross C toolchains and
# qemu-user-static (cargo's runner for tests). rustup's toolchain has no other targets and none can be
# fetched here, so cross builds use RUSTC=/usr/bin/rustc (see scripts/cross-env.sh). Idempotent.
set -euo pipefail

log() { echo "setup-cross: $*" >&2; }

packages=(rustc-web cargo-web libstd-rust-web-dev:arm64 libstd-rust-web-dev:armhf
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
  libc6:arm64 libc6:armhf libgcc-s1:arm64 libgcc-s1:armhf qemu-user-static)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  log "cross toolchains already installed ($(/usr/bin/rustc --version))"
  exit 0
fi
for arch in arm64 armhf; do
  dpkg --print-foreign-architectures | grep -qx "$arch" || { log "adding architecture $arch"; dpkg --add-architecture "$arch"; }
done
log "installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
log "installed: $(/usr/bin/rustc --version)"
