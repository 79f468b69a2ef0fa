# syntax=docker/dockerfile:1
# Multi-stage build of the hostvol agent image.
#   docker build -t ghcr.io/hostvol/hostvol:latest .

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Build, then copy the binary out of the cached target dir; add the kubectl plugin name as a
# symlink here because the distroless runtime image has no shell.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin hostvol \
 && mkdir -p /out \
 && cp target/release/hostvol /out/hostvol \
 && ln -s hostvol /out/kubectl-hostvol

# Not the :nonroot variant: the agent runs as root (with a reduced capability set, see
# deploy/daemonset.yaml) so it can chown volume directories to arbitrary uid/gid.
FROM gcr.io/distroless/cc-debian12
LABEL org.opencontainers.image.title="hostvol" \
      org.opencontainers.image.description="Node-local hostPath storage provisioner for Kubernetes"
# Copies the binary and the kubectl-hostvol -> hostvol symlink (symlinks inside a copied
# directory are preserved).
COPY --from=builder /out/ /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/hostvol"]
CMD ["agent"]
