"""Builds the node's OCI image reproducibly, with no container engine (`make image`).

Stages, each a pure function of its inputs:
  1. Debian root filesystem: mmdebstrap of `bookworm` at a fixed SOURCE_DATE_EPOCH (a byte-identical tarball for
     the same archive state); it is layer 1 verbatim. Cached under the hash of its inputs, including the date of
     the archive's signed InRelease, so a Debian point release invalidates it.
  2. Wheels: the hash-pinned lock (docker/image/requirements-<flavor>.lock) is downloaded and every file checked; the
     sdist-only packages and the project itself are built into wheels inside a Debian builder root filesystem
     with pinned setuptools/wheel at fixed paths.
  3. Dependencies layer: a venv at /opt/dcml, filled by `pip install --no-index --require-hashes --no-deps
     --no-compile` run inside the root filesystem (chroot).
  4. Project layer: the project's wheel installed into that venv, and configs/node.toml as /etc/dcml/node.toml.
Layers are uncompressed tarballs written here: sorted entries, owner root, mtime SOURCE_DATE_EPOCH; nothing is
byte-compiled (pip --no-compile), so no timestamps or interpreter state leak in.
The OCI layout (index.json, manifest, config) is serialized canonically; the manifest's sha256 is the image
digest a compose pins. A build record beside it lists the Debian packages, every wheel hash and the source commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCE_DATE_EPOCH = 1700000000
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ["python3", "python3-venv", "libgmp10", "ca-certificates"]
BUILDER_PACKAGES = [*BASE_PACKAGES, "python3-dev", "gcc", "libc6-dev", "libgmp-dev"]
PIP = "/usr/share/python-wheels/pip-23.0.1-py3-none-any.whl/pip"  # Debian's python3-venv ships it
VENV = "/opt/dcml"
RECIPE = "1"  # bump when this file changes what a stage produces (it keys the caches)
NODE_UID = 10001
ENV_PATH = f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What differs per flavour: the image name, whether the project is installed, and how the image starts.
FLAVORS = {
    "cpu": {"image": "dcml-node-cpu", "project": True, "config": {
        "Env": [ENV_PATH, "LANG=C.UTF-8", "PYTHONDONTWRITEBYTECODE=1", "DCML_NODE__DATA_DIR=/var/lib/dcml"],
        "Entrypoint": [f"{VENV}/bin/dcml-node", "run", "--config", "/etc/dcml/node.toml"],
        "User": str(NODE_UID), "WorkingDir": "/var/lib/dcml", "ExposedPorts": {"8080/tcp": {}, "4001/tcp": {}},
    }},
    # The vLLM CPU sidecar (docker/templates/vllm.yml passes --model etc.); it shares the node's loopback.
    "vllm": {"image": "dcml-vllm-cpu", "project": False, "config": {
        "Env": [ENV_PATH, "LANG=C.UTF-8", "PYTHONDONTWRITEBYTECODE=1", "VLLM_NO_USAGE_STATS=1", "HF_HUB_OFFLINE=1"],
        "Entrypoint": [f"{VENV}/bin/python3", "-m", "vllm.entrypoints.openai.api_server"],
        "User": str(NODE_UID), "WorkingDir": "/tmp", "ExposedPorts": {"8000/tcp": {}},
    }},
}
PROJECT_FILES = ["pyproject.toml", "README.md", "node", "client"]
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "TZ": "UTC",
    "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": "/dev/null",
}
MEDIA = {
    "layer": "application/vnd.oci.image.layer.v1.tar",
    "config": "application/vnd.oci.image.config.v1+json",
    "manifest": "application/vnd.oci.image.manifest.v1+json",
}


_START = time.monotonic()


def log(msg: str) -> None:
    print(f"[image {time.monotonic() - _START:4.0f} s] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def key_of(*parts: object) -> str:
    return hashlib.sha256(canonical(parts)).hexdigest()[:24]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def chroot(root: Path, *cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["chroot", str(root), *cmd], check=True, env=CHROOT_ENV, **kw)


# --- lock ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Locked:
    name: str
    version: str
    sha256: str
    filename: str

    @property
    def is_sdist(self) -> bool:
        return not self.filename.endswith(".whl")

    def line(self, sha256: str | None = None) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{sha256 or self.sha256}"


LOCK_LINE = re.compile(r"^(\S+)==(\S+) --hash=sha256:([0-9a-f]{64})\s+#\s+(\S+)$")


def read_lock(path: Path) -> tuple[list[Locked], list[Locked]]:
    """(runtime, build) entries of a lock written by docker/image/lock.py."""
    runtime: list[Locked] = []
    build: list[Locked] = []
    target = runtime
    for raw in path.read_text().splitlines():
        if raw.strip() == "# [build]":
            target = build
        elif raw and not raw.startswith("#"):
            m = LOCK_LINE.match(raw)
            if not m:
                raise SystemExit(f"{path}: malformed lock line {raw!r}")
            target.append(Locked(*m.groups()))
    return runtime, build


def fetch(entries: list[Locked], dest: Path) -> dict[str, Path]:
    """Every locked file in `dest`, downloaded if missing, each checked against its hash."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [e for e in entries if not (dest / e.filename).exists()]
    if missing:
        log(f"downloading {len(missing)} locked files")
    batches: list[dict[str, Locked]] = []  # pip takes one version of a project per call (setuptools: two locked)
    for e in missing:
        batch = next((b for b in batches if e.name not in b), None)
        if batch is None:
            batches.append(batch := {})
        batch[e.name] = e
    for batch in batches:
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
            req.write("".join(e.line() + "\n" for e in batch.values()))
            req.flush()
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes",
                                  "-d", str(dest), "-r", req.name], capture_output=True, text=True)
            if got.returncode:
                raise SystemExit(f"pip download failed:\n{got.stderr}")
    files = {}
    for e in entries:
        path = dest / e.filename
        if sha256_file(path) != e.sha256:
            path.unlink()
            raise SystemExit(f"{e.filename}: sha256 differs from the lock (removed; run again to download)")
        files[e.filename] = path
    return files


