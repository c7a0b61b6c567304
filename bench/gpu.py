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
The figure printed is each path's fraction of the bandwidth limit. Then the
engines on the same weights: the batching engine (what every server runs)
and the eager transformers engine (the Python API's), batch-1 decode and
32 requests at once (fixed length).

With ``--engines vllm`` (in the default when vLLM is installed) the same
shape runs on vLLM with random weights (``load_format="dummy"``: only
``config.json`` is written) twice, side by side on the GPU: this package's
``VllmEngine`` and raw ``vllm.LLM.generate`` on the same prompt ids. Each
figure is the engine's as a ratio against raw vLLM: batch-1 decode tokens/s
(short vs long, as above), 16-way batched throughput, and the time to first
token of each turn of a 9-turn conversation (prefix caching on for both).
The 13B shape is used when two copies fit (``--shape auto``), else 7B.

Run: ``python bench/gpu.py`` on a machine with one CUDA GPU (about 5 minutes
for the 13B shape, most of it compiling; vLLM adds 2-4 minutes). Without a
GPU it says so and exits 0. ``python bench/gpu.py --shape tiny --device cpu``
checks the logic on CPU (``--engines vllm`` there needs vLLM's CPU build).
"""

import argparse
import importlib.util
import json
import os
import random
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch
from transformers import CompileConfig, LlamaConfig

import checkpoint  # noqa: F401  (makes this checkout's package importable)
from timing import machine_line, median, table

# Requests in the engines' batched throughput figure.
ENGINE_BATCH = 32
SHAPES = {
    # Llama 2 13B: 40 layers, 40 heads (no GQA), hidden 5120, intermediate 13824.
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    # Llama 2 7B: 32 layers, 32 heads, hidden 4096, intermediate 11008.
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
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


# -- vLLM: the package's engine against raw vLLM -----------------------------------

VLLM_BATCH = 16
VLLM_TURNS = 9


def pick_shape(requested: str, device: torch.device) -> str:
    """``auto``: 13B when two fp16 copies and their KV caches fit the GPU (vLLM runs twice), else 7B."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "tiny"
    return "13b" if torch.cuda.get_device_properties(device).total_memory >= 100 * 2**30 else "7b"


def dummy_checkpoint(shape: str, dtype: torch.dtype) -> str:
    """A directory with only ``config.json``: vLLM's ``load_format='dummy'`` makes the random weights."""
    directory = tempfile.mkdtemp(prefix=f"llama2-{shape}-dummy-")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, dtype=dtype)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}, f)
    return directory


def vllm_sides(directory: str, dtype: torch.dtype, device: torch.device):
    """``(VllmEngine, raw vllm.LLM)`` on the same random weights and settings, sharing the GPU."""
    from vllm import LLM

    from modelscope_llama2.engines.vllm_engine import VllmEngine

    common = dict(dtype=str(dtype).replace("torch.", ""), load_format="dummy", max_model_len=4096,
                  enable_prefix_caching=True, seed=0)
    if device.type == "cuda":
        common["gpu_memory_utilization"] = 0.44  # two instances side by side
    else:
        common["kv_cache_memory_bytes"] = 1 << 30
    engine = VllmEngine(directory, **common)
    raw = LLM(model=directory, skip_tokenizer_init=True, disable_log_stats=True, **common)
    return engine, raw


def engine_timer(engine, prompts_ids: List[List[int]]) -> Callable[[int], float]:
    """Seconds for ``engine.generate`` to produce exactly ``n`` new tokens for each prompt."""
    from modelscope_llama2.prompts.prompt import Prompt, SamplingParams

    def run(n: int) -> float:
        prompts = [Prompt(tuple(ids), SamplingParams(n, options={"do_sample": False, "min_new_tokens": n}))
                   for ids in prompts_ids]
        start = time.perf_counter()
        produced = sum(len(event.token_ids) for event in engine.generate(prompts))
        elapsed = time.perf_counter() - start
        assert produced == n * len(prompts), produced
        return elapsed
    return run


