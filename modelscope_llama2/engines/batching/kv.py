"""The KV cache of the batching engine: fixed slots, one request per slot, written in place.

Every layer holds keys and values as ``[slots, kv_heads, slot_length, head_dim]``
tensors allocated once. A running request owns one slot and its token at
position ``p`` lives at index ``p``, so a decode step writes one column per
row and reads ``[:kv_len]`` back; nothing is concatenated or copied per
token. A finished request's slot keeps its KV (and the ids it holds) until
another request needs the slot: that is the prefix cache, bounded by the
bytes of the slots and evicted least recently used first
(:mod:`.engine`).

A forward pass :meth:`SlotCache.write` s each new token's keys into its
row's slot and :meth:`SlotCache.read` s the rows' keys back for attention
(:class:`SlotRows`: a view when their slots are consecutive).
"""

from typing import Any, List, Sequence

import torch

# Positions zeroed at once when a step reads past what a slot has initialised: a decode step reads one more
# position per row, and zeroing each one alone costs four tensor calls per row and step.
ZERO_CHUNK = 64


class SlotCache:
    """Preallocated keys and values for ``slots`` sequences of up to ``slot_length`` tokens each.

    Each layer's tensors sit on the device of that layer's attention (a
    ``device_map`` may spread layers over devices).

    Example:
        >>> from transformers import LlamaConfig
        >>> config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        ...                      num_hidden_layers=2, intermediate_size=128, vocab_size=100)
        >>> cache = SlotCache(config, slots=3, slot_length=16, dtype=torch.float32, devices=["cpu", "cpu"])
        >>> cache.keys[0].shape, cache.bytes_per_slot
        (torch.Size([3, 2, 16, 16]), 8192)
    """

    def __init__(self, config: Any, slots: int, slot_length: int, dtype: torch.dtype, devices: Sequence[Any]):
        self.slots, self.slot_length = slots, slot_length
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        shape = (slots, kv_heads, slot_length, head_dim)
        # empty, not zeros: pages are touched only where a step reads (see read_up_to).
        self.keys: List[torch.Tensor] = [torch.empty(shape, dtype=dtype, device=d) for d in devices]
        self.values: List[torch.Tensor] = [torch.empty(shape, dtype=dtype, device=d) for d in devices]
        self.bytes_per_slot = bytes_per_token(config, dtype) * slot_length
        self.initialised = [0] * slots  # per slot: positions [:n] hold finite values (KV or zeros)

    def read_up_to(self, slots: Sequence[int], kv_len: int) -> None:
        """Zero the positions ``[:kv_len]`` of ``slots`` that were never written, before a step reads them.

        A row shorter than the batch's longest reads, masked, positions its
        slot never wrote. Masks are additive, so NaN or inf in uninitialised
        memory would still poison the row (``NaN + min`` is NaN and
        ``0 * NaN`` is NaN in the weighted sum of values); stale finite KV of
        an earlier request is harmless.

        Example:
            >>> from transformers import LlamaConfig
            >>> config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, vocab_size=10)
            >>> cache = SlotCache(config, slots=2, slot_length=6, dtype=torch.float32, devices=["cpu"])
            >>> cache.keys[0].fill_(float("nan"))[0, 0, 0, 0].item()
            nan
            >>> cache.read_up_to([1], 4)
            >>> cache.keys[0][1].isnan().any().item(), cache.keys[0][0].isnan().all().item()
            (False, True)

        Zeroed ahead in chunks of :data:`ZERO_CHUNK` positions (up to the
        slot's end), so most decode steps zero nothing.
        """
        for slot in slots:
            start = self.initialised[slot]
            if start < kv_len:
                end = min(self.slot_length, max(kv_len, start + ZERO_CHUNK))
                for tensors in (self.keys, self.values):
                    for layer in tensors:
                        layer[slot, :, start:end].zero_()
                self.initialised[slot] = end

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``source`` into slot ``target`` (every layer)."""
        for tensors in (self.keys, self.values):
            for layer in tensors:
                layer[target, :, :length].copy_(layer[source, :, :length])
        self.initialised[target] = max(self.initialised[target], length)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store one layer's new ``keys``/``values`` ``[tokens, kv_heads, head_dim]``: token ``t`` at ``positions[t]``
        of slot ``slots[t]``."""
        # Advanced indices around a slice put the broadcast token dim first: [tokens, heads, dim].
        self.keys[layer][slots, :, positions] = keys.to(self.keys[layer].dtype)
        self.values[layer][slots, :, positions] = values.to(self.values[layer].dtype)

    def read(self, layer: int, rows: "SlotRows") -> "tuple[torch.Tensor, torch.Tensor]":
        """One layer's keys and values ``[rows, kv_heads, kv_len, head_dim]`` of ``rows``' slots."""
        keys, values = self.keys[layer], self.values[layer]
        if rows.span is not None:  # consecutive slots: a view, nothing copied
            return keys[rows.span, :, :rows.kv_len], values[rows.span, :, :rows.kv_len]
        index = rows.index(keys.device)  # others are gathered (only [:kv_len] is copied)
        return keys[:, :, :rows.kv_len].index_select(0, index), values[:, :, :rows.kv_len].index_select(0, index)


class SlotRows:
    """Slots read together in one attention call, up to ``kv_len`` positions each."""

    def __init__(self, slots: Sequence[int], kv_len: int):
        self.slots, self.kv_len = list(slots), kv_len
        first = self.slots[0]
        self.span = slice(first, first + len(self.slots)) if self.slots == list(range(first, first + len(self.slots))) \
            else None
        self._index: dict = {}  # per device: the slot ids as a tensor

    def index(self, device: torch.device) -> torch.Tensor:
        if device not in self._index:
            self._index[device] = torch.tensor(self.slots, device=device)
        return self._index[device]


def bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values of one token over every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
