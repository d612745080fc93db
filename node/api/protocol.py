"""OpenAI request models (the fields this node honours; unknown extra fields are tolerated as OpenAI does)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

# Positive values below these are refused (400), not silently changed: logits divided by a smaller temperature
# overflow float32 (vLLM clamps to the same 1e-2), and a smaller top_p rounds to zero in float32.
MIN_TEMPERATURE = 1e-2
MIN_TOP_P = 1e-6


class _Model(BaseModel):
    # strict: a string where a number belongs is a 400, not silently coerced.
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Model):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Sampling(_Model):
    model: str
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=1)  # one choice per request: receipts sign one answer
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what a torch generator can be seeded with
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be defined when stream=true")
        return self

    @field_validator("temperature")
    @classmethod
    def _usable_temperature(cls, v: float | None) -> float | None:
        if v is not None and 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"a positive temperature below {MIN_TEMPERATURE} cannot be sampled in float32 (the "
                             "logits overflow); send 0 for greedy decoding")
        return v

    @field_validator("top_p")
    @classmethod
    def _usable_top_p(cls, v: float | None) -> float | None:
        if v is not None and v < MIN_TOP_P:
            raise ValueError(f"top_p below {MIN_TOP_P} is not representable; send temperature 0 for greedy decoding")
        return v

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: StrictBool = False

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("this node takes exactly one prompt per request")
            return self.prompt[0]
        return self.prompt

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