def raw_timer(llm, prompts_ids: List[List[int]]) -> Callable[[int], float]:
    """Seconds for raw ``LLM.generate`` to produce exactly ``n`` new tokens for each prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def run(n: int) -> float:
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, detokenize=False)
        start = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts_ids], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert sum(len(o.outputs[0].token_ids) for o in outputs) == n * len(prompts_ids)
        return elapsed
    return run


def conversation(prompt_tokens: int, turns: int, vocab_size: int) -> List[List[int]]:
    """Prompt ids of each turn: the previous prompt, a 24-token answer and a new question, as chat history grows."""
    rng = random.Random(0)
    ids = [1] + [rng.randrange(3, vocab_size) for _ in range(prompt_tokens - 1)]
    prompts = [ids]
    for _ in range(turns - 1):
        ids = ids + [rng.randrange(3, vocab_size) for _ in range(24)] + [2, 1] + \
            [rng.randrange(3, vocab_size) for _ in range(40)]
        prompts.append(ids)
    return prompts


def measure_vllm(args: argparse.Namespace, shape: str, device: torch.device, dtype: torch.dtype) -> List[list]:
    """Rows ``[figure, engine, raw vLLM, engine/raw]`` for the three vLLM figures."""
    start = time.perf_counter()
    engine, raw = vllm_sides(dummy_checkpoint(shape, dtype), dtype, device)
    print(f"# vLLM {shape} {dtype}: two instances started in {time.perf_counter() - start:.0f} s")
    vocab = SHAPES[shape]["vocab_size"]
    rng = random.Random(1)
    one = [[1] + [rng.randrange(3, vocab) for _ in range(args.prompt - 1)]]
    many = [[1] + [rng.randrange(3, vocab) for _ in range(args.prompt - 1)] for _ in range(VLLM_BATCH)]
    rows = []
    pairs = [(decode_rate(engine_timer(engine, one), args.short, args.long, args.repeats),
              decode_rate(raw_timer(raw, one), args.short, args.long, args.repeats))]
    rows.append(["batch-1 decode tok/s", *pairs[0]])
    batch_engine, batch_raw = engine_timer(engine, many), raw_timer(raw, many)
    batch_engine(args.short), batch_raw(args.short)  # warm-up
    rows.append([f"{VLLM_BATCH}-way throughput tok/s",
                 VLLM_BATCH * args.long / median([batch_engine(args.long) for _ in range(args.repeats)]),
                 VLLM_BATCH * args.long / median([batch_raw(args.long) for _ in range(args.repeats)])])
    ttft_engine, ttft_raw = [], []
    for ids in conversation(args.prompt, VLLM_TURNS, vocab):
        ttft_engine.append(engine_timer(engine, [ids])(1))
        ttft_raw.append(raw_timer(raw, [ids])(1))
    for turns, label in ((slice(0, 3), "first 3"), (slice(-3, None), "last 3")):
        rows.append([f"TTFT ms, turns {label} (mean)", 1000 * sum(ttft_engine[turns]) / 3,
                     1000 * sum(ttft_raw[turns]) / 3])
    engine.close()
    return [row + [row[1] / row[2]] for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES) + ["auto"], default="auto",
                        help="auto: 13b on a GPU that holds two copies (vLLM runs twice), else 7b; tiny on CPU")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:N or cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="default: float16 on a GPU, float32 on CPU")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--short", type=int, default=16)
    parser.add_argument("--long", type=int, default=144)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--paths", default="default,static+compile")
    parser.add_argument("--engines", default=None,
                        help="transformers,vllm (default: both when vLLM is installed, else transformers)")
    args = parser.parse_args()
    engines = (args.engines or ("transformers,vllm" if importlib.util.find_spec("vllm") else "transformers"))

    device = pick_device(args.device)
    if device is None:
        print(f"gpu.py: no CUDA GPU here (--device {args.device}); nothing measured. Run it on a machine with "
              "one GPU, or check the logic with: python bench/gpu.py --shape tiny --device cpu")
        return 0
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "float16"))
    print(machine_line())
    if device.type == "cuda":
        print(f"# device: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")

    shape = pick_shape(args.shape, device)
    if "transformers" in engines.split(","):
        measure_transformers(args, shape, device, dtype)
    if "vllm" in engines.split(","):
        rows = measure_vllm(args, shape, device, dtype)
        print(f"\nvllm engine vs raw vLLM LLM.generate: {shape} {dtype}, random weights, prompt {args.prompt}, "
              f"greedy, median of {args.repeats}; TTFT over a {VLLM_TURNS}-turn conversation, prefix caching on")
        print(table(["figure", "vllm engine", "raw vLLM", "engine/raw"], rows))
    return 0


def measure_transformers(args: argparse.Namespace, shape: str, device: torch.device, dtype: torch.dtype) -> None:
    """Batch-1 decode of transformers' paths against the bandwidth limit (the model is freed afterwards)."""
    bandwidth = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 28)
    start = time.perf_counter()
    model = build_model(shape, device, dtype)
    weights = weight_bytes_per_token(model)
    limit = bandwidth / weights
    print(f"# {shape} {dtype}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
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
    print_engine_rows(measure_engines(args, model, limit))
    del model  # vLLM needs the memory next
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_engines(args: argparse.Namespace, model, limit: float) -> List[list]:
    """The serving engine vs the eager one on the same weights: batch-1 decode and batched throughput."""
    from modelscope_llama2.engines.batching import BatchingEngine
    from modelscope_llama2.engines.batching.kv import bytes_per_token
    from modelscope_llama2.engines.transformers_engine import TransformersEngine

    length = args.prompt + args.long + 8
    # Slots for the batch and as many idle ones: the KV of the run, not 90% of the GPU (vLLM comes next).
    batching = BatchingEngine(model, max_batch_size=ENGINE_BATCH, max_model_len=length,
                              kv_cache_bytes=2 * ENGINE_BATCH * length * bytes_per_token(model.config, model.dtype))
    eager = TransformersEngine(model)
    rng = random.Random(2)
    vocab = model.config.vocab_size
    one = [[1] + [rng.randrange(3, vocab) for _ in range(args.prompt - 1)]]
    many = [[1] + [rng.randrange(3, vocab) for _ in range(args.prompt - 1)] for _ in range(ENGINE_BATCH)]
    rows = []
    try:
        for name, engine in (("batching engine", batching), ("transformers engine (eager)", eager)):
            start = time.perf_counter()
            decode = decode_rate(engine_timer(engine, one), args.short, args.long, args.repeats)
            batch = engine_timer(engine, many)
            batch(args.short)  # warm-up at this batch size
            throughput = ENGINE_BATCH * args.long / median([batch(args.long) for _ in range(args.repeats)])
            rows.append([name, decode, decode / limit, throughput, round(time.perf_counter() - start)])
    finally:
        batching.close()
    return rows


def print_engine_rows(rows: List[list]) -> None:
    print(f"\nengines on the same weights: batch-1 decode and {ENGINE_BATCH}-way throughput (greedy, fixed length)")
    print(table(["engine", "batch-1 decode tok/s", "fraction of limit", f"{ENGINE_BATCH}-way tok/s", "wall s"], rows))
    if len(rows) == 2:
        print(f"{ENGINE_BATCH}-way throughput, batching / eager: {rows[0][3] / rows[1][3]:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
