"""The cost of constrained decoding: tokens/s with a JSON schema vs without, same engine, same run.

For the eager transformers engine (``TransformersEngine``: the grammar as a
logits processor) and the batching engine (``BatchingEngine``: the grammar as
each row's constraint), at batch 1 and batch 8: the same prompts generate
exactly ``--tokens`` new tokens greedily, once free and once constrained to a
schema that cannot end sooner (an array of at least 500 strings), measured
interleaved, repeat by repeat. The grammar is compiled before timing (it is
cached per schema). Goal: constrained >= 0.90 of free tokens/s.

Run: ``python bench/structured.py`` (the 166M checkpoint of bench/checkpoint.py,
vocabulary 32000, built on first use; a few minutes on 2 cores), or
``--model DIR`` for any Llama 2 checkpoint.
"""

import json
import time
from typing import List, Tuple

import checkpoint
from timing import base_parser, median, setup, table, verdict

GOAL = 0.90
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 500}},
          "required": ["items"]}


def prompts_for(tokenizer, batch: int, tokens: int, structured) -> list:
    from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
    from modelscope_llama2.prompts.requests import chat_prompt, parse_chat_inputs

    sampling = SamplingParams(tokens, options={"do_sample": False, "min_new_tokens": tokens}, structured=structured)
    questions = [checkpoint.QUESTIONS[i % len(checkpoint.QUESTIONS)] for i in range(batch)]
    return [Prompt(chat_prompt(parse_chat_inputs({"text": q}), tokenizer).token_ids, sampling) for q in questions]


def rate(engine, prompts: list) -> float:
    start = time.perf_counter()
    produced = sum(len(event.token_ids) for event in engine.generate(prompts))
    elapsed = time.perf_counter() - start
    expected = prompts[0].sampling.max_new_tokens * len(prompts)
    if produced != expected:
        raise RuntimeError(f"{engine.name}: produced {produced} tokens, expected {expected}")
    return produced / elapsed


def measure(engine, tokenizer, batch: int, tokens: int, repeats: int) -> Tuple[float, float]:
    from modelscope_llama2.prompts.prompt import StructuredOutput

    structured = StructuredOutput("json_schema", json.dumps(SCHEMA))
    engine.check_sampling(prompts_for(tokenizer, 1, tokens, structured)[0].sampling)  # compile once, cached
    rate(engine, prompts_for(tokenizer, batch, 4, None))  # warm-up, both ways
    rate(engine, prompts_for(tokenizer, batch, 4, structured))
    free: List[float] = []
    constrained: List[float] = []
    for _ in range(repeats):
        # Fresh prompt objects (new request ids), free and constrained interleaved.
        free.append(rate(engine, prompts_for(tokenizer, batch, tokens, None)))
        constrained.append(rate(engine, prompts_for(tokenizer, batch, tokens, structured)))
    return median(free), median(constrained)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the 166M benchmark checkpoint)")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per request (default: 48)")
    args = parser.parse_args()
    setup(args.threads)
    directory = args.model or checkpoint.checkpoint_dir(args.dir)
    model, tokenizer = checkpoint.load_package_model(directory)
    from modelscope_llama2.engines.factory import serving_engine

    engines = [("transformers (eager)", model.engine)]
    model.set_prompt_cache(max_entries=0)  # every run prefills alike
    batching = serving_engine(model, max_batch_size=8)
    engines.append(("transformers-batching", batching))
    rows, ratios = [], []
    try:
        for name, engine in engines:
            for batch in (1, 8):
                free, constrained = measure(engine, tokenizer, batch, args.tokens, args.repeats)
                ratios.append(constrained / free)
                rows.append([name, str(batch), f"{free:.1f}", f"{constrained:.1f}", f"{constrained / free:.3f}"])
    finally:
        batching.close()
    print(table(["engine", "batch", "free tok/s", "schema tok/s", "ratio"], rows))
    verdict("schema tok/s / free tok/s, worst row", min(ratios), f">= {GOAL:.2f}", min(ratios) >= GOAL)


if __name__ == "__main__":
    main()
