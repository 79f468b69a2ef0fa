#!/usr/bin/env bash
# Installs what real-node clusters (scripts/real-cluster.sh, tests/real_nodes.rs) need, idempotently:
#   - the control plane first (scripts/setup-control-plane.sh: Kubernetes 1.20.2 source tree, Go, etcd);
#   - containerd, runc, CNI plugins, iptables, conntrack, a registry server, skopeo, busybox-static, gcc
#     from Debian;
#   - kubelet and kube-proxy built from the same Kubernetes tree, next to the control-plane binaries
#     (~41 s in a tree that built the control plane, ~4.5 min cold);
#   - the node images as OCI archives, made without Docker or a registry (scripts/node-images.sh):
#     k8s.gcr.io/pause:3.2, a busybox test image and an `nginx` stand-in, in a cache directory keyed by
#     what goes into them.
# Prints the images directory on its last line.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=real-nodes-env.sh
source "$HERE/real-nodes-env.sh"

log() { echo "setup-real-nodes: $*" >&2; }

"$HERE/setup-control-plane.sh" >/dev/null

mkdir -p "$CACHE_ROOT"
# Two test runs may set up at once: one does the work, the other finds it done.
exec 9>"$CACHE_ROOT/setup-real-nodes.lock"
flock 9

packages=(containerd runc containernetworking-plugins iptables conntrack docker-registry skopeo
          busybox-static gcc libc6-dev curl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packages start host-wide services where systemd runs (containerd on /run/containerd, a registry
  # on :5000); every real-node cluster runs its own, inside its network namespace.
  if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    for s in containerd docker-registry; do
      systemctl disable --now "$s" >/dev/null 2>&1 || true
    done
  fi
fi

if [[ -x "$K8S_BIN/kubelet" && -x "$K8S_BIN/kube-proxy" ]]; then
  log "kubelet and kube-proxy already in $K8S_BIN"
else
  log "building kubelet and kube-proxy $K8S_VERSION (under a minute in a tree that built the control plane)"
  WORK="$CACHE_ROOT/build"
  # Same environment as setup-control-plane.sh, so Go reuses that build's cache.
  (
    cd "$K8S_TREE"
    HOME="$WORK/home" GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache" CGO_ENABLED=0 GOFLAGS=-mod=vendor \
      make WHAT="cmd/kubelet cmd/kube-proxy" >"$WORK/make-node.log" 2>&1
  ) || { tail -40 "$WORK/make-node.log" >&2; log "build failed; full log in $WORK/make-node.log"; exit 1; }
  for b in kubelet kube-proxy; do
    install -m 0755 "$K8S_TREE/_output/local/bin/linux/amd64/$b" "$K8S_BIN/$b"
  done
  log "installed kubelet and kube-proxy into $K8S_BIN"
fi

IMAGES_DIR=$(images_dir)
have_images() {
  for i in "${NODE_IMAGES[@]}"; do [[ -f "$IMAGES_DIR/$i.oci.tar" ]] || return 1; done
}
if have_images; then
  log "node images already in $IMAGES_DIR"
else
  log "making node images in $IMAGES_DIR"
  "$HERE/node-images.sh" "$IMAGES_DIR" "$K8S_TREE"
  # images of an older key: clusters import them only at start, and new ones start with the new key
  for old in "$CACHE_ROOT"/images-*; do
    [[ $old == "$IMAGES_DIR" || ! -d $old ]] || rm -rf "$old"
  done
fi
echo "$IMAGES_DIR"
