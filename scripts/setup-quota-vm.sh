#!/usr/bin/env bash
# Prepares what `cargo test --test quota_vm` needs to boot a small QEMU (TCG) VM in which the XFS and
# ext4 project-quota code runs against real filesystems (the host kernel may lack XFS_QUOTA/QFMT_V2).
# Idempotent; run as root. A second run with a complete cache does no network access.
#
#   - Host tools from Debian (installed when missing): qemu-system-x86 (qemu-system-x86_64),
#     busybox-static, xfsprogs and e2fsprogs (the test runs mkfs on the host), kmod (depmod/modprobe
#     here, to order the modules), binutils (objcopy, to strip the test binary), xz-utils and zstd
#     (compressed modules, if a kernel ships them).
#   - Debian's stock kernel (the linux-image-6.1.0-<n>-amd64 that `linux-image-amd64` names), with only
#     the modules the VM needs, in a cache keyed by kernel version:
#
#       ${HOSTVOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hostvol}/quota-vm/
#         current                  one line: the kernel version the test boots (e.g. 6.1.0-57-amd64)
#         <kernel-version>/
#           vmlinuz                the kernel as Debian ships it (bzImage)
#           vmlinux                the same, uncompressed ELF with a PVH entry: QEMU boots it
#                                  directly, which saves the ~6 s the xz decompressor takes on TCG
#                                  (absent if the kernel has no PVH entry; the test then uses vmlinuz)
#           modules/*.ko           uncompressed modules without their signatures (checking those
#                                  costs seconds on TCG; the kernel only logs a taint), flat
#           modules.load           their insmod order, one file name a line
#           busybox                busybox-static (the VM's /init shell and tools)
#           package                Debian package name and version the kernel came from
#           complete               stamp, written last: the layout version (LAYOUT below)
#
# Options: --refresh  re-resolve the newest kernel from Debian even when one is cached.
# Prints the cache directory of the kernel in use on its last line.
set -euo pipefail

CACHE_ROOT="${HOSTVOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hostvol}/quota-vm"
# Modules the VM loads explicitly (it has no modprobe, so the kernel cannot load them on demand):
# crc32c for XFS v5 and ext4 metadata checksums, the filesystems, the quota format ext4's hidden quota
# files use, virtio disks and the 9p share the results come back through. Their dependencies are added.
WANTED_MODULES=(crc32c_generic crc32c_intel xfs ext4 quota_v2 virtio_pci virtio_blk 9pnet_virtio 9p)

# Bumped when the cache's layout changes; an older cache is rebuilt.
LAYOUT=2

log() { echo "setup-quota-vm: $*" >&2; }

cached() { [[ "$(cat "$CACHE_ROOT/$1/complete" 2>/dev/null)" == "$LAYOUT" ]]; }

refresh=0
for arg in "$@"; do
  case "$arg" in
    --refresh) refresh=1 ;;
    *) echo "usage: $0 [--refresh]" >&2; exit 2 ;;
  esac
done

if [[ $(id -u) -ne 0 ]]; then
  log "run as root (installs Debian packages)"
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update() {
  if ((apt_updated == 0)); then
    log "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
}

