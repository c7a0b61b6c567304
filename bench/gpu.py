"""Batch-1 decode tokens/s of a 13B-shaped fp16 Llama 2 on one GPU vs the memory-bandwidth limit.

Batch-1 decoding reads every weight once per token, so its ceiling is
``bandwidth / weight bytes per token``. The bandwidth is measured here (a
device-to-device copy of 1 GiB: bytes read + bytes written per second), and
so is the decode rate of two paths on the same random-weight model, built
directly on the device as this package's ``Llama2ForChat`` (no checkpoint is
written or downloaded):

* ``default``: ``generate()`` with transformers' dynamic KV cache, eager;
  what ``chat()`` runs per token (see bench/decode.py for chat() vs generate()).
* ``static+compile``: ``generate(cache_implementation="static")`` with a
  ``CompileConfig(mode="reduce-overhead")``: transformers 5 then compiles the
  decode step with ``torch.compile`` (CUDA graphs on a GPU) and keeps
  prefill eager. The cache is sized once (``max_cache_len``) so the short
  and long runs share one compiled graph.

Decode tokens/s = (long - short) / (t_long - t_short), so prefill cancels.
The figure printed is each path's fraction of the bandwidth limit.

Run: ``python bench/gpu.py`` on a machine with one CUDA GPU (about 5 minutes
for the 13B shape, most of it compiling). Without a GPU it says so and exits
0. ``python bench/gpu.py --shape tiny --device cpu`` checks the logic on CPU.
"""

import argparse
import time
from typing import Callable, Dict, Optional

import torch
from transformers import CompileConfig, LlamaConfig

import checkpoint  # noqa: F401  (makes this checkout's package importable)
from timing import machine_line, median, table

SHAPES = {
    # Llama 2 13B: 40 layers, 40 heads (no GQA), hidden 5120, intermediate 13824.
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32000),
}


def pick_device(requested: str) -> Optional[torch.device]:
    """The device to use, or ``None`` when CUDA is asked for (or auto) and there is none."""
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda" if requested == "auto" else requested)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of ``dst.copy_(src)`` on the device, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    """This package's model class with random weights, created on the device (nothing written to disk)."""
    from modelscope_llama2 import Llama2ForChat

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama2ForChat._from_config(config, dtype=dtype)
    return model.eval()


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: all of them, except the embedding table (one row is read)."""
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    return total + embed.shape[1] * embed.element_size()


def paths(compile_backend: str, max_cache_len: int, device: torch.device) -> Dict[str, dict]:
    """``generate()`` settings of each measured path."""
    compile_config = CompileConfig(backend=compile_backend, mode="reduce-overhead")
    # transformers only auto-compiles on accelerators; this flag lets the CPU logic check compile too.
    compile_config._compile_all_devices = device.type == "cpu"
    return {
        "default": {},
        "static+compile": {"cache_implementation": "static", "max_cache_len": max_cache_len,
                           "compile_config": compile_config},
    }


def generate_timer(model, prompt: torch.Tensor, settings: dict) -> Callable[[int], float]:
    """A function timing one greedy ``generate()`` of exactly ``n`` new tokens."""
    def run(n: int) -> float:
        sync(prompt.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0, **settings)
        sync(prompt.device)
        assert out.shape[1] == prompt.shape[1] + n, out.shape
        return time.perf_counter() - start
    return run


def decode_rate(run: Callable[[int], float], short: int, long: int, repeats: int) -> float:
    """Tokens/s between a short and a long generation (prefill cancels); two warm-ups compile and record graphs."""
    run(long)
    run(long)
    t_short = median([run(short) for _ in range(repeats)])
    t_long = median([run(long) for _ in range(repeats)])
    return (long - short) / (t_long - t_short)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="13b")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:N or cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="default: float16 on a GPU, float32 on CPU")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--short", type=int, default=16)
    parser.add_argument("--long", type=int, default=144)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--paths", default="default,static+compile")
    args = parser.parse_args()

    device = pick_device(args.device)
    if device is None:
        print(f"gpu.py: no CUDA GPU here (--device {args.device}); nothing measured. Run it on a machine with "
              "one GPU, or check the logic with: python bench/gpu.py --shape tiny --device cpu")
        return 0
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "float16"))
    print(machine_line())
    if device.type == "cuda":
        print(f"# device: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")

    bandwidth = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 28)
    start = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    weights = weight_bytes_per_token(model)
    limit = bandwidth / weights
    print(f"# {args.shape} {dtype}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"{weights / 2**30:.2f} GiB read per token, built in {time.perf_counter() - start:.0f} s; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s -> limit {limit:.1f} tokens/s")

    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt), device=device)
    settings = paths(args.compile_backend, args.prompt + args.long, device)
    rows = []
    for name in args.paths.split(","):
        start = time.perf_counter()
        rate = decode_rate(generate_timer(model, prompt, settings[name]), args.short, args.long, args.repeats)
        # transformers silently skips compiling when its criteria fail: say whether it did.
        compiled = "compile_config" in settings[name] and hasattr(model, "_compiled_call")
        rows.append([name, "yes" if compiled else "no", rate, limit, rate / limit, round(time.perf_counter() - start)])
    print(f"\ngpu decode: batch 1, prompt {args.prompt}, {args.short} vs {args.long} new tokens, greedy, "
          f"median of {args.repeats}")
    print(table(["path", "compiled", "decode tok/s", "bandwidth limit tok/s", "fraction of limit", "wall s"], rows))
    if len(rows) == 2:
        print(f"{rows[1][0]} / {rows[0][0]}: {rows[1][2] / rows[0][2]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
