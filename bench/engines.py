"""The vLLM engine against raw vLLM and against the transformers engine, on one checkpoint, in one run.

* decode tokens/s, batch 1 and batch 8 (``--batch``): this package's
  ``VllmEngine.generate`` vs raw vLLM ``LLM.generate`` on the same prompt
  ids (target >= 0.95: the engine's thread hand-offs must cost next to
  nothing), and vs the transformers engine (``TransformersEngine``, eager
  ``generate()``; a batch is one left-padded call);
* multi-turn time to first token: a 9-turn conversation (the benchmark
  questions, a system prompt, each engine's own 24-token answers in the
  history), late turns vs early ones for each engine. vLLM reuses earlier
  turns through automatic prefix caching, transformers through the
  package's prompt cache.

Every request is greedy with ``min_new_tokens = max_new_tokens``, so each
side generates exactly the same number of tokens. Both vLLM sides use the
same settings (fp32, prefix caching, the same KV-cache size) and are
measured interleaved, repeat by repeat; torch runs on one thread, as vLLM's
CPU build runs the model on one core.

Run in a venv with vLLM (CPU: ``.ci/vllm.sh`` builds one):
``python bench/engines.py`` (about 5 minutes on 2 cores with the 166M
checkpoint of bench/checkpoint.py, built on first use), or ``--model DIR``
for any Llama 2 checkpoint whose head size vLLM takes (32, 64, 80, ...).
"""

import time
from typing import Dict, List, Sequence, Tuple

import torch

import checkpoint
from timing import base_parser, machine_line, median, table, verdict

ANSWER_TOKENS = 24
GOAL_VS_RAW = 0.95


def chat_ids(tokenizer, question: str, history: Sequence[Tuple[str, str]] = ()) -> Tuple[int, ...]:
    from modelscope_llama2.prompts.requests import chat_prompt, parse_chat_inputs

    request = parse_chat_inputs({"text": question, "system": checkpoint.SYSTEM, "history": list(history)})
    return chat_prompt(request, tokenizer).token_ids


def exact(n: int):
    """Greedy settings for exactly ``n`` new tokens (EOS held back)."""
    from modelscope_llama2.prompts.prompt import SamplingParams

    return SamplingParams(n, options={"do_sample": False, "min_new_tokens": n})


def engine_rate(engine, prompt_ids: List[Tuple[int, ...]], n: int) -> float:
    """Tokens/s of one ``engine.generate`` call over all prompts (prefill included, as for raw vLLM)."""
    from modelscope_llama2.prompts.prompt import Prompt

    prompts = [Prompt(ids, exact(n)) for ids in prompt_ids]
    start = time.perf_counter()
    produced = sum(len(event.token_ids) for event in engine.generate(prompts))
    elapsed = time.perf_counter() - start
    if produced != n * len(prompts):
        raise RuntimeError(f"{engine.name} engine produced {produced} tokens, expected {n * len(prompts)}")
    return produced / elapsed


