"""A node's published SLA terms as the payer reads them: every version from the court, cached briefly, and the
version in force at a moment (the court's `termsAt`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from dcml.client.chain.sla import Broken, SLACourtClient, Terms

# Terms are read from the chain at most once a minute per (node, model): checking every receipt means one
# chain read on every paid request's path otherwise. A version published within the last minute may be
# missed for that minute (the court, which judges by the chain, still has the last word on any claim).
TERMS_TTL_S = 60.0
# A receipt no cached version covers (e.g. the node's first terms are new) refreshes at most this often,
# so a node without terms does not cost a chain read per request either.
TERMS_MISS_RETRY_S = 5.0
BROKEN_NAMES = {Broken.TTFT: "ttft", Broken.RATE: "rate", Broken.DURATION: "duration"}


def broken_names(bits: int) -> list[str]:
    """`Broken` bits as names: ttft, rate, duration (the violation reasons are ``sla_`` + these)."""
    return [name for bit, name in BROKEN_NAMES.items() if bits & bit]


class TermsCache:
    """Terms versions per (node, model), re-read after `ttl_s` (after TERMS_MISS_RETRY_S when none covered)."""

    def __init__(self, court: SLACourtClient, ttl_s: float = TERMS_TTL_S) -> None:
        self.court, self.ttl_s = court, ttl_s
        self._terms: dict[tuple[str, str], tuple[float, list[Terms]]] = {}
        self._lock = threading.Lock()

    def at(self, node: str, model_id: str, at: int) -> Terms | None:
        key, now = (node.lower(), model_id.lower()), time.monotonic()
        with self._lock:
            cached = self._terms.get(key)
        if cached is not None:
            found = in_force(cached[1], at)
            age = now - cached[0]
            if age < self.ttl_s and (found is not None or age < TERMS_MISS_RETRY_S):
                return found
        versions = self.court.terms_versions(node, model_id)
        with self._lock:
            self._terms[key] = (now, versions)
        return in_force(versions, at)


def in_force(versions: Iterable[Terms], at: int) -> Terms | None:
    """The court's `termsAt`: the latest version valid from `at` or earlier."""
    found = None
    for t in versions:
        if t.valid_from <= at:
            found = t
    return found
