#!/usr/bin/env bash
# Installs what the end-to-end tests and the demo need, idempotently:
#   - etcd, Go, rsync, jq from Debian;
#   - kube-apiserver, kube-controller-manager, kube-scheduler v1.20.2 built from Debian's
#     `kubernetes` source package into a cache outside the repository (skipped when present).
# Prints the directory holding the binaries on its last line.
set -euo pipefail

K8S_VERSION="1.20.2"
CACHE_ROOT="${HOSTVOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hostvol}"
BIN_DIR="$CACHE_ROOT/kubernetes-$K8S_VERSION/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

log() { echo "setup-control-plane: $*" >&2; }

need_apt=()
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v go >/dev/null || need_apt+=(golang-go)
command -v rsync >/dev/null || need_apt+=(rsync)
command -v jq >/dev/null || need_apt+=(jq)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v make >/dev/null || need_apt+=(make)
command -v python3 >/dev/null || need_apt+=(python3)

have_all_binaries() {
  for b in "${BINARIES[@]}"; do [[ -x "$BIN_DIR/$b" ]] || return 1; done
}

if ((${#need_apt[@]})); then
  log "installing ${need_apt[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# etcd-server's package starts a system etcd on :2379; the tests run their own on free ports.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi

if have_all_binaries; then
  log "control-plane binaries already in $BIN_DIR"
  echo "$BIN_DIR"
  exit 0
fi

if ! grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list.d/ /etc/apt/sources.list 2>/dev/null; then
  log "enabling Debian source packages"
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    # deb822 format (Debian's images)
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      >/etc/apt/sources.list.d/hostvol-deb-src.sources
  else
    # one-line format (the bookworm installer, debootstrap)
    (shopt -s nullglob; grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list) \
      | sed 's/^deb /deb-src /' >/etc/apt/sources.list.d/hostvol-deb-src.list
  fi
  apt-get update -qq
fi

WORK="$CACHE_ROOT/build"
mkdir -p "$WORK"
cd "$WORK"
if ! ls kubernetes_*.orig.tar.gz >/dev/null 2>&1; then
  log "downloading Debian's kubernetes source package"
  apt-get source --download-only kubernetes >/dev/null
fi
TREE="$WORK/kubernetes-$K8S_VERSION"
if [[ ! -d "$TREE/vendor" ]]; then
  rm -rf "$TREE" "$WORK/unpack"
  mkdir -p "$WORK/unpack"
  tar -xzf kubernetes_*.orig.tar.gz -C "$WORK/unpack"
  mv "$WORK/unpack"/* "$TREE"
  rmdir "$WORK/unpack"
fi

# reflect2 v1.0.1 declares runtime.mapiterinit with its pre-Go-1.18 signature; with Go 1.19 the
# apiserver then faults at random under load. Apply upstream's v1.0.2 fix to the vendored copy.
R2="$TREE/vendor/github.com/modern-go/reflect2"
if ! grep -q 'checkBucket' "$R2/unsafe_link.go"; then
  log "patching vendored reflect2 for Go >= 1.18"
  python3 - "$R2" <<'PY'
import re, sys, pathlib
d = pathlib.Path(sys.argv[1])
link = d / "unsafe_link.go"
s = link.read_text()
s = re.sub(r"func mapiterinit\(rtype unsafe\.Pointer, m unsafe\.Pointer\) \*hiter",
           "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)", s)
s = re.sub(r"type hiter struct \{.*?\n\}",
"""type hiter struct {
	key         unsafe.Pointer
	value       unsafe.Pointer
	t           unsafe.Pointer
	h           unsafe.Pointer
	buckets     unsafe.Pointer
	bptr        unsafe.Pointer
	overflow    *[]unsafe.Pointer
	oldoverflow *[]unsafe.Pointer
	startBucket uintptr
	offset      uint8
	wrapped     bool
	B           uint8
	i           uint8
	bucket      uintptr
	checkBucket uintptr
}""", s, flags=re.S)
link.write_text(s)
m = d / "unsafe_map.go"
s = m.read_text()
s2 = re.sub(r"return &UnsafeMapIterator\{\s*hiter:\s*mapiterinit\(type2\.rtype, \*\(\*unsafe\.Pointer\)\(obj\)\),",
            "var it hiter\n\tmapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)\n\treturn &UnsafeMapIterator{\n\t\thiter:      &it,", s)
if s2 == s:
    sys.exit("reflect2 patch did not apply to unsafe_map.go")
m.write_text(s2)
PY
  grep -q 'checkBucket' "$R2/unsafe_link.go" || { log "reflect2 patch did not apply"; exit 1; }
fi

log "building ${BINARIES[*]} (about 5 minutes on 2 cores)"
export HOME_FOR_GO="$WORK/home"
mkdir -p "$HOME_FOR_GO" "$WORK/gopath" "$WORK/gocache"
(
  cd "$TREE"
  HOME="$HOME_FOR_GO" GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache" CGO_ENABLED=0 GOFLAGS=-mod=vendor \
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >"$WORK/make.log" 2>&1
) || { tail -40 "$WORK/make.log" >&2; log "build failed; full log in $WORK/make.log"; exit 1; }

mkdir -p "$BIN_DIR"
for b in "${BINARIES[@]}"; do
  install -m 0755 "$TREE/_output/local/bin/linux/amd64/$b" "$BIN_DIR/$b"
done
log "installed into $BIN_DIR"
echo "$BIN_DIR"
