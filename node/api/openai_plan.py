"""An OpenAI request read and checked against the node's engine and limits: a `Plan` ready for the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from dcml.node.api.errors import BadRequest, ModelNotFound, PayloadTooLarge
from dcml.node.api.protocol import ChatCompletionRequest, CompletionRequest
from dcml.node.api.state import NodeState
from dcml.node.engine.base import GenerationRequest, SamplingParams

Kind = Literal["chat", "completion"]
# Fields the node decides or reads itself; every other field a client sets goes to the engine as sent.
_NODE_FIELDS = frozenset({"model", "messages", "prompt", "stream", "stream_options", "max_tokens",
                          "max_completion_tokens"})
# Values that ask for nothing: an engine that does not implement the field still takes them.
_NEUTRAL = {"n": 1, "echo": False, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0,
            "repetition_penalty": 1, "parallel_tool_calls": True}
_MISSING = object()


@dataclass
class Plan:
    """A validated request, ready for the engine."""

    kind: Kind
    model: str
    generation: GenerationRequest
    prompt_tokens: int
    stream: bool
    include_usage: bool


def parse(kind: Kind, body: bytes, state: NodeState) -> Plan:
    model_cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        req = model_cls.model_validate_json(body)
        prompt = (state.engine.render_chat([{"role": m.role, "content": m.text()} for m in req.messages])
                  if isinstance(req, ChatCompletionRequest) else req.prompt_text())
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            raise BadRequest("Request body is not valid JSON: " + err["msg"], code="invalid_json") from None
        param = ".".join(str(p) for p in err["loc"]) or None
        raise BadRequest(f"Invalid value for {param or 'the request'}: {err['msg']}", param=param) from None
    except ValueError as exc:
        raise BadRequest(str(exc), param="prompt") from None
    engine, limits = state.engine, state.settings.limits
    if req.model != engine.model_name:
        raise ModelNotFound(engine.model_name)
    fields = {k: v for k, v in req.model_dump(exclude_unset=True).items() if k not in _NODE_FIELDS}
    _refuse_unsupported(engine, fields)

    prompt_tokens = engine.count_tokens(prompt)
    prompt_cap = min(limits.max_prompt_tokens, engine.max_context - 1)
    if prompt_tokens > prompt_cap:
        raise PayloadTooLarge(f"The prompt has {prompt_tokens} tokens; this node accepts at most {prompt_cap}. "
                              "Shorten the prompt or the conversation.", param="messages" if kind == "chat"
                              else "prompt", code="prompt_too_long")
    room = engine.max_context - prompt_tokens
    requested = req.requested_max_tokens()
    if requested is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens_cap, room)
    elif requested > limits.max_tokens_cap:
        raise BadRequest(f"max_tokens={requested} is above this node's cap of {limits.max_tokens_cap}; ask for "
                         "fewer tokens.", param="max_tokens", code="max_tokens_too_large")
    elif requested > room:
        raise BadRequest(f"This model's maximum context length is {engine.max_context} tokens. However, you "
                         f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
                         f"{requested} in the completion). Reduce max_tokens or the prompt.",
                         param="max_tokens", code="context_length_exceeded")
    else:
        max_tokens = requested
    params = SamplingParams(max_tokens=max_tokens,
                            temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p,
                            seed=req.seed, stop=req.stop_tuple())
    messages = ([m.model_dump(exclude_unset=True) for m in req.messages]
                if isinstance(req, ChatCompletionRequest) else None)
    generation = GenerationRequest(prompt=prompt, params=params, upstream=fields, messages=messages)
    return Plan(kind, req.model, generation, prompt_tokens, req.stream, req.include_usage)


def _refuse_unsupported(engine: object, fields: dict) -> None:
    """An engine that lists what it implements (`supported_params`) gets a 400 naming any other field a client
    sets, rather than silently ignoring it; None (the openai/vLLM engine) forwards them all."""
    supported = getattr(engine, "supported_params", None)
    if supported is None:
        return
    for name, value in fields.items():
        neutral = _NEUTRAL.get(name, _MISSING)
        # bool-ness must match too: completions' `logprobs: 0` asks for the sampled token's logprob
        if name in supported or value is None or (value == neutral and isinstance(value, bool) == isinstance(
                neutral, bool)):
            continue
        raise BadRequest(f"`{name}` is not supported by this node's engine; remove it (supported: "
                         f"{', '.join(sorted(supported | _NODE_FIELDS))}).", param=name, code="unsupported_parameter")
