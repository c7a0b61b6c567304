"""One forward pass of the batching engine: every row's ids packed into one sequence, attention per row over its slot.

A step feeds prompt chunks (many ids of one request) and decode rows (one
id each) together: their ids make one ``[1, tokens]`` sequence with no
padding, so the projections and MLPs of the whole step are one set of
matrix products, and a request arriving while others decode costs no
forward pass of its own. Attention is the only part that needs to know
the rows: the one-id rows attend together, batched over their slots; each
prompt chunk attends alone over its own slot, causally. Both call the
model's own attention function (``config._attn_implementation``: sdpa,
eager...) with the shapes ``generate()`` gives it.

The layers are transformers' Llama modules called one by one, as
``LlamaDecoderLayer.forward`` calls them, without the per-call wrappers
(argument deprecation, output capturing, mask building) that cost more
than the products of a small model's decode step.

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> from .kv import SlotCache
    >>> model = AutoModelForCausalLM.from_pretrained(DEMO_DIR)
    >>> kv = SlotCache(model.config, 2, 64, model.dtype, ["cpu"] * model.config.num_hidden_layers)
    >>> packed = PackedModel(model)
    >>> step = PackedStep([(0, 0, [1, 3, 4, 5])], kv, "cpu", model.dtype)
    >>> with torch.inference_mode():
    ...     logits = packed.head(packed.hidden(kv, step)[0, step.last])
    ...     reference = model(torch.tensor([[1, 3, 4, 5]])).logits[0, -1]
    >>> torch.allclose(logits, reference, atol=1e-5)
    True
"""

import itertools
from typing import Any, List, Sequence, Tuple

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .kv import SlotCache, SlotRows


class PackedStep:
    """The layout of one forward pass over ``rows``: ``(slot, length, ids)`` each, ids fed at positions
    ``length, length + 1, ...`` of its slot.

    Rows feeding several ids must come before the rows feeding one (the
    one-id rows are one contiguous block of the packed sequence).
    ``last[i]``: where row ``i``'s last id sits in the packed sequence.
    """

    def __init__(self, rows: Sequence[Tuple[int, int, List[int]]], kv: SlotCache, device: Any, dtype: torch.dtype):
        ids = [token for _, _, feed in rows for token in feed]
        positions = [p for _, length, feed in rows for p in range(length, length + len(feed))]
        slots = [slot for slot, _, feed in rows for _ in feed]
        self.input_ids = torch.tensor([ids], device=device)
        self.position_ids = torch.tensor([positions], device=device)
        self.slots = torch.tensor(slots, device=device)
        ends = list(itertools.accumulate(len(feed) for _, _, feed in rows))
        self.last = [end - 1 for end in ends]
        self._min = torch.finfo(dtype).min
        self._dtype = dtype
        # Prompt chunks: (start in the packed sequence, how many ids, the slot to read, causal mask).
        self.chunks = []
        singles = []
        for (slot, length, feed), end in zip(rows, ends):
            if len(feed) > 1:
                if singles:
                    raise ValueError("rows: the rows feeding several ids come before those feeding one")
                reads = SlotRows([slot], length + len(feed))
                kv.read_up_to(reads.slots, reads.kv_len)
                self.chunks.append((end - len(feed), len(feed), reads, self._mask([length], len(feed), reads.kv_len,
                                                                                   device)))
            else:
                singles.append((slot, length))
        # The one-id rows: (start, their slots to read, mask); each row sees its slot up to its own position.
        self.single = None
        if singles:
            reads = SlotRows([slot for slot, _ in singles], max(length for _, length in singles) + 1)
            kv.read_up_to(reads.slots, reads.kv_len)
            self.single = (ends[-1] - len(singles), reads,
                           self._mask([length for _, length in singles], 1, reads.kv_len, device))

    def _mask(self, lengths: List[int], q: int, kv_len: int, device: Any) -> torch.Tensor:
        """Additive masks ``[rows, 1, q, kv_len]``: query ``j`` of a row at ``length`` sees positions up to
        ``length + j``."""
        positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(q, device=device)
        visible = torch.arange(kv_len, device=device)[None, None, :] <= positions[:, :, None]
        return torch.full(visible.shape, self._min, dtype=self._dtype, device=device).masked_fill_(visible, 0.0)[:, None]

    def attend(self, attention: Any, module: Any, layer: int, kv: SlotCache, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> torch.Tensor:
        """One layer's attention output ``[1, tokens, heads * head_dim]`` for the packed ``query/key/value``
        ``[1, heads, tokens, head_dim]``; the new keys and values are stored in the slots first."""
        device = kv.keys[layer].device
        kv.write(layer, self.slots.to(device), self.position_ids[0].to(device), key[0].transpose(0, 1),
                 value[0].transpose(0, 1))
        pieces = []
        for start, n, reads, mask in self.chunks:
            keys, values = kv.read(layer, reads)
            out, _ = attention(module, query[:, :, start:start + n], keys, values, mask.to(device), dropout=0.0,
                               scaling=module.scaling)
            pieces.append(out.reshape(n, -1))
        if self.single is not None:
            start, reads, mask = self.single
            rows = len(reads.slots)
            keys, values = kv.read(layer, reads)
            out, _ = attention(module, query[0, :, start:start + rows].transpose(0, 1)[:, :, None], keys, values,
                               mask.to(device), dropout=0.0, scaling=module.scaling)
            pieces.append(out.reshape(rows, -1))
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces))[None]


class PackedModel:
    """A causal LM's parts a packed forward pass uses, looked up once (each lookup walks modules or parameters).

    ``hidden(kv, step)``: the final hidden states ``[1, tokens, hidden]`` of
    ``step``'s packed ids; ``head``: the LM head, applied by the caller to
    the positions it needs.
    """

    def __init__(self, model: Any):
        self.body = model.model
        self.layers = list(self.body.layers[:model.config.num_hidden_layers])
        self.head = model.get_output_embeddings()
        self.dtype = model.dtype
        # As LlamaAttention looks its attention function up (sdpa, eager...).
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation,
                                                               eager_attention_forward)
        self.devices = [layer.self_attn.k_proj.weight.device for layer in self.layers]
        self._moves = len(set(self.devices)) > 1  # a device_map spread the layers

    def hidden(self, kv: SlotCache, step: PackedStep) -> torch.Tensor:
        hidden = self.body.embed_tokens(step.input_ids)
        cos, sin = self.body.rotary_emb(hidden, position_ids=step.position_ids)
        for index, layer in enumerate(self.layers):
            if self._moves:
                hidden, cos, sin = (t.to(self.devices[index]) for t in (hidden, cos, sin))
            residual = hidden
            hidden = residual + _self_attention(layer.self_attn, index, layer.input_layernorm(hidden), cos, sin, kv,
                                                step, self.attention)
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.body.norm(hidden)


def _self_attention(module: Any, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv: SlotCache, step: PackedStep, attention: Any) -> torch.Tensor:
    """``LlamaAttention.forward`` with the slots as its cache and attention per row group."""
    shape = (*hidden.shape[:-1], -1, module.head_dim)
    query = module.q_proj(hidden).view(shape).transpose(1, 2)
    key = module.k_proj(hidden).view(shape).transpose(1, 2)
    value = module.v_proj(hidden).view(shape).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    return module.o_proj(step.attend(attention, module, layer, kv, query, key, value))
