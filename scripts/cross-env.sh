# Sourced by scripts that build or test hostvol for linux/arm64 and linux/arm/v7 (issue 17), after
# scripts/setup-cross.sh: Debian's rustc (rustup's has no other targets), the cross linkers, and
# qemu-user as cargo's runner, so `cargo test --target ...` runs the test binaries emulated.
# Loader and libc come from the multiarch libc6:arm64/armhf, so qemu runs without -L (with -L
# /usr/aarch64-linux-gnu every thread start hangs: the cross loader meets the multiarch libc).
export RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUNNER=qemu-arm-static
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
# Outside the repository, keyed by the toolchain: a fresh clone reuses it, another rustc starts anew.
CROSS_RUSTC_VERSION=$(/usr/bin/rustc --version | awk '{print $2}')
export CARGO_TARGET_DIR="${HOSTVOL_CROSS_TARGET_DIR:-$HOME/.cache/hostvol/cross-target-$CROSS_RUSTC_VERSION}"
