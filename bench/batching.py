"""The batching engine on its own: 8 concurrent clients vs one at a time, and multi-turn time to first token.

Engine level (no HTTP), so settings the server does not take yet
(``SamplingParams.ignore_eos``) can be measured. A random Llama 2-shaped
model is built in memory (``--shape``; no tokenizer needed: prompts are
ids). Three figures, each from alternating rounds in one run, median of
``--rounds``:

* **fixed length**: greedy requests with ``ignore_eos`` (every answer exactly
  ``--max-tokens``), 8 client threads each calling ``engine.generate()`` as
  a server's handlers do, vs the same requests one after another;
  generated tokens/s ratio, target >= 3x.
* **sampled**: the same with temperature 0.8, top-p 0.95 and a seed per
  request (a seeded request gives the same tokens alone and in a batch,
  so both sides generate the same tokens); target >= 3x.
* **multi-turn**: one 9-turn conversation (system prompt, questions and
  answers of realistic lengths); time to first token of turn 8 over turn 1
  with the previous turns' KV reused (``cached_tokens``); target <= 1.5.

Run: ``python bench/batching.py`` (2-6 minutes on 2 idle cores).
"""

import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from modelscope_llama2.engines.batching import BatchingEngine  # noqa: E402
from modelscope_llama2.prompts.prompt import Prompt, SamplingParams  # noqa: E402

from timing import base_parser, setup, table, verdict  # noqa: E402

SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "demo": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4),
}
PEAKING = 25.0
SAMPLED = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}
GREEDY = {"do_sample": False}


def build_model(shape: str) -> LlamaForCausalLM:
    """Random weights; the output layer scaled up so next-token distributions are peaked as a trained
    model's are (random weights give a near-uniform one, whose top-p nucleus is most of the vocabulary)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, **SHAPES[shape])
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(PEAKING)
    return model


def requests(count: int, max_tokens: int, options: dict, ignore_eos: bool, rng: random.Random) -> List[Prompt]:
    prompts = []
    for i in range(count):
        ids = (1, *(rng.randrange(3, 32000) for _ in range(rng.randrange(24, 64))))
        prompts.append(Prompt(ids, SamplingParams(max_new_tokens=max_tokens, options=options, ignore_eos=ignore_eos,
                                                  seed=i if options.get("do_sample") else None)))
    return prompts


def one(engine: BatchingEngine, prompt: Prompt) -> int:
    return sum(len(event.token_ids) for event in engine.generate([prompt]))


def rate(engine: BatchingEngine, prompts: List[Prompt], clients: int) -> float:
    """Generated tokens/s of ``prompts`` from ``clients`` threads (1: one after another)."""
    start = time.perf_counter()
    if clients == 1:
        tokens = sum(one(engine, p) for p in prompts)
    else:
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(lambda p: one(engine, p), prompts))
    return tokens / (time.perf_counter() - start)


def fresh(prompts: List[Prompt]) -> List[Prompt]:
    """The same requests under new ids (the engine refuses an id that is still generating)."""
    return [Prompt(p.token_ids, p.sampling) for p in prompts]


def throughput(engine: BatchingEngine, prompts: List[Prompt], clients: int, rounds: int) -> Tuple[float, float, float]:
    """(median sequential tok/s, median concurrent tok/s, median per-round ratio), rounds alternating."""
    sequential, concurrent, ratios = [], [], []
    for _ in range(rounds):
        sequential.append(rate(engine, fresh(prompts), 1))
        concurrent.append(rate(engine, fresh(prompts), clients))
        ratios.append(concurrent[-1] / sequential[-1])
    return statistics.median(sequential), statistics.median(concurrent), statistics.median(ratios)


def first_token_seconds(engine: BatchingEngine, prompt: Prompt) -> Tuple[float, List[int], int]:
    start, first, ids, cached = time.perf_counter(), None, [], 0
    for event in engine.generate([prompt]):
        if first is None and event.token_ids:
            first = time.perf_counter() - start
        ids.extend(event.token_ids)
        if event.finished:
            cached = event.usage.cached_tokens
    return first or time.perf_counter() - start, ids, cached


def multiturn(engine: BatchingEngine, rng: random.Random, turns: int = 9) -> Tuple[List[float], List[int]]:
    """TTFT and cached tokens per turn of one conversation: a 120-token system prompt, 40-token questions."""
    ids = [1, *(rng.randrange(3, 32000) for _ in range(120))]
    ttfts, cached = [], []
    for _ in range(turns):
        ids += [rng.randrange(3, 32000) for _ in range(40)]
        prompt = Prompt(tuple(ids), SamplingParams(max_new_tokens=48, options=GREEDY, ignore_eos=True))
        ttft, answer, hit = first_token_seconds(engine, prompt)
        ttfts.append(ttft)
        cached.append(hit)
        ids += answer + [2, 1]  # EOS, then the next round's BOS, as Meta's format has it
    return ttfts, cached


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    setup(args.threads)
    model = build_model(args.shape)
    print(f"shape {args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, fp32, "
          f"{args.requests} requests x {args.max_tokens} tokens, {args.clients} clients, "
          f"median of {args.rounds} alternating rounds")
    engine = BatchingEngine(model, max_batch_size=args.clients, max_model_len=2048)
    rng = random.Random(0)
    rows, ok = [], True
    try:
        for label, options, ignore_eos in (("fixed length (greedy, ignore_eos)", GREEDY, True),
                                           ("sampled (T 0.8, top-p 0.95, seeded)", SAMPLED, False)):
            prompts = requests(args.requests, args.max_tokens, options, ignore_eos, rng)
            sequential, concurrent, ratio = throughput(engine, prompts, args.clients, args.rounds)
            rows.append((label, sequential, concurrent, ratio))
        turn_ratios, per_turn = [], []
        for _ in range(args.rounds):
            ttfts, cached = multiturn(engine, rng)
            turn_ratios.append(ttfts[8] / ttfts[0])
            per_turn.append((ttfts, cached))
        print(table(["requests", "sequential tok/s", f"{args.clients} clients tok/s", "ratio"], rows))
        ttfts, cached = per_turn[len(per_turn) // 2]
        print(table(["turn", "TTFT ms", "cached tokens"],
                    [(i + 1, 1000 * t, c) for i, (t, c) in enumerate(zip(ttfts, cached))]))
        for label, _, _, ratio in rows:
            ok &= verdict(f"{label}: concurrent/sequential", ratio, ">= 3", ratio >= 3)
        ratio = statistics.median(turn_ratios)
        ok &= verdict("multi-turn TTFT turn 9 / turn 1 (median)", ratio, "<= 1.5", ratio <= 1.5)
    finally:
        engine.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
