"""The hardened paid node's config (tight header/body timeouts, a per-source connection cap): attacked by
test_hardening and fuzzed by test_fuzz_openapi."""

from __future__ import annotations

from pathlib import Path

from dcml.client.demo.kit.nodes import Sections, paid_config

HEADER_TIMEOUT_S, BODY_TIMEOUT_S, PER_SOURCE = 2, 3, 64


def hardened_config(data_dir: Path, port: int, deployment_file: Path, *, log_level: str = "debug") -> Sections:
    cfg = paid_config(data_dir, port, deployment_file)
    cfg["server"].update(graceful_shutdown_s=2, header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S,
                         max_connections_per_source=PER_SOURCE)
    cfg["logging"] = {"level": log_level}
    cfg["engine.options"] = {"tokens_per_second": 200}
    cfg["payments"]["voucher_timeout_s"] = 10
    return cfg
