"""Convert Meta's original Llama 2 release to a ModelScope checkpoint.

Meta's layout is ``params.json`` plus one ``consolidated.NN.pth`` per
model-parallel rank (1 for 7B, 2 for 13B, 8 for 70B), each holding its slice
of every weight, and ``tokenizer.model`` (in the same dir or its parent).
The output has the logits of Meta's model on the same tokens:

* slices are joined the way Meta split them: column-parallel weights (``wq``,
  ``wk``, ``wv``, ``w1``, ``w3``, ``output``) along dim 0, row-parallel
  weights (``wo``, ``w2``) and the embedding along dim 1; norms are
  replicated;
* Meta rotates adjacent pairs of each query/key head, transformers rotates
  its two halves, so the rows of ``wq``/``wk`` are permuted within each head
  (pairs ``(2i, 2i+1)`` -> rows ``(i, i + head_dim/2)``);
* GQA (``n_kv_heads``, 70B) and ``ffn_dim_multiplier`` set the key/value and
  MLP sizes; ``vocab_size: -1`` is taken from the tokenizer.

Shards are memory-mapped and copied one at a time into the output tensors,
so memory stays near one copy of the converted weights.

Example (on Meta's release dir; the doctests run it on a tiny release laid out
the same way, see ``conftest.py``):

    >>> from modelscope_llama2.checkpoints.convert_meta import convert_meta_checkpoint
    >>> convert_meta_checkpoint("llama-2-13b-chat", "Llama-2-13b-chat-ms", dtype="float16")
    'Llama-2-13b-chat-ms'
    >>> sorted(os.listdir("Llama-2-13b-chat-ms"))  # doctest: +NORMALIZE_WHITESPACE
    ['README.md', 'config.json', 'configuration.json', 'generation_config.json', 'model.safetensors',
     'tokenizer.model', 'tokenizer_config.json']
    >>> intermediate_size({"dim": 5120, "multiple_of": 256})  # 13B's MLP width
    13824
"""

import glob
import json
import os
import re
from typing import Any, Dict, List, Optional

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from ..constants import CHECKPOINT_DTYPES as DTYPES, CONTEXT_LENGTH
from ..tokenizer import VOCAB_FILE, Llama2Tokenizer
from .save import save_checkpoint

REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps")

# Meta name (with {i} for the layer) -> (transformers name, dim the ranks split, or None if replicated).
_LAYER_WEIGHTS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_GLOBAL_WEIGHTS = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}


