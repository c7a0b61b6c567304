"""The batching engine against transformers' own ``generate()`` on the same weights, and per-row sampling."""

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelscope_llama2.constants import EOS_ID
from modelscope_llama2.engines.batching import BatchingEngine
from modelscope_llama2.prompts.prompt import Prompt, SamplingParams

GREEDY = {"do_sample": False}
SAMPLED = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "top_k": 40}


@pytest.fixture(scope="module")
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def engine(model):
    engine = BatchingEngine(model, max_batch_size=8, max_model_len=512)
    yield engine
    engine.close()


def reference(model, ids, max_new_tokens, **options):
    """``generate()``'s ids up to (not including) EOS, and its raw logits per step."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, max_length=None, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True, **options)
    new = out.sequences[0, len(ids):].tolist()
    return (new[:new.index(EOS_ID)] if EOS_ID in new else new), [step[0] for step in out.logits]


def run(engine, prompts):
    ids = {p.request_id: [] for p in prompts}
    finals, logprobs = {}, {p.request_id: [] for p in prompts}
    for event in engine.generate(prompts):
        ids[event.request_id].extend(event.token_ids)
        logprobs[event.request_id].extend(event.logprobs)
        if event.finished:
            finals[event.request_id] = event
    return ids, finals, logprobs


def encode(tokenizer, text):
    return tuple(tokenizer.encode(text, bos=True))


TEXTS = ["Hello there", "Where is the capital of Zhejiang?", "Numbers: 0123", "West Lake", "Emoji and symbols",
         "The quick brown fox", "def chat(inputs):", "Tabs and spaces"]


def test_greedy_rows_equal_generate_inside_a_mixed_batch(engine, model, tokenizer):
    greedy = [Prompt(encode(tokenizer, t), SamplingParams(max_new_tokens=20 + i, options=GREEDY))
              for i, t in enumerate(TEXTS[:4])]
    sampled = [Prompt(encode(tokenizer, t), SamplingParams(max_new_tokens=24, seed=i, options=SAMPLED))
               for i, t in enumerate(TEXTS[4:])]
    ids, finals, _ = run(engine, greedy + sampled)
    for prompt in greedy:
        expected, _ = reference(model, list(prompt.token_ids), prompt.sampling.max_new_tokens)
        final = finals[prompt.request_id]
        assert ids[prompt.request_id] == expected
        assert final.finish_reason == ("length" if len(expected) == prompt.sampling.max_new_tokens else "eos")
        assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt.token_ids), len(expected))
    assert all(finals[p.request_id].usage.completion_tokens > 0 for p in sampled)


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_batch_of_8(engine, tokenizer):
    def seeded(seed):
        return Prompt(encode(tokenizer, "Where is the capital"),
                      SamplingParams(max_new_tokens=32, seed=seed, options=SAMPLED, ignore_eos=True))

    alone, _, _ = run(engine, [seeded(11)])
    # The other rows: every kind of setting the sampler handles in the same step (penalties, min-p, logprobs).
    settings = [GREEDY, SAMPLED, {**SAMPLED, "repetition_penalty": 1.3}, {**GREEDY, "frequency_penalty": 0.5},
                {"do_sample": True, "temperature": 1.2, "min_p": 0.05}, {**SAMPLED, "presence_penalty": 0.4}, GREEDY]
    others = [Prompt(encode(tokenizer, t), SamplingParams(max_new_tokens=40, seed=None if i % 2 else i,
                                                          options=options, logprobs=2 if i % 2 else None))
              for i, (t, options) in enumerate(zip(TEXTS[:7], settings))]
    target = seeded(11)
    batched, _, _ = run(engine, [*others[:3], target, *others[3:]])
    assert list(alone.values())[0] == batched[target.request_id]
    assert len(batched[target.request_id]) == 32
    different, _, _ = run(engine, [seeded(12)])
    assert list(different.values())[0] != batched[target.request_id]


def test_repetition_penalty_and_logprobs_per_row(engine, model, tokenizer):
    ids = encode(tokenizer, "Numbers: 0123456789")
    penalized = Prompt(ids, SamplingParams(max_new_tokens=16, options={**GREEDY, "repetition_penalty": 1.5}))
    scored = Prompt(ids, SamplingParams(max_new_tokens=16, options=GREEDY, logprobs=3))
    out, _, logprobs = run(engine, [penalized, scored])
    expected, _ = reference(model, list(ids), 16, repetition_penalty=1.5)
    assert out[penalized.request_id] == expected
    expected, logits = reference(model, list(ids), 16)
    assert out[scored.request_id] == expected
    for item, step, token in zip(logprobs[scored.request_id], logits, expected):
        raw = torch.log_softmax(step.float(), dim=-1)
        assert item.token_id == token and item.logprob == pytest.approx(raw[token].item(), abs=1e-4)
        assert [t for t, _ in item.top] == raw.topk(3).indices.tolist()
    assert not logprobs[penalized.request_id]


def test_next_turn_reuses_the_previous_turns_kv(engine, model, tokenizer):
    first = Prompt(encode(tokenizer, "Where is the capital of Zhejiang? The capital"),
                   SamplingParams(max_new_tokens=12, options=GREEDY))
    answer, finals, _ = run(engine, [first])
    turn2 = first.token_ids + tuple(answer[first.request_id]) + tuple(tokenizer.encode("West Lake"))
    second = Prompt(turn2, SamplingParams(max_new_tokens=12, options=GREEDY))
    out, finals, _ = run(engine, [second])
    assert finals[second.request_id].usage.cached_tokens >= len(first.token_ids)
    assert out[second.request_id] == reference(model, list(turn2), 12)[0]
    # Another conversation sharing only the start: the prefix is copied, the first one's slot kept.
    shared = len(first.token_ids) - 2
    branch = first.token_ids[:shared] + tuple(tokenizer.encode("Lingyin Temple"))
    third = Prompt(branch, SamplingParams(max_new_tokens=12, options=GREEDY))
    out, finals, _ = run(engine, [third])
    assert finals[third.request_id].usage.cached_tokens == shared
    assert out[third.request_id] == reference(model, list(branch), 12)[0]


def test_a_background_prefill_yields_to_requests_someone_waits_for(engine, model, tokenizer):
    # The next turn's known beginning, prefilled for the cache: 15 steps of BACKGROUND_CHUNK_TOKENS ids.
    ids = tuple(3 + i % 390 for i in range(480))
    background = Prompt(ids, SamplingParams(max_new_tokens=0, options=GREEDY), background=True)
    finished = threading.Event()
    engine.submit(background, lambda event: event.finished and finished.set())
    waited = Prompt(encode(tokenizer, "Where is the capital of Zhejiang?"), SamplingParams(max_new_tokens=3,
                                                                                          options=GREEDY))
    out, finals, _ = run(engine, [waited])
    # Answered while the background prefill had most of its chunks still to go, and answered exactly.
    assert not finished.is_set()
    assert out[waited.request_id] == reference(model, list(waited.token_ids), 3)[0]
    assert finished.wait(60)
    # What it prefilled is in the cache for the turn that follows.
    turn = Prompt(ids + tuple(tokenizer.encode("West Lake")), SamplingParams(max_new_tokens=3, options=GREEDY))
    out, finals, _ = run(engine, [turn])
    assert finals[turn.request_id].usage.cached_tokens == len(ids)
    assert out[turn.request_id] == reference(model, list(turn.token_ids), 3)[0]


def test_abort_frees_the_slot_at_once(model, tokenizer):
    engine = BatchingEngine(model, max_batch_size=1, max_model_len=512)
    try:
        long = Prompt(encode(tokenizer, "Tabs and spaces"),
                      SamplingParams(max_new_tokens=400, options=GREEDY, ignore_eos=True))
        queued = Prompt(encode(tokenizer, "Hello"), SamplingParams(max_new_tokens=5, options=GREEDY))
        events = engine.generate([long, queued])
        first = next(events)
        assert first.request_id == long.request_id and engine.running == 2  # one in the slot, one queued
        threading.Thread(target=engine.abort, args=(long.request_id,)).start()
        finals = {e.request_id: e for e in [first, *events] if e.finished}
        assert finals[long.request_id].finish_reason == "abort"
        assert finals[long.request_id].usage.completion_tokens < 400
        assert finals[queued.request_id].finish_reason in ("length", "eos")
        deadline = time.monotonic() + 5
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0
    finally:
        engine.close()


def test_bad_input_is_refused_by_name_before_any_work(engine):
    with pytest.raises(ValueError, match="typical_p"):
        engine.generate([Prompt((1, 5), SamplingParams(max_new_tokens=1, options={"typical_p": 0.5}))])
    with pytest.raises(ValueError, match="token_ids"):
        engine.generate([Prompt((1, 10 ** 9), SamplingParams(max_new_tokens=1))])


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 0.9, 0.0), (40, 0.95, 0.0), (0, 1.0, 0.05), (10, 0.8, 0.1),
                                               (300, 0.9, 0.0), (5, 1.0, 0.0)])
def test_rows_draw_from_the_tokens_transformers_warpers_keep(top_k, top_p, min_p):
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from modelscope_llama2.engines.batching.sampler import RowSampling, sample, seeded_generator

    torch.manual_seed(0)
    logits = torch.randn(4, 2000) * torch.tensor([[2.0], [6.0], [12.0], [20.0]])  # flat to peaked rows
    expected = logits / 0.7
    for warper in ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + (
            [MinPLogitsWarper(min_p)] if min_p else []):
        expected = warper(None, expected)
    kept = expected.isfinite()
    drawn = [set() for _ in range(4)]
    for seed in range(50):
        rows = [RowSampling(temperature=0.7, top_k=top_k, top_p=top_p, min_p=min_p,
                            generator=seeded_generator(seed * 4 + i, "cpu")) for i in range(4)]
        tokens, _ = sample(logits, rows, [None] * 4, [0] * 4)
        for row, token in enumerate(tokens):
            drawn[row].add(token)
    for row in range(4):
        assert drawn[row] <= set(kept[row].nonzero().flatten().tolist())
        if kept[row].sum() == 1:
            assert len(drawn[row]) == 1


def test_never_written_kv_memory_cannot_leak_into_a_shorter_row(model, tokenizer):
    # The slots are allocated uninitialised; a row shorter than the batch's longest reads (masked) positions its
    # slot never wrote. Masks are additive, so NaN there (what freed memory may hold) would still poison the row
    # (NaN + min is NaN, 0 * NaN is NaN): a seeded row once gave [196, 0, 0, ...] in a batch under load.
    engine = BatchingEngine(model, max_batch_size=8, max_model_len=128)
    try:
        for tensor in (*engine.kv.keys, *engine.kv.values):
            tensor.fill_(float("nan"))
        engine.kv.initialised = [0] * engine.kv.slots
        short = Prompt(encode(tokenizer, "Hi"), SamplingParams(max_new_tokens=12, seed=3, options=SAMPLED,
                                                               ignore_eos=True))
        alone, _, _ = run(engine, [short])
        longer = [Prompt(encode(tokenizer, t), SamplingParams(max_new_tokens=20, options=GREEDY)) for t in TEXTS[1:4]]
        target = Prompt(short.token_ids, short.sampling)
        batched, _, _ = run(engine, [*longer, target])  # never used slots (LRU) full of NaN past the prompts
        assert batched[target.request_id] == alone[short.request_id]
        for prompt in longer:
            assert batched[prompt.request_id] == reference(model, list(prompt.token_ids), 20)[0]
    finally:
        engine.close()


def test_thread_setting_that_keeps_losing_is_tried_less_and_less_often(monkeypatch):
    from modelscope_llama2.engines.batching import threads

    clock = [100.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    chooser = threads.ThreadChooser(max_threads=2)
    kind = (True, 4)
    chooser.record(kind, 1, 0.002)
    chooser.record(kind, 2, 0.005)  # the team is slower: one thread from now on
    waits = []
    for _ in range(4):  # each try of the team loses again: the wait before the next one doubles
        start = clock[0]
        while chooser.threads_for(kind) == 1:
            clock[0] += 0.25
        waits.append(clock[0] - start)
        chooser.record(kind, 2, 0.005)
    assert waits == [1.0, 2.0, 4.0, 8.0]
    clock[0] += threads.MAX_RETRY_SECONDS
    assert chooser.threads_for(kind) == 2
    chooser.record(kind, 2, 0.001)  # the load changed: the team won, and the waits start over
    assert chooser.threads_for(kind) == 1  # one thread's last try is long ago
    chooser.record(kind, 1, 0.003)
    start = clock[0]
    while chooser.threads_for(kind) == 2:
        clock[0] += 0.25
    assert clock[0] - start == 2.0
