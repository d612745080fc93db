"""The one interface every inference engine implements: stream tokens for a request, count tokens.

The HTTP layer and the payment gate only ever see this; engines know nothing of payments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from dcml.client.wire.errors import DcmlError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt already rendered to text (chat templates are applied by the API layer via the engine)."""

    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    # For an engine that forwards requests (openai/vLLM): the client's own fields exactly as sent (sampling,
    # logprobs, response_format, tools, ...; never model, prompt, stream or max_tokens, which the node decides),
    # so the upstream applies its own defaults. None: an internal request, described by `params` alone.
    upstream: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None  # a chat request's messages as sent (the prompt is their render)


@dataclass(frozen=True)
class TokenChunk:
    """One step of a stream: new text (may be empty for a token that completes no character),
    how many output tokens it stands for, and a finish reason on the last chunk ("stop" or "length")."""

    text: str
    tokens: int = 1
    finish_reason: str | None = None
    # From an upstream, carried to the client as sent: the choice's logprobs and stop_reason, other delta fields
    # of a chat chunk (tool_calls, ...), and on the last chunk the upstream's usage (cross-checked by the API).
    logprobs: Any = None
    stop_reason: int | str | None = None
    delta: dict[str, Any] | None = None
    usage: dict[str, int] | None = None


class EngineOverloaded(DcmlError):
    """The engine's queue is full; the API answers 429."""

    reason = "overloaded"


class EngineUnavailable(DcmlError):
    """The engine (e.g. the vLLM beside the node) is down or not ready yet; the API answers 503."""

    reason = "engine_unavailable"


class EngineFailed(DcmlError, RuntimeError):
    """The engine broke while answering (e.g. the vLLM beside the node died mid-stream)."""

    reason = "engine_failed"


class EngineRejected(DcmlError):
    """The upstream refused the request as invalid (its 4xx): the API answers with that status and message."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message, reason="invalid_value" if status == 400 else f"upstream_{status}")
        self.status, self.param = status, param


class Engine(Protocol):
    model_name: str
    max_context: int  # prompt tokens + max_tokens must fit

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def count_tokens(self, text: str) -> int: ...

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Render OpenAI-style chat messages into the prompt text the model expects."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Yield chunks as tokens are produced; the last chunk has finish_reason set.
        Raises EngineOverloaded before the first chunk when it cannot take the request."""
        ...

    def queue_depth(self) -> int: ...
