"""Logprobs, prompt logprobs, penalties, ignore_eos and min_new_tokens on the eager and batching engines.

The reference is independent of the engines: one plain forward of the same
transformers model over prompt + generated ids, and ``torch.log_softmax``
here, in the test. The batching engine prefills in chunks of 4 tokens here,
so prompt logprobs are gathered over several forwards.
"""

import pytest
import torch

from modelscope_llama2.constants import EOS_ID
from modelscope_llama2.engines.batching import BatchingEngine
from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
from tests.helpers import SCRIPT

TOL = 1e-4
GREEDY = {"do_sample": False}


@pytest.fixture(scope="module")
def batching_engines(_tiny_model, scripted_model):
    engines = {name: BatchingEngine(model, max_batch_size=4, kv_cache_bytes=64 << 20, max_batch_tokens=4)
               for name, model in (("tiny", _tiny_model), ("scripted", scripted_model))}
    yield engines
    for engine in engines.values():
        engine.close()


@pytest.fixture(params=["eager", "batching"])
def tiny_engine(request, tiny_model):
    """The tiny random model's engine (eager, with a fresh prefix cache, or batching) and the model."""
    if request.param == "eager":
        return tiny_model.engine, tiny_model
    return request.getfixturevalue("batching_engines")["tiny"], tiny_model


@pytest.fixture(params=["eager", "batching"])
def scripted_engine(request, scripted_model):
    if request.param == "eager":
        return scripted_model.engine
    return request.getfixturevalue("batching_engines")["scripted"]


def reference_logprobs(model, ids):
    """``[len(ids), vocab]``: row i is the distribution of the token after ``ids[:i + 1]``."""
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def run(engine, prompts):
    """Per request id: (new ids, their logprobs, prompt logprobs, the final event)."""
    out = {p.request_id: ([], [], None, None) for p in prompts}
    for event in engine.generate(prompts):
        ids, logprobs, scored, _ = out[event.request_id]
        ids.extend(event.token_ids)
        logprobs.extend(event.logprobs)
        assert len(event.logprobs) in (0, len(event.token_ids))
        out[event.request_id] = (ids, logprobs, scored if event.prompt_logprobs is None else event.prompt_logprobs,
                                 event if event.finished else None)
    return out


def prompt_of(tokenizer, text, **sampling):
    sampling.setdefault("max_new_tokens", 12)
    return Prompt(tuple(tokenizer.encode(f"[INST] {text} [/INST]", bos=True)), SamplingParams(**sampling))


def assert_matches_reference(model, prompt, ids, logprobs, k):
    ref = reference_logprobs(model, list(prompt.token_ids) + ids)
    start = len(prompt.token_ids) - 1
    assert [entry.token_id for entry in logprobs] == ids
    for i, entry in enumerate(logprobs):
        row = ref[start + i]
        assert entry.logprob == pytest.approx(row[ids[i]].item(), abs=TOL)
        values, top_ids = torch.topk(row, k)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=TOL)


def test_greedy_logprobs_equal_a_plain_forward(tiny_engine, tokenizer):
    engine, tiny_model = tiny_engine
    prompt = prompt_of(tokenizer, "Where is West Lake?", logprobs=3, options=GREEDY)
    ids, logprobs, scored, final = run(engine, [prompt])[prompt.request_id]
    assert len(ids) == final.usage.completion_tokens > 0 and scored is None
    assert_matches_reference(tiny_model, prompt, ids, logprobs, 3)
    # Greedy: the chosen token is the most likely one.
    assert all(entry.top[0][0] == entry.token_id for entry in logprobs)


def test_sampled_logprobs_are_raw_whatever_the_sampling_settings(tiny_engine, tokenizer):
    engine, tiny_model = tiny_engine
    greedy = prompt_of(tokenizer, "Hello there", logprobs=2, options=GREEDY)
    sampled = prompt_of(tokenizer, "Hello there", logprobs=2, seed=5,
                        options={"do_sample": True, "temperature": 0.3, "top_k": 3, "repetition_penalty": 1.5})
    got = run(engine, [greedy])[greedy.request_id]
    got_sampled = run(engine, [sampled])[sampled.request_id]
    assert_matches_reference(tiny_model, sampled, got_sampled[0], got_sampled[1], 2)
    # The same token after the same prefix reports the same number, greedy or sampled.
    same = 0
    for a, b in zip(got[1], got_sampled[1]):
        if a.token_id != b.token_id:
            break
        assert a.logprob == pytest.approx(b.logprob, abs=TOL)
        same += 1
    assert same > 0


