"""`make demo-gateway` runs to its end: routing, a stopped node, failover, a refused limit, to-the-wei check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_gateway_runs_and_checks_every_channel_to_the_wei() -> None:
    out = subprocess.run([sys.executable, "-m", "dcml.client.demo.gateway"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "6. failover: answered by" in out.stdout and "spending_limit_per_request" in out.stdout
    assert "to the wei" in out.stdout and "✗" not in out.stdout
