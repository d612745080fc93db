"""The node's service terms in the SLA court: measure what the engine can do, check the configured terms
against it before promising them, and publish them only when they changed (not a new version per restart).

The benchmark times the engine alone (`Engine.stream`), as a receipt would: TTFT is the first chunk's time,
the decode rate is the tokens after the first over the time after the first (the court's rule), duration is
the whole answer. Receipts also count admission (a ledger commit) and queueing under load, so leave headroom.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from dcml.client.chain.sla import SLACourtClient, Terms
from dcml.client.wire.errors import DcmlError
from dcml.node.config import SlaConfig
from dcml.node.engine.base import Engine, GenerationRequest, SamplingParams

_PROMPT_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog")


@dataclass(frozen=True)
class EngineBenchmark:
    """The worst figures over `runs` answers of up to `max_tokens` tokens to a `prompt_tokens`-word prompt."""

    runs: int
    prompt_tokens: int
    max_tokens: int
    ttft_ms: float  # worst time to the first chunk
    tokens_per_sec: float  # worst decode rate after the first token (inf: no run produced two tokens)
    duration_ms: float  # worst whole-answer time
    output_tokens: int  # fewest tokens a run produced

    def duration_for(self, max_tokens: int) -> float:
        """Worst expected duration of an answer of `max_tokens` tokens: measured up to the benchmark's
        length, extrapolated beyond it from the worst TTFT and the worst rate."""
        if max_tokens <= self.max_tokens or math.isinf(self.tokens_per_sec) or self.tokens_per_sec <= 0:
            return self.duration_ms
        return max(self.duration_ms, self.ttft_ms + (max_tokens - 1) * 1000 / self.tokens_per_sec)

    def describe(self) -> str:
        return (f"TTFT {self.ttft_ms:.0f} ms, {self.tokens_per_sec:.1f} tokens/s, {self.duration_ms:.0f} ms for "
                f"{self.max_tokens} tokens (worst of {self.runs} runs)")


async def _run_once(engine: Engine, prompt: str, max_tokens: int, seed: int) -> tuple[float, float, float, int]:
    request = GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=max_tokens, seed=seed))
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = engine.stream(request)
    try:
        async for chunk in stream:
            if first is None:
                first = time.perf_counter()
            tokens += chunk.tokens
    finally:
        close = getattr(stream, "aclose", None)  # an engine's stream is an async generator: free its slot
        if close is not None:
            await close()
    end = time.perf_counter()
    first = end if first is None else first
    rate = (tokens - 1) / (end - first) if tokens > 1 and end > first else math.inf
    return (first - t0) * 1000, rate, (end - t0) * 1000, tokens


async def measure(engine: Engine, runs: int, prompt_tokens: int, max_tokens: int) -> EngineBenchmark:
    """Benchmark `engine` (started) with `runs` sequential answers, after one warm-up answer that is not
    counted (the benchmark itself warms the engine before any client request arrives)."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    prompt = " ".join(_PROMPT_WORDS[i % len(_PROMPT_WORDS)] for i in range(prompt_tokens))
    await _run_once(engine, prompt, max_tokens, seed=0)
    results = [await _run_once(engine, prompt, max_tokens, seed=i + 1) for i in range(runs)]
    return EngineBenchmark(runs=runs, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                           ttft_ms=max(r[0] for r in results), tokens_per_sec=min(r[1] for r in results),
                           duration_ms=max(r[2] for r in results), output_tokens=min(r[3] for r in results))


def unmet(terms: Terms, bench: EngineBenchmark, *, max_tokens: int | None = None) -> list[str]:
    """Why `bench` says the engine would break `terms` (empty: it meets them), by `client.sla.broken_terms`'s
    rule. The duration bound is checked for answers of `max_tokens` tokens (default: the benchmark's own
    length; the node passes `limits.max_tokens_cap`, the longest answer a client may ask for)."""
    reasons = []
    if terms.max_ttft_ms and bench.ttft_ms > terms.max_ttft_ms:
        reasons.append(f"time to first token: measured {bench.ttft_ms:.0f} ms, promised at most "
                       f"{terms.max_ttft_ms} ms (max_ttft_ms)")
    if terms.min_tokens_per_sec and bench.tokens_per_sec < terms.min_tokens_per_sec:
        reasons.append(f"decode rate: measured {bench.tokens_per_sec:.1f} tokens/s, promised at least "
                       f"{terms.min_tokens_per_sec} tokens/s (min_tokens_per_sec)")
    n = bench.max_tokens if max_tokens is None else max_tokens
    if terms.max_duration_ms and (expected := bench.duration_for(n)) > terms.max_duration_ms:
        how = "measured" if n <= bench.max_tokens else "extrapolated"
        reasons.append(f"duration of a {n}-token answer: {how} {expected:.0f} ms, promised at most "
                       f"{terms.max_duration_ms} ms (max_duration_ms)")
    return reasons


class TermsUnmet(DcmlError, RuntimeError):
    """The engine cannot meet the configured terms and `[sla] on_unmet = "refuse"`: the node does not start."""

    def __init__(self, reasons: list[str], bench: EngineBenchmark) -> None:
        super().__init__("the engine cannot meet the [sla] terms it would promise: " + "; ".join(reasons)
                         + f" ({bench.describe()}). Relax those terms, give the engine more capacity, or set "
                         "[sla] on_unmet = \"warn\" to publish them anyway (clients may claim for every breach).",
                         reason="terms_unmet")
        self.reasons = reasons
        self.bench = bench


def terms_from_config(sla: SlaConfig) -> Terms:
    return Terms(max_ttft_ms=sla.max_ttft_ms, min_tokens_per_sec=sla.min_tokens_per_sec,
                 max_duration_ms=sla.max_duration_ms, response_window=sla.response_window_s,
                 breach_cost_bps=sla.breach_cost_bps, breach_fixed=sla.breach_fixed,
                 no_response_compensation=sla.no_response_compensation)


def publish_terms_if_changed(court: SLACourtClient, operator: LocalAccount, node_address: str, model_id: str,
                             terms: Terms) -> bool:
    """Publish `terms` unless the newest version already says the same (valid_from aside). Blocking web3."""
    latest = court.latest_terms(node_address, model_id)
    if latest is not None and latest.model_copy(update={"valid_from": 0}) == terms.model_copy(
            update={"valid_from": 0}):
        return False
    court.publish_terms(operator, node_address, model_id, terms)
    return True
