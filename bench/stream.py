"""Streaming cost per token: at token 1,000 the same as at token 10.

Two measurements, each against a baseline from the same run:

1. ``StreamingDetokenizer.add`` alone, one id at a time over a 1,000-token
   answer (ids of the benchmark tokenizer): median microseconds per token
   around token 10 and around token 1,000. Baseline: re-decoding every id so
   far for each new token (what streaming did before the detokenizer), whose
   cost grows with the answer.
2. ``model.stream_chat()`` end to end, forced to a 1,000-token answer
   (``min_new_tokens``) on a small random Llama checkpoint (2 layers, hidden
   128, the benchmark's 32,000-piece tokenizer) so the model's own cost stays
   nearly flat: median milliseconds between streamed items around item 10 and
   around item 1,000. Baseline: raw transformers ``generate()`` on the same
   ids with a streamer that only records the time of each token; its growth
   is the model's (attention over a longer context), not the stream's.

Targets: detokenizer ratio (token 1,000 / token 10) <= 1.5; ``stream_chat()``
ratio <= ``generate()``'s ratio x 1.10.

Run: ``python bench/stream.py`` (about a minute on 2 idle cores, 1 torch
thread by default; needs the benchmark tokenizer from ``python bench/checkpoint.py``).
"""

import os
import tempfile
import time
from typing import Callable, List, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from checkpoint import QUESTIONS, checkpoint_dir
from timing import base_parser, median, setup, table, verdict

ANSWER_TOKENS = 1000
EARLY, LATE = slice(5, 15), slice(ANSWER_TOKENS - 12, ANSWER_TOKENS - 2)  # around token 10 and token 1,000


def early_late(intervals: Sequence[float]) -> List[float]:
    """Median interval around token 10 and around token 1,000."""
    return [median(intervals[EARLY]), median(intervals[LATE])]


def per_token_seconds(feed: Callable[[int], object], n: int) -> List[float]:
    """Seconds ``feed(i)`` takes for each of ``n`` tokens."""
    times = []
    for i in range(n):
        start = time.perf_counter()
        feed(i)
        times.append(time.perf_counter() - start)
    return times


def detokenizer_figures(tokenizer, repeats: int) -> List[List[float]]:
    """[[early, late] of StreamingDetokenizer.add, [early, late] of re-decoding everything], seconds."""
    from modelscope_llama2 import StreamingDetokenizer

    text = " ".join(QUESTIONS * 20)
    ids = tokenizer.encode(text)[:ANSWER_TOKENS]
    assert len(ids) == ANSWER_TOKENS
    incremental, full = [], []
    for _ in range(repeats):
        detok = StreamingDetokenizer(tokenizer)
        incremental.append(early_late(per_token_seconds(lambda i: detok.add(ids[i:i + 1]), len(ids))))
        full.append(early_late(per_token_seconds(lambda i: tokenizer.decode(ids[:i + 1]), len(ids))))
    return [[median(r[k] for r in runs) for k in (0, 1)] for runs in (incremental, full)]


class TokenTimes(BaseStreamer):
    """A ``generate()`` streamer that only records when each new token arrives."""

    def __init__(self):
        self.times: List[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def random_checkpoint(tokenizer, directory: str) -> str:
    """A 2-layer, hidden-128 random Llama with the benchmark tokenizer: the model costs little per token."""
    from modelscope_llama2 import save_checkpoint

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return save_checkpoint(LlamaForCausalLM(config), directory, tokenizer=tokenizer)


def stream_figures(model, tokenizer, repeats: int) -> List[List[float]]:
    """[[early, late] of stream_chat() item intervals, [early, late] of generate() token intervals], seconds."""
    inputs = {"text": QUESTIONS[0], "max_new_tokens": ANSWER_TOKENS, "min_new_tokens": ANSWER_TOKENS,
              "do_sample": False}
    prompt = torch.tensor([model.prepare_chat(inputs, tokenizer).token_ids])
    streamed, raw = [], []
    for _ in range(repeats):
        arrivals = []
        for item in model.stream_chat(inputs, tokenizer):
            arrivals.append(time.perf_counter())
        assert item["usage"]["completion_tokens"] == ANSWER_TOKENS, item["usage"]
        streamed.append(early_late([b - a for a, b in zip(arrivals, arrivals[1:])]))
        clock = TokenTimes()
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=ANSWER_TOKENS,
                           min_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=0, streamer=clock)
        raw.append(early_late([b - a for a, b in zip(clock.times, clock.times[1:])]))
    print(f"stream_chat() items per run: {len(arrivals)} for {ANSWER_TOKENS} tokens")
    return [[median(r[k] for r in runs) for k in (0, 1)] for runs in (streamed, raw)]


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    # A 2-layer hidden-128 model gains nothing from a second thread, and on a
    # shared machine OpenMP's spinning second thread makes the main thread's
    # generate() (the baseline) erratic while the engine's worker thread is spared.
    parser.set_defaults(threads=1)
    args = parser.parse_args()
    setup(args.threads)
    import modelscope_llama2
    from modelscope import Model

    tokenizer = modelscope_llama2.Llama2Tokenizer.from_pretrained(checkpoint_dir(args.dir))
    (detok_early, detok_late), (full_early, full_late) = detokenizer_figures(tokenizer, args.repeats)
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as scratch:
        model = Model.from_pretrained(random_checkpoint(tokenizer, os.path.join(scratch, "random")), device="cpu")
        model.set_prompt_cache(max_entries=0)
        (stream_early, stream_late), (raw_early, raw_late) = stream_figures(model, tokenizer, args.repeats)

    print(f"\nstream: a {ANSWER_TOKENS}-token answer, median per token around token 10 and token {ANSWER_TOKENS}, "
          f"{args.repeats} runs")
    rows = [["StreamingDetokenizer.add (us)", detok_early * 1e6, detok_late * 1e6, detok_late / detok_early],
            ["re-decode all ids (us, baseline)", full_early * 1e6, full_late * 1e6, full_late / full_early],
            ["stream_chat() (ms)", stream_early * 1e3, stream_late * 1e3, stream_late / stream_early],
            ["generate() (ms, baseline)", raw_early * 1e3, raw_late * 1e3, raw_late / raw_early]]
    print(table(["per token", "@10", f"@{ANSWER_TOKENS}", "ratio"], rows))
    detok_ratio, stream_ratio, raw_ratio = detok_late / detok_early, stream_late / stream_early, raw_late / raw_early
    ok = verdict(f"StreamingDetokenizer per-token cost, token {ANSWER_TOKENS} / token 10", detok_ratio, "<= 1.5",
                 detok_ratio <= 1.5)
    ok &= verdict(f"stream_chat() per-token time ratio over generate()'s ({raw_ratio:.3f})", stream_ratio / raw_ratio,
                  "<= 1.10", stream_ratio / raw_ratio <= 1.10)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
