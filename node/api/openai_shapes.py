"""vLLM's exact response and chunk objects (`/v1/chat/completions`, `/v1/completions`) for one answer."""

from __future__ import annotations

import copy
import json
import time
import uuid
from typing import Any

from dcml.node.api.openai_plan import Plan
from dcml.node.engine.base import EngineFailed, TokenChunk


def _json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


_json_str = json.JSONEncoder(ensure_ascii=False).encode  # a str's JSON, as `_json` writes it inside an object


def _str_bytes(text: str) -> bytes:
    return _json_str(text).encode()


class Shapes:
    """vLLM's response and chunk objects for one answer."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.created = int(time.time())
        # Node-generated, never from the client (a client-chosen id could collide with another's).
        self.id = ("chatcmpl-" if plan.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        # A plain text chunk (the common case) is this template around the JSON-encoded text: the same bytes
        # `chunk` would build (one dumps of a string instead of a whole object per token).
        if plan.kind == "chat":
            head = _json({**self._head("chat.completion.chunk"), "choices": [
                {"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": None}]})
            cut = head.index(b'"content":""') + len(b'"content":')
        else:
            head = _json({**self._head("text_completion"), "choices": [
                {"index": 0, "text": "", "logprobs": None, "finish_reason": None, "stop_reason": None}]})
            cut = head.index(b'"text":""') + len(b'"text":')
        self._before, self._after = head[:cut], head[cut + 2:]

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.plan.model}

    def usage(self, output_tokens: int) -> dict:
        p = self.plan.prompt_tokens
        return {"prompt_tokens": p, "total_tokens": p + output_tokens, "completion_tokens": output_tokens}

    def role_chunk(self) -> bytes:
        return _json({**self._head("chat.completion.chunk"), "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})

    def chunk(self, c: TokenChunk) -> bytes:
        if not c.delta and c.logprobs is None and c.finish_reason is None and c.stop_reason is None:
            return self._before + _str_bytes(c.text) + self._after
        if self.plan.kind == "chat":
            choice = {"index": 0, "delta": {"content": c.text, **(c.delta or {})}, "logprobs": c.logprobs,
                      "finish_reason": c.finish_reason}
            if c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
            return _json({**self._head("chat.completion.chunk"), "choices": [choice]})
        choice = {"index": 0, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason,
                  "stop_reason": c.stop_reason}
        return _json({**self._head("text_completion"), "choices": [choice]})

    def usage_chunk(self, output_tokens: int) -> bytes:
        obj = "chat.completion.chunk" if self.plan.kind == "chat" else "text_completion"
        return _json({**self._head(obj), "choices": [], "usage": self.usage(output_tokens)})

    def full(self, text: str, last: TokenChunk | None, output_tokens: int, logprobs: Any,
             extra: dict | None = None) -> bytes:
        finish, stop_reason = (last.finish_reason, last.stop_reason) if last is not None else (None, None)
        if self.plan.kind == "chat":
            message = {"role": "assistant", "content": text, **_message_fields(extra)}
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish,
                      "stop_reason": stop_reason}
            return _json({**self._head("chat.completion"), "choices": [choice], "usage": self.usage(output_tokens)})
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}
        return _json({**self._head("text_completion"), "choices": [choice], "usage": self.usage(output_tokens)})


def merge_logprobs(acc: Any, part: Any) -> Any:
    """Streamed logprobs pieces into one answer's: chat `{"content": [...]}`, completions a dict of lists."""
    if part is None:
        return acc
    if acc is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in part.items()}
    for k, v in part.items():
        if isinstance(v, list) and isinstance(acc.get(k), list):
            acc[k].extend(v)
    return acc


def merge_delta(acc: dict | None, part: dict | None) -> dict | None:
    """Streamed chat deltas beyond the text (tool_calls, reasoning, ...) into one message's fields, by the OpenAI
    SDK's own rules (strings concatenate, list entries merge by their `index`): vLLM's streamed tool call arrives
    as an id and name, then pieces of its arguments."""
    if not part:
        return acc
    # Imported here: the openai package costs ~0.4 s at start, and only upstream deltas need it (openai is pinned).
    from openai.lib.streaming._deltas import accumulate_delta

    try:
        return accumulate_delta(acc if acc is not None else {}, copy.deepcopy(part))
    except (TypeError, RuntimeError) as exc:  # entries without an integer index: not an OpenAI delta
        # Not `exc` itself: the SDK's message quotes the delta, i.e. model output, which must not reach a log.
        raise EngineFailed(f"the inference server sent a delta that cannot be merged ({type(exc).__name__})") \
            from None


def _message_fields(merged: dict | None) -> dict:
    """Merged deltas as a non-streamed message's fields: tool calls lose the `index` that only streaming uses."""
    if not merged:
        return {}
    out = dict(merged)
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [{k: v for k, v in tc.items() if k != "index"} if isinstance(tc, dict) else tc
                             for tc in out["tool_calls"]]
    return out