def convert_meta_checkpoint(
    meta_dir: str,
    out_dir: str,
    *,
    tokenizer_path: Optional[str] = None,
    dtype: str = "float16",
    max_shard_size: str = "2GB",
) -> str:
    """Write the ModelScope checkpoint of Meta's release in ``meta_dir`` to ``out_dir``; return ``out_dir``.

    ``dtype`` is one of :data:`DTYPES` (Meta ships bfloat16; ModelScope's
    Llama 2 repos are float16). The save is atomic (see
    :func:`~modelscope_llama2.checkpoints.save.save_checkpoint`).

    Example:
        >>> convert_meta_checkpoint("llama-2-70b-chat", "out", tokenizer_path="tokenizer.model")
        'out'
        >>> convert_meta_checkpoint(DEMO_DIR, "out")  # not Meta's layout
        Traceback (most recent call last):
        ...
        FileNotFoundError: meta_dir: no params.json in ... (expected Meta's release layout)
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    params = read_params(meta_dir)
    shards = shard_paths(meta_dir)
    tokenizer = Llama2Tokenizer(_find_tokenizer(meta_dir, tokenizer_path))
    config = llama_config(params, tokenizer, len(shards))
    config.dtype = getattr(torch, dtype)
    weights = _merge_shards(shards, config, getattr(torch, dtype))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    model.generation_config = GenerationConfig(  # Meta's chat_completion defaults
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.6, top_p=0.9,
        max_length=CONTEXT_LENGTH,
    )
    return save_checkpoint(model, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)


def read_params(meta_dir: str) -> Dict[str, Any]:
    """``params.json`` of ``meta_dir``, checked for the fields the conversion needs."""
    path = os.path.join(meta_dir, "params.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"meta_dir: no params.json in {meta_dir} (expected Meta's release layout)")
    with open(path) as f:
        params = json.load(f)
    for name in REQUIRED_PARAMS:
        if not isinstance(params.get(name), (int, float)) or params[name] <= 0:
            raise ValueError(f"params.json: field {name!r} must be a positive number, got {params.get(name)!r}")
    n_kv_heads = params.get("n_kv_heads") or params["n_heads"]
    if params["dim"] % params["n_heads"] or params["n_heads"] % n_kv_heads:
        raise ValueError(f"params.json: n_heads {params['n_heads']} must divide dim {params['dim']} and be a "
                         f"multiple of n_kv_heads {n_kv_heads}")
    return params


def shard_paths(meta_dir: str) -> List[str]:
    """``consolidated.00.pth`` ... in rank order, checked to be complete."""
    paths = glob.glob(os.path.join(meta_dir, "consolidated.*.pth"))
    ranks = sorted(int(re.search(r"consolidated\.(\d+)\.pth$", p).group(1)) for p in paths)
    if not ranks:
        raise FileNotFoundError(f"meta_dir: no consolidated.NN.pth shards in {meta_dir}")
    if ranks != list(range(len(ranks))):
        raise FileNotFoundError(f"meta_dir: shards {ranks} of {meta_dir} are not 00..{len(ranks) - 1:02d}")
    return [os.path.join(meta_dir, f"consolidated.{rank:02d}.pth") for rank in ranks]


def intermediate_size(params: Dict[str, Any]) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * params["dim"]) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple = params["multiple_of"]
    return multiple * ((hidden + multiple - 1) // multiple)


def llama_config(params: Dict[str, Any], tokenizer: Llama2Tokenizer, n_shards: int) -> LlamaConfig:
    n_kv_heads = params.get("n_kv_heads") or params["n_heads"]
    if n_kv_heads % n_shards:
        raise ValueError(f"meta_dir: {n_shards} shards cannot split n_kv_heads {n_kv_heads}")
    vocab_size = params.get("vocab_size", -1)
    if vocab_size is None or vocab_size <= 0:
        vocab_size = tokenizer.vocab_size
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=params["dim"],
        intermediate_size=intermediate_size(params),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=params["norm_eps"],
        rope_theta=params.get("rope_theta", 10000.0),
        max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def rotary_permutation(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from Meta's adjacent pairs to transformers' halves."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _find_tokenizer(meta_dir: str, tokenizer_path: Optional[str]) -> str:
    candidates = [tokenizer_path] if tokenizer_path else [
        os.path.join(meta_dir, VOCAB_FILE), os.path.join(os.path.dirname(os.path.abspath(meta_dir)), VOCAB_FILE)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"tokenizer_path: no {VOCAB_FILE} at {' or '.join(candidates)}")


def _weight_map(config: LlamaConfig) -> Dict[str, tuple]:
    names = dict(_GLOBAL_WEIGHTS)
    for i in range(config.num_hidden_layers):
        for meta_name, (hf_name, dim) in _LAYER_WEIGHTS.items():
            names[f"layers.{i}.{meta_name}"] = (f"model.layers.{i}.{hf_name}", dim)
    return names


def _merge_shards(paths: List[str], config: LlamaConfig, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Copy each rank's slices into full tensors of ``dtype``, one memory-mapped shard at a time."""
    names, merged = _weight_map(config), {}
    head_dim = config.hidden_size // config.num_attention_heads
    for rank, path in enumerate(paths):
        shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        missing = set(names) - set(shard)
        if missing:
            raise ValueError(f"{path}: missing {len(missing)} weights, e.g. {sorted(missing)[0]}")
        for meta_name, (hf_name, dim) in names.items():
            piece = shard[meta_name]
            if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                # Every rank holds whole heads, so permuting a slice is permuting the whole.
                piece = rotary_permutation(piece, piece.shape[0] // head_dim)
            if hf_name not in merged:
                shape = list(piece.shape)
                if dim is not None:
                    shape[dim] *= len(paths)
                merged[hf_name] = torch.empty(shape, dtype=dtype)
            if dim is None:
                if rank == 0:
                    merged[hf_name].copy_(piece)
            else:
                merged[hf_name].narrow(dim, rank * piece.shape[dim], piece.shape[dim]).copy_(piece)
        del shard
    expected = config.vocab_size
    if merged["model.embed_tokens.weight"].shape[0] != expected:
        raise ValueError(f"params.json: vocab_size {expected} does not match the embedding's "
                         f"{merged['model.embed_tokens.weight'].shape[0]} rows")
    return merged