# --- Debian root filesystems --------------------------------------------------------------------------------


def release_date(mirror: str) -> str:
    """The Date of the archive's signed InRelease: it changes with each point release, so it keys the cache."""
    with urllib.request.urlopen(f"{mirror}/dists/{SUITE}/InRelease", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("Date:"):
                return line[5:].strip()
    raise SystemExit(f"{mirror}: InRelease has no Date")


def mmdebstrap_version() -> str:
    return run(["mmdebstrap", "--version"], capture_output=True, text=True).stdout.strip()


def debian_rootfs(cache: Path, packages: list[str], mirror: str, released: str) -> Path:
    key = key_of("debian", RECIPE, SUITE, mirror, released, sorted(packages), SOURCE_DATE_EPOCH, mmdebstrap_version())
    out = cache / f"debian-{key}.tar"
    if out.exists():
        return out
    log(f"mmdebstrap {SUITE} ({', '.join(packages)}); about a minute")
    tmp = out.with_suffix(".tmp.tar")
    run(["mmdebstrap", "--quiet", "--variant=apt", f"--include={','.join(packages)}", "--mode=root",
         "--format=tar", SUITE, str(tmp), mirror], env={**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)})
    tmp.rename(out)
    return out


def dpkg_versions(rootfs_tar: Path) -> dict[str, str]:
    with tarfile.open(rootfs_tar) as tar:
        status = tar.extractfile("./var/lib/dpkg/status").read().decode()
    versions = {}
    for stanza in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if "Package" in fields and fields.get("Status", "").endswith(" installed"):
            versions[fields["Package"]] = fields["Version"]
    return dict(sorted(versions.items()))


def unpack_tar(tar: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run(["tar", "-xf", str(tar), "-C", str(dest), "--numeric-owner", "--same-permissions"])


# --- deterministic layer tarballs ---------------------------------------------------------------------------


def _tarinfo(path: Path, arcname: str, uid: int = 0) -> tarfile.TarInfo:
    st = path.lstat()
    info = tarfile.TarInfo(arcname)
    info.mode = st.st_mode & 0o7777
    info.uid = info.gid = uid
    info.uname = info.gname = ""
    info.mtime = SOURCE_DATE_EPOCH
    if path.is_symlink():
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif path.is_dir():
        info.type = tarfile.DIRTYPE
    elif path.is_file():
        info.size = st.st_size
    else:
        raise SystemExit(f"{path}: not a file, directory or link; refusing to put it in a layer")
    return info


def write_layer(root: Path, paths: list[str], out: Path, owners: dict[str, int] | None = None) -> None:
    """A tarball of `paths` (relative to root; parents are added) in sorted order with fixed metadata."""
    entries: set[str] = set()
    for p in paths:
        parts = Path(p).parts
        entries.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    owners = owners or {}
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(entries):
            path = root / rel
            info = _tarinfo(path, rel + ("/" if path.is_dir() and not path.is_symlink() else ""),
                            owners.get(rel, 0))
            if info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    tmp.rename(out)


def tree(root: Path, top: str) -> list[str]:
    """Every path under root/top, relative to root, sorted (symlinks not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root / top):
        rel = Path(dirpath).relative_to(root)
        found.extend(str(rel / n) for n in dirnames + filenames)
    return sorted(found)


# --- building wheels from sources ---------------------------------------------------------------------------


def stage_project(src: Path, dest: Path) -> None:
    """The files the project's wheel is built from: tracked by git when src is a checkout, else all of them."""
    if (src / ".git").exists():
        names = run(["git", "-C", str(src), "ls-files", "-z", "--", *PROJECT_FILES], capture_output=True
                    ).stdout.decode().split("\0")
        names = [n for n in names if n and (src / n).is_file()]  # deleted but not yet committed: skipped
    else:
        names = [str(p.relative_to(src)) for top in PROJECT_FILES for p in
                 ([src / top] if (src / top).is_file() else sorted((src / top).rglob("*")))
                 if p.is_file() and "__pycache__" not in p.parts]
    for name in sorted(names):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dest / name)


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for rel in tree(root, "."):
        p = root / rel
        if p.is_file():
            h.update(f"{rel}\0{p.stat().st_mode & 0o111}\0".encode() + p.read_bytes())
    return h.hexdigest()


