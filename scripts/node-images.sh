#!/usr/bin/env bash
# Makes the images real nodes run, as OCI archives in OUT_DIR (called by setup-real-nodes.sh):
#   pause.oci.tar        k8s.gcr.io/pause:3.2, the default sandbox image of kubelet 1.20 and containerd,
#                        built from the Kubernetes tree's pause.c
#   busybox.oci.tar      docker.io/library/busybox:1.35 (sh, httpd, wget, ...) from Debian's busybox-static
#   nginx-*.oci.tar      docker.io/library/nginx:latest and :1.27, a stand-in for nginx so manifests say
#                        `image: nginx` unchanged: busybox httpd serving /usr/share/nginx/html on :80, and
#                        /bin/bash (a shim to sh) because the walkthrough execs it
# usage: node-images.sh OUT_DIR KUBERNETES_TREE
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT=${1:?OUT_DIR}
TREE=${2:?KUBERNETES_TREE}
mkdir -p "$OUT"
work=$(mktemp -d "$OUT.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
image() { python3 "$HERE/oci-image.py" "$@"; }

mkdir -p "$work/pause"
gcc -Os -Wall -Werror -static -DVERSION=v3.2-hostvol -o "$work/pause/pause" "$TREE/build/pause/linux/pause.c"
strip "$work/pause/pause"
image "$work/pause" k8s.gcr.io/pause:3.2 "$work/pause.oci.tar" --entrypoint '["/pause"]'

busybox_rootfs() {
  local root=$1
  mkdir -p "$root/bin" "$root/etc" "$root/root" "$root/tmp"
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' >"$root/etc/group"
}
busybox_rootfs "$work/busybox"
image "$work/busybox" docker.io/library/busybox:1.35 "$work/busybox.oci.tar" --env PATH=/bin --cmd '["sh"]'

busybox_rootfs "$work/nginx"
mkdir -p "$work/nginx/usr/share/nginx/html"
echo 'nginx stand-in (busybox httpd)' >"$work/nginx/usr/share/nginx/html/index.html"
# busybox has no bash applet; scripts written for bash -c one-liners run fine under sh
printf '#!/bin/sh\nexec /bin/sh "$@"\n' >"$work/nginx/bin/bash"
chmod 0755 "$work/nginx/bin/bash"
# Like nginx, stop at once on SIGTERM (httpd as PID 1 would ignore it and hold every pod deletion for the
# whole grace period).
mkdir -p "$work/nginx/usr/sbin"
printf '#!/bin/sh\ntrap "exit 0" TERM INT QUIT\nhttpd -f -p 80 -h /usr/share/nginx/html &\nwait\n' \
  >"$work/nginx/usr/sbin/nginx"
chmod 0755 "$work/nginx/usr/sbin/nginx"
for tag in latest 1.27; do
  image "$work/nginx" "docker.io/library/nginx:$tag" "$work/nginx-$tag.oci.tar" --port 80/tcp \
    --env PATH=/usr/sbin:/bin --cmd '["nginx"]'
done

mv "$work"/*.oci.tar "$OUT"/
