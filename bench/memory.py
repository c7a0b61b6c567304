"""Prompt-cache memory: bytes per conversation token vs the KV size formula, and the LRU bound under 20 conversations.

1. One conversation of a few turns: after each turn, the cache's bytes
   (``PromptCache.nbytes``) divided by the tokens it holds, against the
   model's KV size per token, 2 x layers x kv_heads x head_dim x dtype
   bytes (the baseline; computed here from the config, independently of
   the package). Tokens held = tokens reused from the cache + tokens fed to
   the model this turn, both observed from outside.
2. 20 conversations, 2 turns each, taken round-robin (the worst order for an
   LRU: every conversation's entry is evicted before its next turn) with
   ``max_entries=4`` and ``max_bytes=32 MiB``: the entry count and bytes
   after every call must stay within the bounds.

Targets: bytes per token within 1% of the formula; the bounds never exceeded.

Run: ``python bench/memory.py`` (about a minute on 2 idle cores).
"""

import os
from typing import Dict, List

from checkpoint import QUESTIONS, SYSTEM, checkpoint_dir, load_package_model
from timing import base_parser, setup, table, verdict

NEW_TOKENS = 8
MAX_ENTRIES = 4
MAX_BYTES = 32 << 20
CONVERSATIONS = 20


def formula_bytes_per_token(config, dtype_bytes: int) -> int:
    """2 x layers x kv_heads x head_dim x dtype bytes."""
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def turn(model, tokenizer, text: str, history: List, system: str = SYSTEM) -> Dict:
    """One greedy turn; returns the new history and the tokens the model was fed."""
    fed: List[int] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        out = model.chat({"text": text, "system": system, "history": history, "max_new_tokens": NEW_TOKENS,
                          "do_sample": False}, tokenizer)
    finally:
        handle.remove()
    return {"history": out["history"], "fed": sum(fed)}


def per_token(model, tokenizer, turns: int) -> float:
    """Worst ratio of measured bytes per held token to the formula over a conversation; prints a table."""
    cache = model.set_prompt_cache(max_entries=1)
    expected = formula_bytes_per_token(model.config, model.dtype.itemsize)
    history, rows, worst = [], [], 0.0
    for i in range(turns):
        reused_before = cache.stats.reused_tokens
        result = turn(model, tokenizer, QUESTIONS[i], history)
        history = result["history"]
        held = cache.stats.reused_tokens - reused_before + result["fed"]
        ratio = cache.nbytes / held / expected
        worst = max(worst, ratio)
        rows.append([i, held, cache.nbytes, cache.nbytes // held, expected, ratio])
    print(f"\nmemory per conversation token, {model.dtype} (formula: 2 x {model.config.num_hidden_layers} layers x "
          f"{model.config.num_key_value_heads} kv_heads x head_dim x {model.dtype.itemsize} bytes)")
    print(table(["turn", "tokens held", "cache bytes", "bytes/token", "formula bytes/token", "measured/formula"],
                rows))
    return worst


def lru_bound(model, tokenizer) -> Dict[str, int]:
    """Round-robin over ``CONVERSATIONS`` 2-turn conversations; the largest count and bytes seen, and hit stats."""
    cache = model.set_prompt_cache(max_entries=MAX_ENTRIES, max_bytes=MAX_BYTES)
    histories: List[List] = [[] for _ in range(CONVERSATIONS)]
    most_entries = most_bytes = 0
    for round_ in range(2):
        for c in range(CONVERSATIONS):
            # Distinct first questions; a shared system prompt, as a server would have.
            text = f"Conversation {c}: {QUESTIONS[(c + round_) % len(QUESTIONS)]}"
            histories[c] = turn(model, tokenizer, text, histories[c])["history"]
            most_entries, most_bytes = max(most_entries, len(cache)), max(most_bytes, cache.nbytes)
    return {"entries": most_entries, "bytes": most_bytes, "lookups": cache.stats.lookups, "hits": cache.stats.hits,
            "rss": _rss_bytes()}


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=4, help="turns of the per-token conversation")
    args = parser.parse_args()
    setup(args.threads)
    model, tokenizer = load_package_model(checkpoint_dir(args.dir))
    turn(model, tokenizer, "Hello, who are you?", [])  # warm-up

    worst = per_token(model, tokenizer, args.turns)
    rss_before = _rss_bytes()
    seen = lru_bound(model, tokenizer)
    print(f"\nLRU bound: {CONVERSATIONS} conversations x 2 turns, round-robin, {NEW_TOKENS} new tokens per turn")
    print(table(["", "bound", "largest seen"], [["entries", MAX_ENTRIES, seen["entries"]],
                                                ["KV bytes", MAX_BYTES, seen["bytes"]]]))
    print(f"cache hits {seen['hits']}/{seen['lookups']} (partial: the shared system prompt); "
          f"process RSS {rss_before / 2**20:.0f} MiB before, {seen['rss'] / 2**20:.0f} MiB after")
    ok = verdict("cache bytes per token / formula (worst turn)", worst, "<= 1.01", worst <= 1.01)
    ok &= verdict("largest entry count / max_entries", seen["entries"] / MAX_ENTRIES, "<= 1", seen["entries"] <= MAX_ENTRIES)
    ok &= verdict("largest KV bytes / max_bytes", seen["bytes"] / MAX_BYTES, "<= 1", seen["bytes"] <= MAX_BYTES)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
