"""Logprobs, prompt logprobs, penalties, ignore_eos and min_new_tokens on the transformers engines.

The reference is independent of the engines: one plain forward of the same
transformers model over prompt + generated ids, and ``torch.log_softmax``
here, in the test.
"""

import pytest
import torch

from modelscope_llama2.constants import EOS_ID
from modelscope_llama2.engines.continuous_batching import GREEDY, ContinuousBatchingEngine
from modelscope_llama2.engines.transformers_engine import TransformersEngine
from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
from tests.helpers import SCRIPT

TOL = 1e-4


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


def test_greedy_logprobs_equal_a_plain_forward(tiny_model, tokenizer):
    prompt = prompt_of(tokenizer, "Where is West Lake?", logprobs=3, options=GREEDY)
    ids, logprobs, scored, final = run(tiny_model.engine, [prompt])[prompt.request_id]
    assert len(ids) == final.usage.completion_tokens > 0 and scored is None
    assert_matches_reference(tiny_model, prompt, ids, logprobs, 3)
    # Greedy: the chosen token is the most likely one.
    assert all(entry.top[0][0] == entry.token_id for entry in logprobs)


def test_sampled_logprobs_are_raw_whatever_the_sampling_settings(tiny_model, tokenizer):
    greedy = prompt_of(tokenizer, "Hello there", logprobs=2, options=GREEDY)
    sampled = prompt_of(tokenizer, "Hello there", logprobs=2, seed=5,
                        options={"do_sample": True, "temperature": 0.3, "top_k": 3, "repetition_penalty": 1.5})
    got = run(tiny_model.engine, [greedy])[greedy.request_id]
    got_sampled = run(tiny_model.engine, [sampled])[sampled.request_id]
    assert_matches_reference(tiny_model, sampled, got_sampled[0], got_sampled[1], 2)
    # The same token after the same prefix reports the same number, greedy or sampled.
    same = 0
    for a, b in zip(got[1], got_sampled[1]):
        if a.token_id != b.token_id:
            break
        assert a.logprob == pytest.approx(b.logprob, abs=TOL)
        same += 1
    assert same > 0


def test_prompt_logprobs_score_every_prompt_token_but_the_first(tiny_model, tokenizer):
    prompt = prompt_of(tokenizer, "Numbers: 0123", max_new_tokens=0, prompt_logprobs=2)
    (ids, logprobs, scored, final), = run(tiny_model.engine, [prompt]).values()
    assert (ids, logprobs, final.finish_reason) == ([], [], "length")
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt.token_ids), 0)
    ref = reference_logprobs(tiny_model, list(prompt.token_ids))
    assert scored[0] is None and len(scored) == len(prompt.token_ids)
    for i, entry in enumerate(scored[1:], start=1):
        assert entry.token_id == prompt.token_ids[i]
        assert entry.logprob == pytest.approx(ref[i - 1, prompt.token_ids[i]].item(), abs=TOL)
        assert [t for t, _ in entry.top] == torch.topk(ref[i - 1], 2).indices.tolist()


def test_a_batch_reports_each_rows_own_logprobs(tiny_model, tokenizer):
    engine = tiny_model.engine
    texts = ["Hi", "Where is the capital of Zhejiang?"]
    batch = [prompt_of(tokenizer, t, logprobs=1, prompt_logprobs=0, options=GREEDY) for t in texts]
    batch[1] = Prompt(batch[1].token_ids, SamplingParams(max_new_tokens=12, options=GREEDY))  # this one asks for none
    got = run(engine, batch)
    ids, logprobs, scored, _ = got[batch[0].request_id]
    assert_matches_reference(tiny_model, batch[0], ids, logprobs, 1)
    assert len(scored) == len(batch[0].token_ids)
    assert got[batch[1].request_id][1:3] == ([], None)


