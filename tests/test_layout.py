"""The layout's rules, read statically from the source tree with `ast` (nothing is imported): arrows point one
way (wire <- attestation <- chain <- sdk, publisher, node <- demo) and every package folder is listed in
pyproject.toml. A test fails naming the file and the import that breaks a rule."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"dcml.client": REPO / "client", "dcml.node": REPO / "node"}
ABOVE_WIRE = ("attestation", "chain", "sdk", "publisher", "network", "demo")


def module_name(path: Path, folders: dict[str, Path] = FOLDERS) -> str:
    for package, folder in folders.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join((package, *parts[: -1 if parts[-1] == "__init__" else None]))
    raise ValueError(path)


def imports(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in module `name`, relative ones resolved, function-level included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).rstrip(".")
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # `from dcml.client import sdk`
    return found


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


# (the importing side, what it must not import, why)
RULES = [
    ("dcml.node", ("dcml.client.sdk", "dcml.client.publisher.key_broker", "dcml.client.demo"),
     "the node never imports the client SDK, the publisher's key broker server or the demos"),
    ("dcml.client.wire", (*(f"dcml.client.{p}" for p in ABOVE_WIRE), "dcml.node"),
     "the wire formats import nothing above them"),
    ("dcml.client.attestation", ("dcml.client.chain", "dcml.client.sdk", "dcml.client.publisher",
                                 "dcml.client.network", "dcml.client.demo", "dcml.node"),
     "attestation verification sits on the wire formats only"),
    ("dcml.client.chain", ("dcml.client.sdk", "dcml.client.publisher", "dcml.client.demo", "dcml.node"),
     "chain access is below the SDK, the publisher's tools and the node"),
    ("dcml.client.sdk", ("dcml.node", "dcml.client.demo"), "the client SDK installs and runs without the node"),
    ("dcml.client.publisher", ("dcml.client.sdk", "dcml.client.demo"), "the publisher's tools need no SDK"),
]


def violations(repo: Path = REPO, folders: dict[str, Path] = FOLDERS) -> list[str]:
    out = []
    for path in sorted(p for folder in folders.values() for p in folder.rglob("*.py")):
        name = module_name(path, folders)
        if within(name, "dcml.client.demo"):
            continue  # the composition root: the demos and their kit may import anything
        for line, imported in imports(path, name):
            for side, banned, why in RULES:
                if within(name, side) and within(imported, *banned):
                    out.append(f"{path.relative_to(repo)}:{line} imports {imported} ({why})")
    return sorted(set(out))


def test_imports_point_one_way() -> None:
    assert violations() == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The checker itself: a node module importing the SDK (also relatively, inside a function) is caught."""
    (tmp_path / "client" / "wire").mkdir(parents=True)
    (tmp_path / "node" / "api").mkdir(parents=True)
    (tmp_path / "node" / "api" / "bad.py").write_text("def f():\n    from dcml.client.sdk.client import Client\n")
    (tmp_path / "client" / "wire" / "bad.py").write_text("from ..chain import tx\nfrom . import voucher\n")
    found = violations(tmp_path, {"dcml.client": tmp_path / "client", "dcml.node": tmp_path / "node"})
    assert found == [
        "client/wire/bad.py:1 imports dcml.client.chain (the wire formats import nothing above them)",
        "client/wire/bad.py:1 imports dcml.client.chain.tx (the wire formats import nothing above them)",
        "node/api/bad.py:2 imports dcml.client.sdk.client (the node never imports the client SDK, the publisher's "
        "key broker server or the demos)",
        "node/api/bad.py:2 imports dcml.client.sdk.client.Client (the node never imports the client SDK, the "
        "publisher's key broker server or the demos)",
    ]


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"dcml.client": "client", "dcml.node": "node"}
    folders = {module_name(init) for folder in FOLDERS.values() for init in folder.rglob("__init__.py")}
    assert sorted(config["packages"]) == sorted(folders)
    assert len(config["packages"]) == len(set(config["packages"]))
