"""Writes docker/app-compose.<flavor>.json from docker/templates with the built images pinned by digest, and
allow-lists their hashes in configs/policy.toml (`make compose`, after `make image`).

The image digests come from build/image/<flavor>/digest (what `make image` printed); the repository name is
where the operator pushes them (`skopeo copy --preserve-digests`), which keeps the digest.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dcml.node.tee.compose import compose_hash, render  # noqa: E402

DEFAULT_REPO = "ghcr.io/dcml-network"
POLICY_LIST = re.compile(r"^compose_hashes = \[[^\]]*\]", re.M)


def built_digest(flavor: str) -> str:
    path = ROOT / "build" / "image" / flavor / "digest"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make image FLAVOR={flavor}` first")
    return path.read_text().strip()


def images_for(flavor: str, repo: str, vllm_cuda: str | None) -> dict[str, str] | None:
    if flavor == "cpu":
        return {"NODE_IMAGE": f"{repo}/dcml-node@{built_digest('cpu')}"}
    if flavor == "vllm":
        if not (ROOT / "build" / "image" / "vllm" / "digest").exists():
            return None
        return {"NODE_IMAGE": f"{repo}/dcml-node@{built_digest('cpu')}",
                "VLLM_IMAGE": f"{repo}/dcml-vllm-cpu@{built_digest('vllm')}"}
    return {"NODE_IMAGE": f"{repo}/dcml-node@{built_digest('cpu')}", "VLLM_CUDA_IMAGE": vllm_cuda} if vllm_cuda \
        else None


def update_policy(policy: Path, hashes: dict[str, str]) -> None:
    """Replace [dstack].compose_hashes with the hashes of the composes this repository ships."""
    items = "".join(f'    "{h}",  # {name}\n' for name, h in sorted(hashes.items()))
    text, n = POLICY_LIST.subn(f"compose_hashes = [\n{items}]", policy.read_text(), count=1)
    if n != 1:
        raise SystemExit(f"{policy}: no `compose_hashes = [...]` line to update")
    policy.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default=DEFAULT_REPO, help=f"registry namespace of our images ({DEFAULT_REPO})")
    parser.add_argument("--vllm-cuda-image", help="vllm/vllm-openai@sha256:... for the GPU compose")
    args = parser.parse_args()
    shipped = {}
    for flavor in ("cpu", "vllm", "gpu"):
        out = ROOT / "docker" / f"app-compose.{flavor}.json"
        images = images_for(flavor, args.repo, args.vllm_cuda_image)
        if images is None:
            if out.exists():
                shipped[out.relative_to(ROOT).as_posix()] = compose_hash(out.read_bytes()).hex()
            print(f"{flavor}: skipped (its images are not built or given)", file=sys.stderr)
            continue
        lines = (ROOT / "docker" / "templates" / f"{flavor}.yml").read_text().splitlines(keepends=True)
        while lines and lines[0].startswith("#"):  # the template's own header: how to use it
            lines.pop(0)
        header = f"# Generated from docker/templates/{flavor}.yml by `make compose`: edit the template.\n"
        data = render(header + "".join(lines), images, f"dcml-node-{flavor}")
        out.write_bytes(data)
        record = ROOT / "build" / "image" / flavor / "build-record.json"
        if record.exists():  # what the pinned images were built from, for auditors
            shutil.copy(record, ROOT / "docker" / f"build-record.{flavor}.json")
        shipped[out.relative_to(ROOT).as_posix()] = compose_hash(data).hex()
        print(f"{compose_hash(data).hex()}  {out.relative_to(ROOT)}")
    update_policy(ROOT / "configs" / "policy.toml", shipped)


if __name__ == "__main__":
    main()
