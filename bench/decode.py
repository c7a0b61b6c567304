"""Decode throughput: ``Llama2ForChat.chat()`` vs raw transformers ``generate()`` on the same prompt ids and weights.

Both sides run on the same model object (166M fp32), greedy, with exactly
the same number of new tokens (``min_new_tokens = max_new_tokens``). The
raw side gets the very ids ``chat()`` fed the model, captured from its
first forward pass. The prompt cache is off, so ``chat()`` prefills the
whole prompt just as ``generate()`` does.

Decode tokens/s is 1 / the median time between successive decode steps,
taken from the start of each forward pass: a step covers everything done per
token (forward, sampling, stopping criteria, streamer), while prompt
building and cache bookkeeping fall outside it (issue 5, item 2). The median
step resists other processes preempting the run; end-to-end seconds per call
(prefill included) are printed too.

Target: chat() decode tokens/s >= 0.95x generate()'s.

Run: ``python bench/decode.py`` (about a minute on 2 idle cores).
"""

from typing import Dict, List

import torch

from checkpoint import QUESTIONS, SYSTEM, checkpoint_dir, load_package_model
from timing import ForwardClock, base_parser, median, setup, table, timed, verdict

NEW_TOKENS = 48
# A mid-conversation prompt (~260 tokens): three earlier rounds, then a question.
HISTORY = [(QUESTIONS[i], QUESTIONS[i + 1]) for i in (0, 2, 4)]
TEXT = QUESTIONS[6]


def chat_call(model, tokenizer, new_tokens: int) -> str:
    out = model.chat({"text": TEXT, "system": SYSTEM, "history": HISTORY, "max_new_tokens": new_tokens,
                      "min_new_tokens": new_tokens, "do_sample": False}, tokenizer)
    assert out["finish_reason"] == "length", out
    return out["response"]


def generate_call(model, prompt: torch.Tensor, new_tokens: int) -> List[int]:
    """The plain transformers call a user would write for the same ids."""
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def chat_prompt_ids(model, tokenizer) -> torch.Tensor:
    """The ids ``chat()`` feeds the model, read from its first forward pass."""
    seen: List[torch.Tensor] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True)
    try:
        chat_call(model, tokenizer, 1)
    finally:
        handle.remove()
    return seen[0]


def measure(model, calls: Dict, repeats: int) -> Dict[str, Dict[str, float]]:
    """Per side: median decode step and median end-to-end seconds; sides alternate which goes first."""
    steps: Dict[str, List[float]] = {side: [] for side in calls}
    totals: Dict[str, List[float]] = {side: [] for side in calls}
    for rep in range(repeats):
        for side in (list(calls) if rep % 2 == 0 else list(reversed(list(calls)))):
            with ForwardClock(model) as clock:
                totals[side].append(timed(calls[side]))
            assert len(clock.starts) == NEW_TOKENS, (side, len(clock.starts))
            steps[side].extend(clock.decode_steps())
    return {side: {"step": median(steps[side]), "total": median(totals[side])} for side in calls}


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    setup(args.threads)
    model, tokenizer = load_package_model(checkpoint_dir(args.dir))
    model.set_prompt_cache(max_entries=0)
    prompt = chat_prompt_ids(model, tokenizer)
    calls = {"chat()": lambda: chat_call(model, tokenizer, NEW_TOKENS),
             "generate()": lambda: generate_call(model, prompt, NEW_TOKENS)}

    # Warm-up, and a check that both sides generate the same tokens.
    same = calls["chat()"]() == tokenizer.decode(calls["generate()"]()).strip()
    result = measure(model, calls, args.repeats)

    rows = [[side, round(r["step"] * 1000, 2), 1 / r["step"], round(r["total"] * 1000, 1), NEW_TOKENS / r["total"]]
            for side, r in result.items()]
    print(f"\ndecode: 166M fp32, prompt {prompt.shape[1]} tokens, {NEW_TOKENS} new tokens, greedy, "
          f"{args.repeats} calls per side; same output text: {'yes' if same else 'NO'}")
    print(table(["side", "median step ms", "decode tok/s", "end-to-end ms", "end-to-end tok/s"], rows))
    ratio = result["generate()"]["step"] / result["chat()"]["step"]
    ok = verdict("chat() / generate() decode tokens/s", ratio, ">= 0.95", ratio >= 0.95)
    return 0 if ok and same else 1


if __name__ == "__main__":
    raise SystemExit(main())