def build_wheels(cache: Path, builder_tar: Path, build_files: list[Path], sdists: list[Path], project: Path
                 ) -> dict[str, Path]:
    """Wheels of the sdists and the project, built in the builder root filesystem at fixed paths."""
    bkey = key_of("builder", RECIPE, builder_tar.name, sorted(p.name for p in build_files))
    jobs = {p.name: (p, key_of(bkey, sha256_file(p))) for p in sdists}
    jobs["project"] = (project, key_of(bkey, tree_hash(project)))
    built = {}
    todo = []
    for name, (src, key) in jobs.items():
        done = cache / "built" / key
        wheels = sorted(done.glob("*.whl")) if done.exists() else []
        if wheels:
            built[name] = wheels[0]
        else:
            todo.append((name, src, done))
    if not todo:
        return built
    log(f"building {len(todo)} wheel(s) in the Debian builder")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root = Path(tmp) / "rootfs"
        unpack_tar(builder_tar, root)
        (root / "wheels").mkdir()
        for p in build_files:
            shutil.copy(p, root / "wheels" / p.name)
        chroot(root, "python3", "-m", "venv", "--without-pip", "/opt/build")
        reqs = "".join(f"/wheels/{p.name} --hash=sha256:{sha256_file(p)}\n" for p in build_files)
        (root / "wheels" / "req.txt").write_text(reqs)
        chroot(root, "/opt/build/bin/python3", PIP, "install", "-q", "--no-index", "--no-deps", "--require-hashes",
               "-r", "/wheels/req.txt")
        for name, src, done in todo:
            work = root / "build" / re.sub(r"[^A-Za-z0-9]", "_", name)
            if src.is_dir():
                shutil.copytree(src, work)
            else:
                work.mkdir(parents=True)
                with tarfile.open(src) as t:
                    t.extractall(work, filter="data")
                (top,) = list(work.iterdir())
                work = top
            out = root / "out" / done.name
            chroot(root, "/opt/build/bin/python3", PIP, "wheel", "-q", "--no-deps", "--no-build-isolation",
                   "--no-index", "-w", f"/out/{done.name}", f"/{work.relative_to(root)}")
            (wheel,) = list(out.glob("*.whl"))
            done.mkdir(parents=True, exist_ok=True)
            shutil.copy(wheel, done / wheel.name)
            built[name] = done / wheel.name
    return built


# --- layers -------------------------------------------------------------------------------------------------


def pip_install(root: Path, wheels: list[Path], requirements: list[str]) -> None:
    """pip inside the root filesystem: only these files, each checked against its hash, no bytecode."""
    stage = root / "tmp" / "wheels"
    stage.mkdir(parents=True)
    for w in wheels:
        try:
            os.link(w, stage / w.name)
        except OSError:
            shutil.copy(w, stage / w.name)
    (stage / "req.txt").write_text("".join(r + "\n" for r in requirements))
    try:
        chroot(root, f"{VENV}/bin/python3", PIP, "install", "-q", "--no-index", "--find-links", "/tmp/wheels",
               "--require-hashes", "--no-deps", "--no-compile", "-r", "/tmp/wheels/req.txt")
    finally:
        shutil.rmtree(stage)