@pytest.mark.parametrize("max_new_tokens", [0, 3])
def test_prompt_logprobs_score_every_prompt_token_but_the_first(tiny_engine, tokenizer, max_new_tokens):
    engine, tiny_model = tiny_engine
    prompt = prompt_of(tokenizer, "Numbers: 0123", max_new_tokens=max_new_tokens, prompt_logprobs=2, options=GREEDY)
    # The same prompt once more first: an engine must not score from a reused KV cache it skips.
    run(engine, [prompt_of(tokenizer, "Numbers: 0123", max_new_tokens=2, options=GREEDY)])
    (ids, logprobs, scored, final), = run(engine, [prompt]).values()
    assert (len(ids), logprobs, final.finish_reason) == (max_new_tokens, [], "length")
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt.token_ids), max_new_tokens)
    ref = reference_logprobs(tiny_model, list(prompt.token_ids))
    assert scored[0] is None and len(scored) == len(prompt.token_ids)
    for i, entry in enumerate(scored[1:], start=1):
        assert entry.token_id == prompt.token_ids[i]
        assert entry.logprob == pytest.approx(ref[i - 1, prompt.token_ids[i]].item(), abs=TOL)
        assert [t for t, _ in entry.top] == torch.topk(ref[i - 1], 2).indices.tolist()


def test_a_batch_reports_each_rows_own_logprobs(tiny_engine, tokenizer):
    engine, tiny_model = tiny_engine
    texts = ["Hi", "Where is the capital of Zhejiang?"]
    batch = [prompt_of(tokenizer, t, logprobs=1, prompt_logprobs=0, options=GREEDY) for t in texts]
    batch[1] = Prompt(batch[1].token_ids, SamplingParams(max_new_tokens=12, options=GREEDY))  # this one asks for none
    got = run(engine, batch)
    ids, logprobs, scored, _ = got[batch[0].request_id]
    assert_matches_reference(tiny_model, batch[0], ids, logprobs, 1)
    assert len(scored) == len(batch[0].token_ids)
    assert got[batch[1].request_id][1:3] == ([], None)


def test_penalties_follow_openais_formula(tiny_engine, tokenizer):
    engine, tiny_model = tiny_engine
    frequency, presence = 1.5, 2.0
    options = {**GREEDY, "frequency_penalty": frequency, "presence_penalty": presence}
    penalized = prompt_of(tokenizer, "Tabs and spaces", max_new_tokens=40, options=options)
    plain = prompt_of(tokenizer, "Tabs and spaces", max_new_tokens=40, options=GREEDY)
    ids = run(engine, [penalized])[penalized.request_id][0]
    assert ids != run(engine, [plain])[plain.request_id][0]
    with torch.inference_mode():
        logits = tiny_model(input_ids=torch.tensor([list(penalized.token_ids) + ids])).logits[0]
    start = len(penalized.token_ids) - 1
    for i, token in enumerate(ids):
        counts = torch.bincount(torch.tensor(ids[:i], dtype=torch.long), minlength=logits.shape[-1]).float()
        expected = logits[start + i] - frequency * counts - presence * (counts > 0).float()
        assert token == int(expected.argmax())


def test_ignore_eos_runs_to_the_token_limit(scripted_engine, tokenizer):
    prompt = prompt_of(tokenizer, "x", max_new_tokens=20, ignore_eos=True, options=GREEDY)
    ids, _, _, final = run(scripted_engine, [prompt])[prompt.request_id]
    script = tokenizer.encode(SCRIPT)
    assert (final.finish_reason, len(ids), final.usage.completion_tokens) == ("length", 20, 20)
    assert ids[:len(script) + 1] == script + [EOS_ID]


def test_min_new_tokens_keeps_eos_away(scripted_engine, tokenizer):
    script = tokenizer.encode(SCRIPT)
    prompt = prompt_of(tokenizer, "x", max_new_tokens=30, options={**GREEDY, "min_new_tokens": len(script) + 3})
    ids, _, _, final = run(scripted_engine, [prompt])[prompt.request_id]
    assert ids[:len(script)] == script and EOS_ID not in ids[:len(script) + 3]
    assert len(ids) >= len(script) + 3


def test_chat_inputs_take_openais_penalties_in_range():
    from modelscope_llama2.prompts.requests import parse_chat_inputs

    request = parse_chat_inputs({"text": "Hi", "frequency_penalty": 0.5, "presence_penalty": -2})
    assert request.spec.generate_kwargs == {"frequency_penalty": 0.5, "presence_penalty": -2}
    for bad in (2.5, "1", True):
        with pytest.raises(ValueError, match=r"inputs\['presence_penalty'\]: expected a number in \[-2.0, 2.0\]"):
            parse_chat_inputs({"text": "Hi", "presence_penalty": bad})
