"""The base distribution (no extras) installs into a FRESH virtualenv, and there the client SDK, the wire formats,
attestation verification and chain access import, with no torch, transformers, libp2p or server present.

The wheels come from a local wheelhouse (build/wheelhouse-base, filled from the package index on the first run
only), so the install itself is offline: `pip install --no-index --find-links`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPO / "build" / "wheelhouse-base"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
HEAVY = ("torch", "transformers", "tokenizers", "libp2p", "fastapi", "uvicorn", "blake3")
CHECK = f"""
import importlib, importlib.util, pkgutil, sys
import dcml.client.chain, dcml.client.wire
names = ["dcml.client.sdk.client", "dcml.client.attestation.verify"]
for package in (dcml.client.wire, dcml.client.chain):
    names += [package.__name__ + "." + m.name for m in pkgutil.iter_modules(package.__path__)]
for name in names:
    importlib.import_module(name)
heavy = [m for m in {HEAVY!r} if importlib.util.find_spec(m) is not None or m in sys.modules]
assert not heavy, f"the base install has {{heavy}}"
print(len(names), "modules imported:", dcml.client.sdk.client.__file__)
"""


def run(*cmd: str | Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_base_install_imports_the_client_without_torch(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a clean copy: the build leaves no build/ or egg-info in the checkout
    for name in ("client", "node"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    run(*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source)
    (wheel,) = (tmp_path / "dist").glob("dcml-*.whl")
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    try:  # everything already in the wheelhouse: no index at all
        run(*PIP, "download", "--no-index", "--find-links", WHEELHOUSE, "-d", tmp_path / "probe", wheel)
    except AssertionError:
        run(*PIP, "download", "-d", WHEELHOUSE, wheel)  # first run on this machine: fill it from the index
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(*PIP, "--python", python, "install", "--no-index", "--find-links", WHEELHOUSE, wheel)
    out = run(python, "-c", CHECK)
    assert str(venv) in out  # the fresh virtualenv's copy, not this checkout
