#!/bin/busybox sh
# /init of the project-quota test VM. tests/quota_vm.rs builds the initramfs around it (busybox,
# the test binary and its libraries, the modules in /modules with their order in /modules.load,
# and /quota-vm.conf) and attaches three disks made on the host:
#   /dev/vda  XFS
#   /dev/vdb  ext4 with the quota and project features
#   /dev/vdc  ext4 without them
# For each mode below it runs the test binary's inner test against the mounted filesystem; the
# inner test appends "PASS <mode>" to /results/result when all its checks passed, this script
# "EXIT <mode> <code>" per run and "DONE" at the end. Each run's output goes to
# /results/<mode>.log. QEMU exits 0 on success (poweroff), 3 on failure (isa-debug-exit).

/bin/busybox mkdir -p /bin /proc /sys /dev /tmp /results
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

# TEST_BIN, INNER_TEST, LD_LIBRARY_PATH
. /quota-vm.conf
export LD_LIBRARY_PATH

up() { cut -d' ' -f1 /proc/uptime; }

quit() {
  sync
  if [ "$1" = 0 ]; then
    poweroff -f
  else
    # isa-debug-exit: QEMU exits with (1 << 1) | 1 = 3.
    printf '\001' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    poweroff -f
  fi
}

for m in $(cat /modules.load); do
  insmod "/modules/$m" || { echo "init: insmod $m failed"; quit 1; }
done

mount -t 9p -o trans=virtio,version=9p2000.L results /results || { echo "init: no 9p share"; quit 1; }
echo "BOOTED $(uname -r)" >>/results/result
echo "init: [$(up)] modules loaded, share mounted"

status=0
step() {
  echo "init: [$(up)] $*"
  "$@" || { echo "init: FAILED: $*"; echo "STEPFAIL $*" >>/results/result; status=1; return 1; }
}

run() {
  mode="$1"
  dir="$2"
  echo "init: [$(up)] running $mode on $dir"
  HOSTVOL_IN_QUOTA_VM="$mode:$dir" HOSTVOL_QUOTA_VM_RESULT=/results/result RUST_BACKTRACE=1 \
    "$TEST_BIN" --exact "$INNER_TEST" --nocapture --test-threads=1 \
    >"/results/$mode.log" 2>&1
  rc=$?
  echo "init: [$(up)] $mode exited $rc"
  echo "EXIT $mode $rc" >>/results/result
  [ "$rc" = 0 ] || status=1
}

mkdir -p /mnt/xfs /mnt/ext4 /mnt/ext4-plain

# Quotas on: the full checks.
step mount -t xfs -o prjquota /dev/vda /mnt/xfs && run xfs /mnt/xfs
step mount -t ext4 -o prjquota /dev/vdb /mnt/ext4 && run ext4 /mnt/ext4

# Quotas off, or accounted only: the state and the admin's hint.
step umount /mnt/xfs && step mount -t xfs /dev/vda /mnt/xfs && run xfs-noquota /mnt/xfs
step umount /mnt/ext4 && step mount -t ext4 /dev/vdb /mnt/ext4 && run ext4-noprjquota /mnt/ext4
step mount -t ext4 /dev/vdc /mnt/ext4-plain && run ext4-plain /mnt/ext4-plain

umount /mnt/xfs /mnt/ext4 /mnt/ext4-plain 2>/dev/null
echo DONE >>/results/result
echo "init: [$(up)] done, status $status"
quit "$status"
