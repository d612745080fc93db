"""dstack app composes: generating them from docker/templates and computing the hash a CVM measures.

A dstack CVM measures `sha256(app-compose.json)`, the exact bytes it was deployed with, into RTMR3 (event
`compose-hash`) and, since dstack 0.5.1, into MRCONFIGID as `0x01 || hash` zero-padded to 48 bytes. Clients
allow-list that hash (configs/policy.toml [dstack].compose_hashes). We write app-compose.json in dstack's
deterministic JSON (keys sorted, compact, UTF-8: what dstack-sdk's `get_compose_hash` serializes), so the file
hash and the SDK's hash of its content agree.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from dcml.client.attestation.measurements import expected_mr_config_id

PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
DIGEST = re.compile(r"^[\w./:-]+@sha256:[0-9a-f]{64}$")

# The CVM's settings besides the containers; every one of them is measured with the compose.
APP_SETTINGS: dict[str, Any] = {
    "manifest_version": 2,
    "runner": "docker-compose",
    "kms_enabled": True,              # the node's identity key is derived from dstack's KMS (stable across restarts)
    "gateway_enabled": False,         # clients reach the node's port directly; E2E-sealed bodies need no gateway
    "local_key_provider_enabled": False,
    "public_logs": False,             # logs could carry request metadata: not published
    "public_sysinfo": True,
    "public_tcbinfo": True,           # lets anyone read the app compose a node runs (what they allow-list)
    "no_instance_id": False,
    "secure_time": True,
    "allowed_envs": ["DCML_OPERATOR_KEY"],  # the operator's wallet key, sent encrypted to the CVM at deploy
}


def compose_hash(app_compose: bytes) -> bytes:
    """What dstack measures: sha256 of the app-compose.json bytes."""
    return hashlib.sha256(app_compose).digest()


def mr_config_id(app_compose: bytes) -> bytes:
    return expected_mr_config_id(compose_hash(app_compose))


def deterministic_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def render(template: str, images: dict[str, str], name: str) -> bytes:
    """app-compose.json for a docker-compose template whose `{{NAME}}` placeholders are image references.

    Every image must be pinned by digest (`repo@sha256:...`): a tag could be moved after the hash is allowed.
    """
    for key, ref in images.items():
        if not DIGEST.match(ref):
            raise ValueError(f"{key}={ref!r} is not pinned by digest (repo@sha256:<64 hex>)")
    missing = sorted(set(PLACEHOLDER.findall(template)) - images.keys())
    if missing:
        raise ValueError(f"no image given for {missing}")
    compose = PLACEHOLDER.sub(lambda m: images[m.group(1)], template)
    return deterministic_json({**APP_SETTINGS, "name": name, "docker_compose_file": compose})


def describe(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    return {"file": str(path), "compose_hash": compose_hash(data).hex(), "mr_config_id": mr_config_id(data).hex()}
