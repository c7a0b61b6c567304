"""convert_meta_checkpoint against an independent implementation of Meta's Llama 2 forward pass."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from modelscope_llama2.cli import main
from modelscope_llama2.checkpoints.convert_meta import convert_meta_checkpoint, intermediate_size
from modelscope_llama2.tokenizer import Llama2Tokenizer
from tests.helpers import GQA, MHA, meta_weights, write_meta_release

TOKENS = torch.tensor([[1, 15, 200, 3, 77, 310, 42, 9, 128, 64, 2, 5]])
def meta_forward(weights, params, tokens):
    """Llama 2 as Meta's model.py computes it: complex rotary on adjacent pairs, GQA by repeating kv heads."""
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads", n_heads)
    head_dim = params["dim"] // n_heads
    seq = tokens.shape[1]

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + params["norm_eps"]) * weight

    angles = torch.outer(torch.arange(seq).float(),
                         1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    rotations = torch.polar(torch.ones_like(angles), angles)  # (seq, head_dim/2), complex

    def rotate(x):  # (batch, seq, heads, head_dim): consecutive pairs are complex numbers
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * rotations[None, :, None, :]).flatten(3)

    causal = torch.full((seq, seq), float("-inf")).triu(1)
    h = weights["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        w = {name[len(f"layers.{i}."):]: t for name, t in weights.items() if name.startswith(f"layers.{i}.")}
        x = rms_norm(h, w["attention_norm.weight"])
        q = rotate((x @ w["attention.wq.weight"].T).view(1, seq, n_heads, head_dim))
        k = rotate((x @ w["attention.wk.weight"].T).view(1, seq, n_kv_heads, head_dim))
        v = (x @ w["attention.wv.weight"].T).view(1, seq, n_kv_heads, head_dim)
        k, v = (t.repeat_interleave(n_heads // n_kv_heads, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = F.softmax(q @ k.transpose(2, 3) / math.sqrt(head_dim) + causal, dim=-1)
        attended = (scores @ v).transpose(1, 2).reshape(1, seq, -1)
        h = h + attended @ w["attention.wo.weight"].T
        x = rms_norm(h, w["ffn_norm.weight"])
        h = h + (F.silu(x @ w["feed_forward.w1.weight"].T) * (x @ w["feed_forward.w3.weight"].T)) \
            @ w["feed_forward.w2.weight"].T
    return rms_norm(h, weights["norm.weight"]) @ weights["output.weight"].T


@pytest.fixture(scope="module")
def vocab(tiny_dir):
    return Llama2Tokenizer.from_pretrained(tiny_dir)


def _release(tmp_path, tiny_dir, params, n_shards, vocab_size):
    """A Meta release dir under ``tmp_path/llama-2-tiny-chat`` with tokenizer.model in the parent, as Meta ships it."""
    shutil.copy(os.path.join(tiny_dir, "tokenizer.model"), tmp_path / "tokenizer.model")
    weights = meta_weights(params, vocab_size)
    write_meta_release(str(tmp_path / "llama-2-tiny-chat"), params, weights, n_shards)
    return str(tmp_path / "llama-2-tiny-chat"), weights


@pytest.mark.parametrize("params", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("n_shards", [1, 2])
def test_converted_logits_equal_metas_forward_pass(tmp_path, tiny_dir, vocab, params, n_shards):
    meta_dir, weights = _release(tmp_path, tiny_dir, params, n_shards, vocab.vocab_size)
    out = convert_meta_checkpoint(meta_dir, str(tmp_path / "out"), dtype="float32", max_shard_size="100KB")

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_key_value_heads == params.get("n_kv_heads", params["n_heads"])
    assert model.config.intermediate_size == intermediate_size(params)
    assert model.config.vocab_size == vocab.vocab_size  # vocab_size -1 came from the tokenizer
    with torch.no_grad():
        logits = model(TOKENS).logits
        expected = meta_forward(weights, params, TOKENS)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 1


def test_intermediate_size_follows_metas_rounding():
    assert intermediate_size({"dim": 4096, "multiple_of": 256}) == 11008  # 7B
    assert intermediate_size({"dim": 5120, "multiple_of": 256}) == 13824  # 13B
    assert intermediate_size({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3}) == 28672  # 70B


def test_convert_command_casts_to_the_requested_dtype(tmp_path, tiny_dir, vocab):
    meta_dir, weights = _release(tmp_path, tiny_dir, GQA, 2, vocab.vocab_size)
    out = str(tmp_path / "out16")
    assert main(["convert", meta_dir, out, "--dtype", "float16",
                 "--tokenizer", str(tmp_path / "tokenizer.model")]) == 0
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        norm = f.get_tensor("model.norm.weight")
    assert norm.dtype == torch.float16
    assert torch.equal(norm, weights["norm.weight"].half())
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "float16"


def test_bad_releases_are_clear_errors(tmp_path, tiny_dir, vocab):
    meta_dir, _ = _release(tmp_path, tiny_dir, MHA, 2, vocab.vocab_size)
    with pytest.raises(ValueError, match="dtype"):
        convert_meta_checkpoint(meta_dir, str(tmp_path / "o"), dtype="int8")
    with pytest.raises(FileNotFoundError, match="tokenizer_path: no tokenizer.model at"):
        convert_meta_checkpoint(meta_dir, str(tmp_path / "o"), tokenizer_path=str(tmp_path / "nope.model"))
    os.remove(os.path.join(meta_dir, "consolidated.01.pth"))
    os.rename(os.path.join(meta_dir, "consolidated.00.pth"), os.path.join(meta_dir, "consolidated.01.pth"))
    with pytest.raises(FileNotFoundError, match=r"meta_dir: shards \[1\] of .* are not 00..00"):
        convert_meta_checkpoint(meta_dir, str(tmp_path / "o"))
    with open(os.path.join(meta_dir, "params.json"), "w") as f:
        json.dump(dict(MHA, n_heads=None), f)
    with pytest.raises(ValueError, match="n_heads"):
        convert_meta_checkpoint(meta_dir, str(tmp_path / "o"))
    os.remove(os.path.join(meta_dir, "params.json"))
    with pytest.raises(FileNotFoundError, match="meta_dir: no params.json in"):
        convert_meta_checkpoint(meta_dir, str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")
