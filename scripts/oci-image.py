#!/usr/bin/env python3
"""Writes a one-layer OCI image archive from a root filesystem directory: no Docker, no registry.

The archive is an OCI image layout in a tar (`oci-layout`, `index.json`, `blobs/sha256/...`): one gzip
layer, the image config and the manifest, each stored under its sha256. The index names the image with
`io.containerd.image.name` (what `ctr images import` uses as the image name) and
`org.opencontainers.image.ref.name` (the tag; what `skopeo copy oci-archive:...` reads).

The output depends only on the files' contents, modes and links (owners root, times zero), so building
twice gives the same digests.

  oci-image.py ROOTFS NAME OUT.tar [--entrypoint JSON] [--cmd JSON] [--env K=V]... [--port 80/tcp]...
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(rootfs: str) -> bytes:
    """The root filesystem as an uncompressed tar, entries sorted, owned by root, mtime 0."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for top, dirs, files in os.walk(rootfs):
            dirs.sort()
            for name in dirs + sorted(files):
                path = os.path.join(top, name)
                info = tar.gettarinfo(path, arcname=os.path.relpath(path, rootfs))
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return out.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rootfs")
    p.add_argument("name", help="full reference, e.g. docker.io/library/nginx:latest")
    p.add_argument("out")
    p.add_argument("--entrypoint", type=json.loads)
    p.add_argument("--cmd", type=json.loads)
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--port", action="append", default=[])
    a = p.parse_args()

    last = a.name.rsplit("/", 1)[-1]
    if ":" not in last:
        sys.exit(f"{a.name}: give the tag (name:tag)")
    tag = last.rsplit(":", 1)[1]

    tar_bytes = layer(a.rootfs)
    gz_bytes = gzip.compress(tar_bytes, mtime=0)
    config = {"Env": a.env or [DEFAULT_PATH], "WorkingDir": "/"}
    if a.entrypoint:
        config["Entrypoint"] = a.entrypoint
    if a.cmd:
        config["Cmd"] = a.cmd
    if a.port:
        config["ExposedPorts"] = {port: {} for port in a.port}
    image_config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [digest(tar_bytes)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "scripts/oci-image.py"}],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(image_config), "size": len(image_config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(gz_bytes), "size": len(gz_bytes)}],
    }, sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(manifest), "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": a.name, "org.opencontainers.image.ref.name": tag},
        }],
    }, sort_keys=True).encode()

    tmp = a.out + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        add_file(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_file(tar, "index.json", index)
        for blob in (image_config, manifest, gz_bytes):
            add_file(tar, "blobs/sha256/" + digest(blob)[len("sha256:"):], blob)
    os.replace(tmp, a.out)  # never leave a half-written archive under the final name
    print(f"{a.out}: {a.name} {digest(manifest)} ({len(gz_bytes)} bytes compressed)", file=sys.stderr)


if __name__ == "__main__":
    main()
