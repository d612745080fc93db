"""Property-based fuzzing derived from the node's own OpenAPI document (schemathesis + hypothesis), against real
node processes: a free one (the engine paths) and a paid one (the payment header and the vouchers endpoint).

Every operation gets schema-valid and schema-violating requests; the suite asserts no 5xx, that every status and
content type answered is one the document declares, and that the process is alive afterwards. Bounded: a fixed
number of examples per operation and mode, and a wall-clock budget per node. Run alone with `-s` to see the
figures (requests generated, 5xx, crashes)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from dcml.client.chain.devnet import free_port
from dcml.client.demo.kit.nodes import NodeProcess, to_toml
from tests.node_configs import hardened_config

EXAMPLES = 60  # per operation and mode
BUDGET_S = 30.0  # per node


@dataclass
class Figures:
    requests: int = 0
    server_errors: list[str] = field(default_factory=list)
    nonconforming: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)


def fuzz(url: str) -> Figures:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    figures = Figures()
    deadline = time.monotonic() + BUDGET_S
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() > deadline:
                break

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                if time.monotonic() > deadline:
                    return
                response = case.call(base_url=url, timeout=30)
                figures.requests += 1
                figures.statuses[response.status_code] = figures.statuses.get(response.status_code, 0) + 1
                label = f"{case.method} {case.path} -> {response.status_code}"
                if response.status_code >= 500:
                    figures.server_errors.append(f"{label}: {response.text[:200]}")
                try:  # recorded, not raised: no shrinking, the budget stays bounded
                    case.validate_response(response, checks=[status_code_conformance, content_type_conformance])
                except Exception as exc:
                    figures.nonconforming.append(f"{label}: {str(exc)[:300]}")

            with contextlib.suppress(Unsatisfiable):  # nothing to violate (no parameters or body)
                run()
    return figures


def _check(node: NodeProcess, figures: Figures, name: str) -> None:
    print(f"\nfuzz {name}: {figures.requests} requests, {len(figures.server_errors)} 5xx, "
          f"{0 if node.alive() else 1} crashes, statuses {dict(sorted(figures.statuses.items()))}")
    assert figures.requests >= 100
    assert not figures.server_errors, figures.server_errors[:5]
    assert not figures.nonconforming, figures.nonconforming[:5]
    assert node.alive(), node.log()[-3000:]
    assert "Traceback" not in node.log() and "internal_error" not in node.log()


@pytest.fixture
def started(tmp_path, node_process):
    def start(config_text: str) -> NodeProcess:
        port = free_port()
        (tmp_path / "node.toml").write_text(config_text.replace("PORT", str(port)))
        return node_process(tmp_path / "node.toml", port)

    return start


def test_fuzz_free_node_from_its_openapi_document(started, tmp_path) -> None:
    node = started(f"""
data_dir = "{tmp_path / 'data'}"
[server]
port = PORT
graceful_shutdown_s = 2
[engine]
kind = "synthetic"
served_model_name = "synthetic"
[limits]
max_tokens_cap = 64
default_max_tokens = 16
""")
    _check(node, fuzz(node.url), "free node")


def test_fuzz_paid_node_from_its_openapi_document(started, w3, deployment, tmp_path) -> None:
    deployment_file = tmp_path / "deployment.json"
    deployment.save(deployment_file)
    text = to_toml(hardened_config(tmp_path / "paid-data", 0, deployment_file, log_level="info"))
    text = text.replace("port = 0", "port = PORT")
    node = started(text)
    _check(node, fuzz(node.url), "paid node")
