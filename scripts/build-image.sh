#!/usr/bin/env bash
# Builds the hostvol agent image with no Docker and no registry:
#
#   scripts/build-image.sh [TAG]      # TAG defaults to the version in Cargo.toml
#
# -> target/image/hostvol-TAG.oci.tar, an OCI image archive named ghcr.io/hostvol/hostvol:TAG (last line
# of the output). The same image as the Dockerfile's: the release binary at /usr/local/bin/hostvol with
# kubectl-hostvol linked to it, entrypoint hostvol, command `agent`, on a distroless-like base made here
# (the shared libraries `ldd` lists, the CA bundle, /etc/passwd with root and nonroot).
#
# Loading it (checked on containerd 1.6 here; Docker, kind and minikube are not on these machines):
#   ctr -n k8s.io images import target/image/hostvol-TAG.oci.tar
#       verified (tests/real_nodes.rs does it on every node), also with --all-platforms --digests
#   kind load image-archive target/image/hostvol-TAG.oci.tar
#       kind pipes the archive to `ctr --namespace=k8s.io images import` on each node (newer releases
#       add --all-platforms --digests --snapshotter); not run here
#   minikube image load target/image/hostvol-TAG.oci.tar
#       not run here; with the containerd runtime it imports as ctr does
#   docker load -i target/image/hostvol-TAG.oci.tar
#       Docker 25 and later load OCI archives; older ones need a docker-archive, which
#       `skopeo copy oci-archive:target/image/hostvol-TAG.oci.tar docker-archive:hostvol.tar:ghcr.io/hostvol/hostvol:TAG`
#       makes (checked: the archive is written with that tag; not loaded into a Docker here)
# The DaemonSet pulls ghcr.io/hostvol/hostvol with IfNotPresent, so an imported image is used as is.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -1)
TAG=${1:-$version}
NAME="ghcr.io/hostvol/hostvol:$TAG"
OUT="target/image/hostvol-$TAG.oci.tar"

log() { echo "build-image: $*" >&2; }

log "cargo build --release --no-default-features --bin hostvol"
cargo build --release --locked --no-default-features --bin hostvol >&2
BIN=target/release/hostvol

root=$(mktemp -d target/image-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
chmod 1777 "$root/tmp"
install -m 0755 "$BIN" "$root/usr/local/bin/hostvol"
ln -s hostvol "$root/usr/local/bin/kubectl-hostvol"
# The dynamic loader and every library, at the paths the binary asks for.
for lib in $(ldd "$BIN" | grep -oE '/[^ ]+'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
  >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"

mkdir -p target/image
python3 scripts/oci-image.py "$root" "$NAME" "$OUT" \
  --entrypoint '["/usr/local/bin/hostvol"]' --cmd '["agent"]' \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --port 9808/tcp --port 9809/tcp
echo "$OUT"