def raw_rate(llm, prompt_ids: List[Tuple[int, ...]], n: int) -> float:
    """Tokens/s of raw vLLM ``LLM.generate`` on the same ids and settings."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != n * len(prompt_ids):
        raise RuntimeError(f"raw vLLM produced {produced} tokens, expected {n * len(prompt_ids)}")
    return produced / elapsed


def conversation_ttft(engine, tokenizer, turns: int) -> List[Tuple[int, int, float]]:
    """``(prompt tokens, cached tokens, seconds to the first token)`` of each turn of one conversation."""
    from modelscope_llama2.prompts.prompt import Prompt

    history: List[Tuple[str, str]] = []
    rows = []
    for question in checkpoint.QUESTIONS[:turns]:
        prompt = Prompt(chat_ids(tokenizer, question, history), exact(ANSWER_TOKENS))
        start = time.perf_counter()
        events = engine.generate([prompt])
        first = next(events)
        ttft = time.perf_counter() - start
        ids, last = list(first.token_ids), first
        for event in events:
            ids += event.token_ids
            last = event
        rows.append((len(prompt.token_ids), last.usage.cached_tokens, ttft))
        history.append((question, tokenizer.decode(ids).strip()))
    return rows


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the 166M benchmark checkpoint)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per request in the throughput runs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--turns", type=int, default=9)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="each vLLM side's KV cache")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import modelscope_llama2  # noqa: F401  (registers the model with ModelScope)
    from modelscope import Model
    from vllm import LLM

    from modelscope_llama2 import Llama2Tokenizer
    from modelscope_llama2.engines.vllm_engine import VllmEngine

    directory = args.model or checkpoint.checkpoint_dir(args.dir)
    print(machine_line())
    tokenizer = Llama2Tokenizer.from_pretrained(directory)
    kv_bytes = int(args.kv_cache_gib * 2**30)
    start = time.perf_counter()
    vllm_engine = VllmEngine(directory, dtype="float32", kv_cache_memory_bytes=kv_bytes)
    raw = LLM(model=directory, dtype="float32", skip_tokenizer_init=True, enable_prefix_caching=True,
              kv_cache_memory_bytes=kv_bytes, disable_log_stats=True)
    transformers_engine = Model.from_pretrained(directory, device="cpu", torch_dtype=torch.float32).engine
    print(f"# {directory}: three sides started in {time.perf_counter() - start:.0f} s; "
          f"{args.new_tokens} new tokens per request, median of {args.repeats}")

    questions = (checkpoint.QUESTIONS * args.batch)[: args.batch]
    batches = {"batch 1": [chat_ids(tokenizer, questions[0])], f"batch {args.batch}": [chat_ids(tokenizer, q)
                                                                                       for q in questions]}
    sides = {"vllm engine": lambda ids, n: engine_rate(vllm_engine, ids, n),
             "raw vLLM": lambda ids, n: raw_rate(raw, ids, n),
             "transformers engine": lambda ids, n: engine_rate(transformers_engine, ids, n)}
    rates: Dict[Tuple[str, str], List[float]] = {}
    for name, ids in batches.items():
        for side in sides.values():
            side(ids, 4)  # warm-up: compile paths and caches for this shape
        for _ in range(args.repeats):
            for side_name, side in sides.items():
                rates.setdefault((name, side_name), []).append(side(ids, args.new_tokens))

    rows = []
    for name in batches:
        engine, baseline, eager = (median(rates[(name, s)]) for s in sides)
        rows.append([name, engine, baseline, eager, engine / baseline, engine / eager])
    print("\nthroughput: tokens/s (prefill included), greedy, exactly the same tokens on every side")
    print(table(["batch", "vllm engine", "raw vLLM", "transformers engine", "engine/raw", "engine/transformers"],
                rows))

    print(f"\nmulti-turn time to first token, {args.turns} turns, {ANSWER_TOKENS}-token answers")
    conversations = {"vllm engine": conversation_ttft(vllm_engine, tokenizer, args.turns),
                     "transformers engine": conversation_ttft(transformers_engine, tokenizer, args.turns)}
    turn_rows = []
    for turn in range(args.turns):
        (prompt_len, v_cached, v_ttft), (_, t_cached, t_ttft) = (conversations[s][turn] for s in conversations)
        turn_rows.append([turn, prompt_len, v_cached, v_ttft * 1000, t_cached, t_ttft * 1000])
    print(table(["turn", "prompt tokens", "vllm cached", "vllm ms", "transformers cached", "transformers ms"],
                turn_rows))
    for side, rows_ in conversations.items():
        early = sum(r[2] for r in rows_[:3]) / 3
        late = sum(r[2] for r in rows_[-3:]) / 3
        print(f"{side}: late/early TTFT (mean of last 3 / first 3 turns) = {late / early:.2f}")
    print()
    passed = [verdict(f"{row[0]}: vllm engine / raw vLLM tokens/s", row[4], f">= {GOAL_VS_RAW}", row[4] >= GOAL_VS_RAW)
              for row in rows]
    vllm_engine.close()
    return 0 if all(passed) else 1


if __name__ == "__main__":
    raise SystemExit(main())
