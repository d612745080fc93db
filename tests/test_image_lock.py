"""The image's hash-pinned lock installs exactly the versions pyproject.toml pins (else `make image-lock`)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK_LINE = re.compile(r"^(\S+)==(\S+) --hash=sha256:[0-9a-f]{64}\s+#\s+\S+$")


def _runtime_lock() -> dict[str, Version]:
    pinned = {}
    for line in (ROOT / "docker" / "image" / "requirements-cpu.lock").read_text().splitlines():
        if line.strip() == "# [build]":
            break
        if line and not line.startswith("#"):
            m = LOCK_LINE.match(line)
            assert m, f"malformed lock line {line!r}"
            pinned[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pinned


def _with_extras(project: dict, *extras: str) -> list[str]:
    """The base dependencies and these extras, `dcml[...]` self-references expanded (the image installs the node)."""
    out, todo, seen = list(project["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra not in seen:
            seen.add(extra)
            for req in project["optional-dependencies"][extra]:
                todo += req[5:-1].split(",") if req.startswith("dcml[") else []
                out += [] if req.startswith("dcml[") else [req]
    return out


def test_cpu_lock_pins_what_pyproject_pins() -> None:
    lock = _runtime_lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in _with_extras(project, "node", "dstack")]
    stale = [str(r) for r in wanted
             if canonicalize_name(r.name) not in lock or not r.specifier.contains(lock[canonicalize_name(r.name)])]
    assert not stale, f"docker/image/requirements-cpu.lock is stale for {stale}: run `make image-lock`"