def deps_layer(cache: Path, base_tar: Path, runtime: list[Locked], files: dict[str, Path], built: dict[str, Path],
               *, fresh: bool) -> tuple[Path, dict[str, str]]:
    """Layer 2: the venv with every locked dependency. Returns it and the wheels it installed (name: sha256)."""
    wheels: list[Path] = []
    reqs: list[str] = []
    installed: dict[str, str] = {}
    for e in runtime:
        wheel = built[e.filename] if e.is_sdist else files[e.filename]
        digest = sha256_file(wheel) if e.is_sdist else e.sha256
        wheels.append(wheel)
        reqs.append(e.line(digest))
        installed[wheel.name] = digest
    key = key_of("deps", RECIPE, base_tar.name, VENV, sorted(installed.items()))
    out = cache / f"deps-{key}.tar"
    if out.exists() and not fresh:
        return out, installed
    log(f"installing {len(wheels)} wheels into {VENV} (the large layer)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root = Path(tmp)
        unpack_tar(base_tar, root)
        chroot(root, "python3", "-m", "venv", "--without-pip", VENV)
        pip_install(root, wheels, reqs)
        write_layer(root, tree(root, VENV.lstrip("/")), out.with_suffix(".new"))
    out.with_suffix(".new").replace(out)
    return out, installed


def project_layer(work: Path, base_tar: Path, deps_tar: Path, wheel: Path, src: Path) -> Path:
    """Layer 3: the project's wheel in the venv, its configuration, and the node's data directory."""
    root = work / "rootfs"
    unpack_tar(base_tar, root)
    unpack_tar(deps_tar, root)
    before = set(tree(root, VENV.lstrip("/")))
    pip_install(root, [wheel], [f"/tmp/wheels/{wheel.name} --hash=sha256:{sha256_file(wheel)}"])
    added = [p for p in tree(root, VENV.lstrip("/")) if p not in before]
    conf = root / "etc" / "dcml"
    conf.mkdir(parents=True)
    shutil.copy(src / "configs" / "node.toml", conf / "node.toml")
    os.chmod(conf / "node.toml", 0o644)
    (root / "var" / "lib" / "dcml").mkdir(parents=True)
    out = work / "project.tar"
    write_layer(root, [*added, "etc/dcml/node.toml", "var/lib/dcml"], out, owners={"var/lib/dcml": NODE_UID})
    return out


# --- OCI layout ---------------------------------------------------------------------------------------------


def add_blob(oci: Path, data: bytes | Path) -> tuple[str, int]:
    blobs = oci / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path):
        digest, size = sha256_file(data), data.stat().st_size
        if not (blobs / digest).exists():
            try:
                os.link(data, blobs / digest)
            except OSError:
                shutil.copy(data, blobs / digest)
    else:
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
        (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", size


def write_oci(oci: Path, layers: list[tuple[Path, str]], tag: str, config: dict) -> str:
    """The OCI image layout; returns the manifest digest (the image digest)."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(SOURCE_DATE_EPOCH))
    descs, diff_ids = [], []
    for path, _ in layers:
        digest, size = add_blob(oci, path)
        descs.append({"mediaType": MEDIA["layer"], "digest": digest, "size": size})
        diff_ids.append(digest)  # uncompressed: the layer is its own diff
    image_config = {
        "architecture": "amd64", "os": "linux", "created": created, "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": what} for _, what in layers],
    }
    cdigest, csize = add_blob(oci, canonical(image_config))
    manifest = {"schemaVersion": 2, "mediaType": MEDIA["manifest"],
                "config": {"mediaType": MEDIA["config"], "digest": cdigest, "size": csize}, "layers": descs}
    mdigest, msize = add_blob(oci, canonical(manifest))
    (oci / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
    (oci / "index.json").write_bytes(canonical({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": MEDIA["manifest"], "digest": mdigest, "size": msize,
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }))
    return mdigest


def write_archive(oci: Path, out: Path) -> None:
    """The layout as one deterministic tarball (`oci-archive:` for skopeo)."""
    write_layer(oci, tree(oci, "."), out)


def unpack_image(oci: Path, tag: str, dest: Path) -> None:
    """The image's root filesystem, unpacked by umoci (which checks every blob's digest)."""
    run(["umoci", "raw", "unpack", "--image", f"{oci}:{tag}", str(dest)])


# --- the build ----------------------------------------------------------------------------------------------


def source_commit(src: Path) -> dict[str, object]:
    if not (src / ".git").exists():
        return {"commit": None, "dirty": None}
    commit = run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = run(["git", "-C", str(src), "status", "--porcelain", "--", *PROJECT_FILES, "configs/node.toml",
                 "docker/image"], capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "dirty": bool(dirty)}


def build(flavor: str, src: Path, out: Path, cache: Path, *, mirror: str = MIRROR, fresh: bool = False,
          archive: bool = False) -> dict:
    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    os.umask(0o022)
    lock = src / "docker" / "image" / f"requirements-{flavor}.lock"
    runtime, build_reqs = read_lock(lock)
    released = release_date(mirror)
    base_tar = debian_rootfs(cache, BASE_PACKAGES, mirror, released)
    builder_tar = debian_rootfs(cache, BUILDER_PACKAGES, mirror, released)
    files = fetch(runtime + build_reqs, cache / "wheels")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        project_src = work / "src"
        stage_project(src, project_src)
        built = build_wheels(cache, builder_tar, [files[e.filename] for e in build_reqs],
                             [files[e.filename] for e in runtime if e.is_sdist], project_src)
        built_by_sdist = {e.filename: built[e.filename] for e in runtime if e.is_sdist}
        deps_tar, installed = deps_layer(cache, base_tar, runtime, files, built_by_sdist, fresh=fresh)
        spec = FLAVORS[flavor]
        layers = [(base_tar, f"mmdebstrap {SUITE} {' '.join(BASE_PACKAGES)}"),
                  (deps_tar, f"pip install --require-hashes -r docker/image/requirements-{flavor}.lock")]
        project_wheel = built["project"]
        if spec["project"]:
            layers.append((project_layer(work, base_tar, deps_tar, project_wheel, src),
                           "pip install dcml; configs/node.toml"))
        oci = out / "oci"
        shutil.rmtree(oci, ignore_errors=True)
        digest = write_oci(oci, layers, flavor, spec["config"])
        record = {
            "image": spec["image"], "flavor": flavor, "digest": digest,
            "source": source_commit(src), "source_date_epoch": SOURCE_DATE_EPOCH,
            "debian": {"suite": SUITE, "mirror": mirror, "in_release_date": released,
                       "mmdebstrap": mmdebstrap_version(), "packages": dpkg_versions(base_tar),
                       "builder_packages": dpkg_versions(builder_tar)},
            "wheels": installed,
            "project_wheel": {project_wheel.name: sha256_file(project_wheel)} if spec["project"] else {},
            "build_wheels": {p.name: sha256_file(p) for p in (files[e.filename] for e in build_reqs)},
            "layers": [{"digest": f"sha256:{sha256_file(p)}", "size": p.stat().st_size} for p, _ in layers],
        }
    (out / "build-record.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    (out / "digest").write_text(digest + "\n")
    if archive:
        write_archive(oci, out / f"{record['image']}.oci.tar")
    log(f"built {record['image']} {digest} in {time.monotonic() - started:.0f} s")
    return record


def check(flavor: str, src: Path, out: Path, cache: Path, mirror: str) -> str:
    """Two builds into fresh directories, the second rebuilding the dependencies layer: equal digests or exit 1."""
    a = build(flavor, src, out / "check-a", cache, mirror=mirror)
    b = build(flavor, src, out / "check-b", cache, mirror=mirror, fresh=True)
    for x, y, what in zip(a["layers"], b["layers"], ("debian", "dependencies", "project"), strict=False):
        if x != y:
            log(f"the {what} layer differs between two builds: {x} != {y}")
    if a["digest"] != b["digest"]:
        raise SystemExit(f"NOT reproducible: {a['digest']} != {b['digest']}")
    log(f"reproducible: two builds gave {a['digest']}")
    return a["digest"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="cpu", choices=sorted(FLAVORS))
    parser.add_argument("--src", type=Path, default=ROOT, help="the source tree (default: this checkout)")
    parser.add_argument("--out", type=Path, help="default: build/image/<flavor>")
    parser.add_argument("--cache", type=Path, default=ROOT / "build" / "image" / "cache")
    parser.add_argument("--mirror", default=MIRROR, help="e.g. a snapshot.debian.org URL to rebuild an old image")
    parser.add_argument("--fresh", action="store_true", help="rebuild the dependencies layer even when cached")
    parser.add_argument("--archive", action="store_true", help="also write the layout as an oci-archive tarball")
    parser.add_argument("--check", action="store_true", help="build twice (under OUT/check-a, -b), compare digests")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the image build needs root (mmdebstrap --mode=root, chroot)")
    out = args.out or ROOT / "build" / "image" / args.flavor
    if args.check:
        print(check(args.flavor, args.src.resolve(), out.resolve(), args.cache.resolve(), args.mirror))
        return
    record = build(args.flavor, args.src.resolve(), out.resolve(), args.cache.resolve(), mirror=args.mirror,
                   fresh=args.fresh, archive=args.archive)
    print(record["digest"])


if __name__ == "__main__":
    main()
