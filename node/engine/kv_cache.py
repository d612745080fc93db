"""The embedded engine's KV cache layer: keys and values in a buffer with spare room, so decoding appends in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer


class BufferedLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values sit in a buffer with spare room on the sequence
    axis, so a decode step appends in place. (DynamicLayer appends with torch.cat, copying the whole
    batch's cache every step: O(batch x length) per token, which dominated large batches.) Copies
    happen only when the batch's membership changes (`reset_to`) or the buffer is full."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.reset_to(keys, values)

    def reset_to(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 64) -> None:
        b, h, n, d = keys.shape
        self._kbuf = keys.new_empty(b, h, n + spare, d)
        self._vbuf = values.new_empty(b, values.shape[1], n + spare, values.shape[3])
        self._kbuf[:, :, :n] = keys
        self._vbuf[:, :, :n] = values
        self._n = n
        self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        k = key_states.shape[2]
        if self._n + k > self._kbuf.shape[2]:
            self.reset_to(*kv(self), spare=max(64, self._n))  # grow geometrically
        self._kbuf[:, :, self._n : self._n + k] = key_states
        self._vbuf[:, :, self._n : self._n + k] = value_states
        self._n += k
        self.keys, self.values = self._kbuf[:, :, : self._n], self._vbuf[:, :, : self._n]
        return self.keys, self.values


def kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled full-attention layer's keys and values (transformers types them optional)."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    assert keys is not None and values is not None, "an empty cache layer"
    return keys, values


def left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad a [B, H, L, D] cache tensor on the left (sequence axis) to `length`."""
    return F.pad(t, (0, 0, length - t.shape[2], 0))
