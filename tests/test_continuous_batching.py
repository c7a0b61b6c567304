"""The continuous batching engine against transformers' own ``generate()`` on the same weights."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelscope_llama2.constants import EOS_ID
from modelscope_llama2.engines.continuous_batching import GREEDY, ContinuousBatchingEngine
from modelscope_llama2.prompts.prompt import Prompt, SamplingParams




@pytest.fixture(scope="module")
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def engine(model):
    engine = ContinuousBatchingEngine(model)
    yield engine
    engine.close()


def reference(model, ids, max_new_tokens):
    """Greedy ``generate()`` ids up to (not including) EOS."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, max_length=None, do_sample=False,
                             pad_token_id=0)[0, len(ids):].tolist()
    return out[:out.index(EOS_ID)] if EOS_ID in out else out


def run(engine, prompts):
    ids = {p.request_id: [] for p in prompts}
    finals = {}
    for event in engine.generate(prompts):
        ids[event.request_id].extend(event.token_ids)
        if event.finished:
            finals[event.request_id] = event
    return ids, finals


def test_batched_greedy_ids_equal_generate(engine, model, tokenizer):
    texts = ["Hello there", "Where is the capital of Zhejiang?", "Numbers: 0123", "West Lake"]
    prompts = [Prompt(tuple(tokenizer.encode(t, bos=True)), SamplingParams(max_new_tokens=24 + i, options=GREEDY))
               for i, t in enumerate(texts)]
    ids, finals = run(engine, prompts)
    for prompt in prompts:
        expected = reference(model, list(prompt.token_ids), prompt.sampling.max_new_tokens)
        final = finals[prompt.request_id]
        assert ids[prompt.request_id] == expected
        assert final.finish_reason == ("length" if len(expected) == prompt.sampling.max_new_tokens else "eos")
        assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt.token_ids), len(expected))


def test_abort_from_another_thread_frees_the_request(engine, tokenizer):
    prompt = Prompt(tuple(tokenizer.encode("Tabs and spaces", bos=True)),
                    SamplingParams(max_new_tokens=4000, options=GREEDY))
    other = Prompt(tuple(tokenizer.encode("Hello", bos=True)), SamplingParams(max_new_tokens=5, options=GREEDY))
    events = engine.generate([prompt, other])
    first = next(events)
    threading.Thread(target=engine.abort, args=(prompt.request_id,)).start()
    finals = {e.request_id: e for e in [first, *events] if e.finished}
    assert finals[prompt.request_id].finish_reason == "abort"
    assert finals[prompt.request_id].usage.completion_tokens < 4000
    assert finals[other.request_id].finish_reason in ("length", "eos")
    scheduler = engine.manager.batch_processor.scheduler
    assert not scheduler.active_requests and not scheduler.waiting_requests


def test_sampled_requests_are_seeded(engine, tokenizer):
    def sample(seed):
        sampling = SamplingParams(max_new_tokens=12, seed=seed, options={"do_sample": True, "temperature": 1.0})
        ids, _ = run(engine, [Prompt(tuple(tokenizer.encode("Hello", bos=True)), sampling)])
        return next(iter(ids.values()))

    assert sample(3) == sample(3) != sample(4)


def test_unknown_options_are_refused(engine):
    with pytest.raises(ValueError, match="num_beams"):
        engine.check_sampling(SamplingParams(max_new_tokens=1, options={"num_beams": 2}))
