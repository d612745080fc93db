"""`make demo` is the product's whole story; it must keep working (and say that it balanced)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_and_balances_to_the_wei() -> None:
    done = subprocess.run([sys.executable, "-m", "dcml.client.demo.story"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "SIMULATED TEE" in out  # the warning is visible
    assert "the broker released the model key: 1 release(s)" in out
    assert "SLA terms in the court" in out and "within the terms" in out  # published, and the receipt checked
    assert "on-chain movements equal the sum of the receipts to the wei" in out