# --- host packages -------------------------------------------------------------------------------
need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
[[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" == *'ok installed'* ]] || need_apt+=(busybox-static)
command -v mkfs.xfs >/dev/null || need_apt+=(xfsprogs)
command -v mkfs.ext4 >/dev/null || need_apt+=(e2fsprogs)
command -v depmod >/dev/null && command -v modprobe >/dev/null || need_apt+=(kmod)
command -v objcopy >/dev/null || need_apt+=(binutils)
command -v xz >/dev/null || need_apt+=(xz-utils)
command -v zstd >/dev/null || need_apt+=(zstd)
if ((${#need_apt[@]})); then
  log "installing ${need_apt[*]} from Debian"
  if ! apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null; then
    apt_update
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  fi
fi

# --- kernel --------------------------------------------------------------------------------------
mkdir -p "$CACHE_ROOT"
if ((refresh == 0)) && [[ -f "$CACHE_ROOT/current" ]]; then
  kver="$(<"$CACHE_ROOT/current")"
  if cached "$kver"; then
    log "kernel $kver already cached"
    echo "$CACHE_ROOT/$kver"
    exit 0
  fi
fi

# The metapackage names the current ABI, e.g. linux-image-6.1.0-57-amd64. Update the lists first:
# old lists may name a package the mirror no longer has.
apt_update
pkg="$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)"
if [[ -z "$pkg" ]]; then
  log "cannot tell which kernel linux-image-amd64 depends on"
  exit 1
fi
kver="${pkg#linux-image-}"
if cached "$kver"; then
  log "kernel $kver already cached"
  echo "$kver" >"$CACHE_ROOT/current"
  echo "$CACHE_ROOT/$kver"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" # apt-get download runs as _apt where it can
log "downloading $pkg"
(cd "$work" && apt-get download -qq "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
deb="$(ls "$work"/"$pkg"_*.deb 2>/dev/null | head -n1 || true)"
if [[ -z "$deb" ]]; then
  log "apt-get download $pkg failed"
  exit 1
fi
pkg_version="$(dpkg-deb -f "$deb" Version)"
dpkg-deb -x "$deb" "$work/root"

moddir="$work/root/lib/modules/$kver"
[[ -d "$moddir" ]] || moddir="$work/root/usr/lib/modules/$kver"
vmlinuz="$work/root/boot/vmlinuz-$kver"
if [[ ! -f "$vmlinuz" || ! -d "$moddir" ]]; then
  log "unexpected layout in $deb (no boot/vmlinuz-$kver or lib/modules/$kver)"
  exit 1
fi
# Debian ships no modules.dep: build one, then let modprobe tell the insmod order.
base="$(dirname "$(dirname "$(dirname "$moddir")")")"
[[ "$moddir" == */usr/lib/modules/* ]] && base="$(dirname "$base")"
depmod -b "$base" "$kver"

stage="$CACHE_ROOT/.stage-$kver-$$"
rm -rf "$stage"
mkdir -p "$stage/modules"
declare -A seen=()
order=()
for m in "${WANTED_MODULES[@]}"; do
  deps="$(modprobe -d "$base" -S "$kver" --show-depends "$m")" || {
    log "module $m not found in $kver"
    exit 1
  }
  while read -r kind path _; do
    [[ "$kind" == insmod ]] || continue # "builtin NAME" needs nothing
    [[ -n "${seen[$path]:-}" ]] && continue
    seen[$path]=1
    name="$(basename "$path")"
    case "$name" in
      *.ko.xz) xz -dc "$path" >"$work/module.ko"; name="${name%.xz}" ;;
      *.ko.zst) zstd -qdc "$path" >"$work/module.ko"; name="${name%.zst}" ;;
      *.ko.gz) gzip -dc "$path" >"$work/module.ko"; name="${name%.gz}" ;;
      *) cp "$path" "$work/module.ko" ;;
    esac
    # Rewriting the ELF drops the signature appended after it.
    objcopy "$work/module.ko" "$stage/modules/$name"
    order+=("$name")
  done <<<"$deps"
done
printf '%s\n' "${order[@]}" >"$stage/modules.load"
cp "$vmlinuz" "$stage/vmlinuz"

# The uncompressed kernel: find the compressed payload in the bzImage, keep it if it is an ELF
# with a PVH entry note (Xen note type 18, XEN_ELFNOTE_PHYS32_ENTRY).
extract_vmlinux() {
  local magic cmd pos
  for spec in '\xfd7zXZ\x00:xz -dc' '\x28\xb5\x2f\xfd:zstd -qdc' '\x1f\x8b\x08:gzip -dc'; do
    magic="${spec%%:*}"
    cmd="${spec#*:}"
    for pos in $(LC_ALL=C grep -obUaP "$magic" "$vmlinuz" | cut -d: -f1); do
      # Trailing data after the stream makes the decompressor complain: judge by the result.
      tail -c +$((pos + 1)) "$vmlinuz" | $cmd >"$work/vmlinux" 2>/dev/null || true
      if [[ "$(head -c 4 "$work/vmlinux" | od -An -c | tr -d ' ')" == '177ELF' ]] &&
        readelf -n "$work/vmlinux" 2>/dev/null | grep -E 'Unknown note type: \(0x00000012\)|PHYS32_ENTRY' >/dev/null; then
        mv "$work/vmlinux" "$stage/vmlinux"
        return 0
      fi
    done
  done
  return 1
}
extract_vmlinux || log "no uncompressed PVH kernel found in $vmlinuz: the VM boots the bzImage (slower)"
cp /bin/busybox "$stage/busybox"
echo "$pkg $pkg_version" >"$stage/package"
echo "$LAYOUT" >"$stage/complete"

rm -rf "${CACHE_ROOT:?}/$kver"
mv "$stage" "$CACHE_ROOT/$kver"
echo "$kver" >"$CACHE_ROOT/current"
log "cached $pkg $pkg_version ($(wc -l <"$CACHE_ROOT/$kver/modules.load") modules: $(tr '\n' ' ' <"$CACHE_ROOT/$kver/modules.load"))"
echo "$CACHE_ROOT/$kver"