def test_penalties_follow_openais_formula(tiny_model, tokenizer):
    frequency, presence = 1.5, 2.0
    options = {**GREEDY, "frequency_penalty": frequency, "presence_penalty": presence}
    penalized = prompt_of(tokenizer, "Tabs and spaces", max_new_tokens=40, options=options)
    plain = prompt_of(tokenizer, "Tabs and spaces", max_new_tokens=40, options=GREEDY)
    ids = run(tiny_model.engine, [penalized])[penalized.request_id][0]
    assert ids != run(tiny_model.engine, [plain])[plain.request_id][0]
    with torch.inference_mode():
        logits = tiny_model(input_ids=torch.tensor([list(penalized.token_ids) + ids])).logits[0]
    start = len(penalized.token_ids) - 1
    for i, token in enumerate(ids):
        counts = torch.bincount(torch.tensor(ids[:i], dtype=torch.long), minlength=logits.shape[-1]).float()
        expected = logits[start + i] - frequency * counts - presence * (counts > 0).float()
        assert token == int(expected.argmax())


def test_ignore_eos_runs_to_the_token_limit(scripted_model, tokenizer):
    prompt = prompt_of(tokenizer, "x", max_new_tokens=20, ignore_eos=True, options=GREEDY)
    ids, _, _, final = run(scripted_model.engine, [prompt])[prompt.request_id]
    script = tokenizer.encode(SCRIPT)
    assert (final.finish_reason, len(ids), final.usage.completion_tokens) == ("length", 20, 20)
    assert ids[:len(script) + 1] == script + [EOS_ID]


def test_min_new_tokens_keeps_eos_away(scripted_model, tokenizer):
    script = tokenizer.encode(SCRIPT)
    prompt = prompt_of(tokenizer, "x", max_new_tokens=30, options={**GREEDY, "min_new_tokens": len(script) + 3})
    ids, _, _, final = run(scripted_model.engine, [prompt])[prompt.request_id]
    assert ids[:len(script)] == script and EOS_ID not in ids[:len(script) + 3]
    assert len(ids) >= len(script) + 3


def _batching_engine(directory):
    from transformers import AutoModelForCausalLM

    return ContinuousBatchingEngine(AutoModelForCausalLM.from_pretrained(directory).eval())


@pytest.fixture(scope="module")
def batching(tiny_dir):
    engine = _batching_engine(tiny_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def scripted_batching(scripted_dir):
    """The scripted model answers with SCRIPT then EOS: what EOS settings change shows."""
    engine = _batching_engine(scripted_dir)
    yield engine
    engine.close()


@pytest.mark.parametrize("engine_name, sampling", [
    ("batching", dict(logprobs=2)),
    ("batching", dict(prompt_logprobs=1, max_new_tokens=0)),
    ("batching", dict(options={**GREEDY, "repetition_penalty": 1.8})),
    ("batching", dict(options={**GREEDY, "frequency_penalty": 1.5, "presence_penalty": 2.0})),
    ("scripted_batching", dict(options={**GREEDY, "min_new_tokens": 30})),
    ("scripted_batching", dict(ignore_eos=True)),
], ids=["logprobs", "prompt_logprobs", "repetition_penalty", "penalties", "min_new_tokens", "ignore_eos"])
def test_continuous_batching_never_drops_a_setting(request, tokenizer, engine_name, sampling):
    """What the batching manager cannot apply goes to its eager fallback: the eager engine's exact result."""
    batching = request.getfixturevalue(engine_name)
    prompt = prompt_of(tokenizer, "Tabs and spaces", **{"max_new_tokens": 30, "options": GREEDY, **sampling})
    expected = run(TransformersEngine(batching.model), [prompt])[prompt.request_id]
    (ids, logprobs, scored, final), = run(batching, [Prompt(prompt.token_ids, prompt.sampling)]).values()
    assert (ids, logprobs, scored, final.finish_reason) == expected[:3] + (expected[3].finish_reason,)
    plain = run(batching, [prompt_of(tokenizer, "Tabs and spaces", max_new_tokens=30, options=GREEDY)])
    assert (ids, logprobs, scored) != tuple(next(iter(plain.values()))[:3])


def test_chat_inputs_take_openais_penalties_in_range():
    from modelscope_llama2.prompts.requests import parse_chat_inputs

    request = parse_chat_inputs({"text": "Hi", "frequency_penalty": 0.5, "presence_penalty": -2})
    assert request.spec.generate_kwargs == {"frequency_penalty": 0.5, "presence_penalty": -2}
    for bad in (2.5, "1", True):
        with pytest.raises(ValueError, match=r"inputs\['presence_penalty'\]: expected a number in \[-2.0, 2.0\]"):
            parse_chat_inputs({"text": "Hi", "presence_penalty": bad})
