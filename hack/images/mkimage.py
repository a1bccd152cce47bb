#!/usr/bin/env python3
"""Write a one-layer container image as a tar, with no base image, no docker
daemon and no registry.

The tar is both an OCI image layout (oci-layout, index.json, blobs/sha256/...)
and a `docker save` archive (manifest.json with RepoTags), so
`ctr -n k8s.io images import` and `docker load` both take it. The layer is
reproducible: same inputs, same digests (sorted entries, mtime 0, uid/gid 0
unless a file says otherwise).

  mkimage.py --name keelson.dev/keelson:dev --out target/images/keelson.tar \
      --file target/release/keelson=/usr/local/bin/keelson --ldd \
      --nonroot --entrypoint /usr/local/bin/keelson

--file SRC=DST[=MODE]  put SRC (symlinks followed) at DST in the image
--ldd                  also add the shared libraries that `ldd` names for each
                       --file that is a dynamic ELF binary, at the paths it names
--nonroot              add /etc/passwd and /etc/group with root and nonroot
                       (uid/gid 65532, home /home/nonroot), /tmp (1777), and run
                       as 65532:65532
--dir PATH[=MODE[=UID]] an (empty) directory, e.g. a workspace owned by 65532
--entrypoint, --cmd    JSON list or a plain single word
--env K=V              repeatable
"""

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile

NONROOT = 65532
PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"
)
GROUP = f"root:x:0:\nnonroot:x:{NONROOT}:\n"


def die(msg):
    print(f"[image] ERROR: {msg}", file=sys.stderr)
    sys.exit(1)


