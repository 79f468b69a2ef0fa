# Where the real-node parts live; sourced by setup-real-nodes.sh and real-cluster.sh so both agree.
#   K8S_BIN     kube-apiserver, kube-controller-manager, kube-scheduler (setup-control-plane.sh),
#               kubelet, kube-proxy (setup-real-nodes.sh): one cache per Kubernetes version
#   IMAGES_DIR  pause, busybox and nginx OCI archives; keyed by what goes into them (the image writer,
#               the busybox package, the Kubernetes version), so a change makes a new directory
# shellcheck shell=bash
K8S_VERSION="1.20.2"
CACHE_ROOT="${HOSTVOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hostvol}"
K8S_BIN="$CACHE_ROOT/kubernetes-$K8S_VERSION/bin"
K8S_TREE="$CACHE_ROOT/build/kubernetes-$K8S_VERSION"
REPO_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
images_key() {
  {
    echo "$K8S_VERSION"
    dpkg-query -W -f '${Version}\n' busybox-static 2>/dev/null || echo none
    cat "$REPO_SCRIPTS/oci-image.py" "$REPO_SCRIPTS/node-images.sh"
  } | sha256sum | cut -c1-12
}
# (a function: the key names the busybox package, which setup-real-nodes.sh may install after sourcing this)
images_dir() { echo "$CACHE_ROOT/images-$K8S_VERSION-$(images_key)"; }
NODE_IMAGES=(pause busybox nginx-latest nginx-1.27)
SETUP_REAL_NODES="scripts/setup-real-nodes.sh"