def ldd_paths(binary):
    """Absolute library paths that ldd names for BINARY ([] for a static one)."""
    with open(binary, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return []
    p = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if p.returncode != 0:
        if "not a dynamic executable" in p.stdout + p.stderr:
            return []
        die(f"ldd {binary}: {p.stderr.strip()}")
    out = []
    for line in p.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            die(f"ldd {binary}: {line}")
        if "=>" in line:
            path = line.split("=>", 1)[1].strip().split(" ", 1)[0]
        else:
            path = line.split(" ", 1)[0]
        if path.startswith("/"):
            out.append(path)
    return out


def as_list(v):
    if v is None:
        return None
    v = v.strip()
    if v.startswith("["):
        return json.loads(v)
    return [v]


class Layer:
    def __init__(self):
        self.files = {}  # dst -> (bytes-or-src-path, mode, uid, gid)
        self.dirs = {}  # dst -> (mode, uid, gid)

    def add_dir(self, path, mode=0o755, uid=0, gid=0):
        path = "/" + path.strip("/")
        if path == "/":
            return
        parent = os.path.dirname(path)
        if parent != "/" and parent not in self.dirs:
            self.add_dir(parent)
        self.dirs[path] = (mode, uid, gid)

    def add(self, dst, data=None, src=None, mode=0o644, uid=0, gid=0):
        dst = "/" + dst.strip("/")
        self.add_dir(os.path.dirname(dst))
        self.files[dst] = (data if data is not None else src, mode, uid, gid)

    def write(self, fileobj):
        entries = [(p, None) for p in self.dirs] + [(p, f) for p, f in self.files.items()]
        with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as t:
            for path, f in sorted(entries, key=lambda e: e[0]):
                ti = tarfile.TarInfo(path.lstrip("/"))
                ti.mtime = 0
                ti.uname = ti.gname = ""
                if f is None:
                    ti.type = tarfile.DIRTYPE
                    ti.mode, ti.uid, ti.gid = self.dirs[path]
                    t.addfile(ti)
                    continue
                content, ti.mode, ti.uid, ti.gid = f
                if isinstance(content, bytes):
                    ti.size = len(content)
                    t.addfile(ti, io.BytesIO(content))
                else:
                    ti.size = os.path.getsize(content)
                    with open(content, "rb") as fh:
                        t.addfile(ti, fh)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="image reference, e.g. keelson.dev/keelson:dev")
    ap.add_argument("--out", required=True)
    ap.add_argument("--file", action="append", default=[])
    ap.add_argument("--dir", action="append", default=[])
    ap.add_argument("--ldd", action="store_true")
    ap.add_argument("--nonroot", action="store_true")
    ap.add_argument("--entrypoint")
    ap.add_argument("--cmd")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--workdir", default="/")
    ap.add_argument("--port", action="append", default=[], help="exposed port, e.g. 8080/tcp")
    a = ap.parse_args()

    layer = Layer()
    binaries = []
    for spec in a.file:
        parts = spec.split("=")
        if len(parts) not in (2, 3):
            die(f"--file {spec}: want SRC=DST[=MODE]")
        src, dst = parts[0], parts[1]
        if not os.path.isfile(src):
            die(f"--file {spec}: {src} is not a file")
        mode = int(parts[2], 8) if len(parts) == 3 else (0o755 if os.access(src, os.X_OK) else 0o644)
        layer.add(dst, src=os.path.realpath(src), mode=mode)
        if mode & 0o111:
            binaries.append(src)
    if a.ldd:
        for b in binaries:
            for lib in ldd_paths(b):
                if lib not in layer.files:
                    layer.add(lib, src=os.path.realpath(lib), mode=0o755)
    user = ""
    if a.nonroot:
        layer.add("/etc/passwd", data=PASSWD.encode())
        layer.add("/etc/group", data=GROUP.encode())
        layer.add_dir("/home/nonroot", 0o755, NONROOT, NONROOT)
        layer.add_dir("/tmp", 0o1777)
        user = f"{NONROOT}:{NONROOT}"

    for spec in a.dir:
        parts = spec.split("=")
        mode = int(parts[1], 8) if len(parts) > 1 else 0o755
        owner = int(parts[2]) if len(parts) > 2 else 0
        layer.add_dir(parts[0], mode, owner, owner)

    env = ["PATH=/usr/local/bin:/usr/bin:/bin"] + a.env
    ports = {p if "/" in p else p + "/tcp": {} for p in a.port}

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(a.out))) as tmp:
        layer_path = os.path.join(tmp, "layer.tar")
        with open(layer_path, "wb") as f:
            layer.write(f)
        layer_digest = sha256_file(layer_path)
        layer_size = os.path.getsize(layer_path)

        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Env": env,
                "WorkingDir": a.workdir,
                **({"User": user} if user else {}),
                **({"Entrypoint": as_list(a.entrypoint)} if a.entrypoint else {}),
                **({"Cmd": as_list(a.cmd)} if a.cmd else {}),
                **({"ExposedPorts": ports} if ports else {}),
                "Labels": {"org.opencontainers.image.source": "keelson hack/images/mkimage.py"},
            },
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "hack/images/mkimage.py"}],
        }
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_digest = hashlib.sha256(config_bytes).hexdigest()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": f"sha256:{config_digest}",
                "size": len(config_bytes),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": f"sha256:{layer_digest}",
                    "size": layer_size,
                }
            ],
        }
        manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
        tag = a.name.rsplit(":", 1)[1] if ":" in a.name.rsplit("/", 1)[-1] else "latest"
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": f"sha256:{manifest_digest}",
                    "size": len(manifest_bytes),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": a.name,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
        docker_manifest = [
            {
                "Config": f"blobs/sha256/{config_digest}",
                "RepoTags": [a.name],
                "Layers": [f"blobs/sha256/{layer_digest}"],
            }
        ]

        def meta(t, name, data, mode=0o644):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 0
            t.addfile(ti, io.BytesIO(data))

        tmp_out = a.out + ".tmp"
        with tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as t:
            for d in ("blobs", "blobs/sha256"):
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
                t.addfile(ti)
            ti = tarfile.TarInfo(f"blobs/sha256/{layer_digest}")
            ti.size, ti.mode, ti.mtime = layer_size, 0o644, 0
            with open(layer_path, "rb") as f:
                t.addfile(ti, f)
            meta(t, f"blobs/sha256/{config_digest}", config_bytes)
            meta(t, f"blobs/sha256/{manifest_digest}", manifest_bytes)
            meta(t, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            meta(t, "index.json", json.dumps(index, sort_keys=True).encode())
            meta(t, "manifest.json", json.dumps(docker_manifest).encode())
        os.replace(tmp_out, a.out)
    n = len(layer.files)
    print(f"[image] {a.name} -> {a.out} ({n} files, layer {layer_size // 1024} KiB, sha256:{manifest_digest[:12]})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
