"""Streaming, batches, stop strings, seeds and finish reasons on real generate() runs.

The scripted checkpoint answers every chat prompt with ``SCRIPT`` (ASCII, a
3-byte and a 4-byte character spelled with byte-fallback tokens, then EOS),
so the streamed text can be checked byte for byte.
"""

import itertools
import threading

import pytest

from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
from tests.helpers import SCRIPT, ForwardLog, assert_usage, without_usage

GREEDY = {"do_sample": False}


def test_scripted_model_answers_the_script(scripted_model, tokenizer):
    output = scripted_model.chat({"text": "hello", **GREEDY}, tokenizer)
    assert without_usage(output) == {"response": SCRIPT, "history": [("hello", SCRIPT)], "finish_reason": "eos",
                                     "dropped_rounds": 0}
    # EOS ends the answer and is not counted.
    prompt = scripted_model.prepare_chat({"text": "hello"}, tokenizer)
    assert_usage(output, len(prompt.token_ids), len(tokenizer.encode(SCRIPT)))


def test_stream_never_shows_a_broken_character_and_ends_as_chat(scripted_model, tokenizer):
    inputs = {"text": "hello", "history": [("a", "b")], **GREEDY}
    items = list(scripted_model.stream_chat(inputs, tokenizer))
    texts = [item["response"] for item in items]
    # One item per visible change: the 3 byte tokens of 龍 and the 4 of 🐉
    # show up as one step each, whole.
    assert texts == ["Y", "Yes", "Yes,", "Yes,龍", "Yes,龍🐉", "Yes,龍🐉!", "Yes,龍🐉!"]
    for text in texts:
        assert "\ufffd" not in text and text.encode("utf-8").decode("utf-8") == text
        assert SCRIPT.startswith(text)
    assert [item["finish_reason"] for item in items] == [None] * 6 + ["eos"]
    assert [item["usage"] for item in items[:-1]] == [None] * 6
    assert without_usage(items[-1]) == without_usage(scripted_model.chat(inputs, tokenizer))
    prompt = scripted_model.prepare_chat(inputs, tokenizer)
    assert_usage(items[-1], len(prompt.token_ids), len(tokenizer.encode(SCRIPT)))
    assert all(item["history"][:-1] == [("a", "b")] for item in items)


def test_stream_on_random_model_is_a_prefix_chain_ending_as_chat(tiny_model, tokenizer):
    inputs = {"text": "浙江的省会 😀", "system": "be brief", "max_new_tokens": 40, **GREEDY}
    items = list(tiny_model.stream_chat(inputs, tokenizer))
    final = tiny_model.chat(inputs, tokenizer)
    assert without_usage(items[-1]) == without_usage(final)
    # chat() after the stream reuses the streamed conversation's KV cache.
    prompt_tokens = items[-1]["usage"]["prompt_tokens"]
    assert_usage(items[-1], prompt_tokens, 40, cached_tokens=0)
    assert_usage(final, prompt_tokens, 40, cached_tokens=prompt_tokens - 1)
    for before, after in itertools.pairwise(item["response"] for item in items):
        assert after.startswith(before) and before != after or after == final["response"]
        assert not before.endswith("\ufffd")


def test_closing_a_stream_early_stops_generation(tiny_model, tokenizer):
    stream = tiny_model.stream_chat({"text": "hi", "max_new_tokens": 500, **GREEDY}, tokenizer)
    first = next(stream)
    stream.close()  # must return promptly, the worker thread joined
    assert first["finish_reason"] is None


def test_token_limit_cut_drops_an_incomplete_character(scripted_model, tokenizer):
    # 5 tokens: ▁ Y es , and the first byte of 龍.
    output = scripted_model.chat({"text": "hello", "max_new_tokens": 5, **GREEDY}, tokenizer)
    assert output["response"] == "Yes," and output["finish_reason"] == "length"


@pytest.mark.parametrize("stop,expected", [(["🐉"], "Yes,龍"), ([",", "!"], "Yes"), ("s,龍", "Ye"), (["nope"], SCRIPT)])
def test_stop_strings_end_and_strip(scripted_model, tokenizer, stop, expected):
    inputs = {"text": "hello", "stop": stop, **GREEDY}
    output = scripted_model.chat(inputs, tokenizer)
    assert output["response"] == expected
    assert output["finish_reason"] == ("eos" if expected == SCRIPT else "stop")
    streamed = [item["response"] for item in scripted_model.stream_chat(inputs, tokenizer)]
    assert streamed[-1] == expected and all(expected.startswith(text) for text in streamed)


def test_batch_equals_single_calls(tiny_model, scripted_model, tokenizer):
    batch = [
        {"text": "Where is the capital of Zhejiang?", "system": "be brief", "max_new_tokens": 12, **GREEDY},
        {"text": "hi", "max_new_tokens": 12, **GREEDY},
        {"text": "西湖", "history": [("a", "b"), ("c", "d")], "max_new_tokens": 12, **GREEDY},
    ]
    together = tiny_model.chat(batch, tokenizer)
    singles = [tiny_model.chat(inputs, tokenizer) for inputs in batch]
    assert without_usage(together) == without_usage(singles)
    # A batch runs without the prefix cache; each row counts its own prompt.
    for row, single in zip(together, singles):
        assert_usage(row, single["usage"]["prompt_tokens"], 12, cached_tokens=0)
    scripted = [{"text": "hello", **GREEDY}, {"text": "a much longer message than the first one", **GREEDY}]
    together = scripted_model.chat(scripted, tokenizer)
    assert without_usage(together) == without_usage([scripted_model.chat(i, tokenizer) for i in scripted])
    assert [row["usage"]["completion_tokens"] for row in together] == [len(tokenizer.encode(SCRIPT))] * 2


def test_batch_rows_keep_their_own_token_limits(tiny_model, tokenizer):
    batch = [{"text": "hi", "max_new_tokens": 3, **GREEDY}, {"text": "hi", "max_new_tokens": 9, **GREEDY}]
    short, long = tiny_model.chat(batch, tokenizer)
    assert without_usage(short) == without_usage(tiny_model.chat(batch[0], tokenizer))
    assert without_usage(long) == without_usage(tiny_model.chat(batch[1], tokenizer))
    assert (short["finish_reason"], long["finish_reason"]) == ("length", "length")
    assert (short["usage"]["completion_tokens"], long["usage"]["completion_tokens"]) == (3, 9)


def test_seed_makes_sampling_reproducible(tiny_model, tokenizer):
    def sample(seed):
        return tiny_model.chat({"text": "hi", "max_new_tokens": 16, "do_sample": True, "temperature": 1.5,
                                "seed": seed}, tokenizer)["response"]

    assert sample(1) == sample(1)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_seed_leaves_the_global_random_state_alone(tiny_model, tokenizer):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model.chat({"text": "hi", "max_new_tokens": 4, "do_sample": True, "seed": 9}, tokenizer)
    assert torch.equal(torch.rand(3), expected)


def test_complete_continues_plain_text(scripted_model, tokenizer):
    # No chat format: the prompt is BOS + text, which here ends like a chat prompt.
    output = scripted_model.complete({"text": "hello [/INST]", **GREEDY}, tokenizer)
    assert without_usage(output) == {"text": " " + SCRIPT, "finish_reason": "eos"}
    assert_usage(output, 1 + len(tokenizer.encode("hello [/INST]")), len(tokenizer.encode(SCRIPT)))
    echoed = scripted_model.complete({"text": "hello [/INST]", "echo": True, **GREEDY}, tokenizer)
    assert echoed["text"] == "hello [/INST] " + SCRIPT
    streamed = [item["text"] for item in scripted_model.stream_complete({"text": "hello [/INST]", **GREEDY}, tokenizer)]
    assert streamed[-1] == " " + SCRIPT and all((" " + SCRIPT).startswith(text) for text in streamed)
    batch = scripted_model.complete([{"text": "hello [/INST]", **GREEDY}, {"text": "x [/INST]", **GREEDY}], tokenizer)
    assert without_usage(batch) == [without_usage(output)] * 2


def test_complete_refuses_bad_input(tiny_model, tokenizer):
    with pytest.raises(TypeError, match=r"inputs\['echo'\]: expected a bool"):
        tiny_model.complete({"text": "x", "echo": 1}, tokenizer)
    with pytest.raises(ValueError, match=r"text: the prompt takes \d+ tokens, more than the 24 tokens"):
        tiny_model.complete({"text": "word " * 100, "max_length": 32}, tokenizer)


# -- the engine interface directly ---------------------------------------------

def _prompt(model, tokenizer, text="hello", **settings):
    return model.prepare_chat({"text": text, **GREEDY, **settings}, tokenizer)


def _by_request(events):
    """``{request_id: (ids, finish events)}`` from a list of token events."""
    out = {}
    for event in events:
        ids, finishes = out.setdefault(event.request_id, ([], []))
        ids.extend(event.token_ids)
        if event.finished:
            finishes.append(event)
    return out


def test_events_carry_each_requests_new_ids_then_one_finish(scripted_model, tokenizer):
    engine = scripted_model.engine
    prompt = _prompt(scripted_model, tokenizer)
    events = list(engine.generate([prompt]))
    assert {event.request_id for event in events} == {prompt.request_id}
    # One new id per event, EOS never among them; only the last event finishes, with usage.
    assert [event.token_ids for event in events[:-1]] == [(i,) for i in tokenizer.encode(SCRIPT)]
    assert events[-1].token_ids == () and events[-1].finish_reason == "eos"
    assert [event.finished for event in events] == [False] * (len(events) - 1) + [True]
    assert all(event.usage is None for event in events[:-1])
    usage = events[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt.token_ids), len(tokenizer.encode(SCRIPT)))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_length_finish_carries_the_last_id(scripted_model, tokenizer):
    prompt = _prompt(scripted_model, tokenizer, max_new_tokens=3)
    events = list(scripted_model.engine.generate([prompt]))
    assert [i for event in events for i in event.token_ids] == tokenizer.encode(SCRIPT)[:3]
    assert events[-1].finish_reason == "length" and events[-1].token_ids == (tokenizer.encode(SCRIPT)[2],)
    assert events[-1].usage.completion_tokens == 3


def test_usage_counts_cached_prompt_tokens_only_with_the_prefix_cache(tiny_model, tokenizer):
    engine = tiny_model.engine
    prompt = _prompt(tiny_model, tokenizer, max_new_tokens=4)
    first, again = (list(engine.generate([prompt]))[-1].usage for _ in range(2))
    assert (first.cached_tokens, again.cached_tokens) == (0, len(prompt.token_ids) - 1)
    tiny_model.set_prompt_cache(max_entries=0)
    assert [list(engine.generate([prompt]))[-1].usage.cached_tokens for _ in range(2)] == [0, 0]


def test_a_batch_keeps_each_requests_ids_limit_and_finish(tiny_model, scripted_model, tokenizer):
    short, long = (_prompt(tiny_model, tokenizer, "hi", max_new_tokens=n) for n in (3, 9))
    together = _by_request(tiny_model.engine.generate([short, long]))
    for prompt in (short, long):
        alone = _by_request(tiny_model.engine.generate([prompt]))[prompt.request_id]
        ids, finishes = together[prompt.request_id]
        assert ids == alone[0] and len(ids) == prompt.sampling.max_new_tokens
        assert [event.finish_reason for event in finishes] == ["length"]
    # A row that ends on EOS finishes once and gets nothing after it, while the others go on.
    scripted = [_prompt(scripted_model, tokenizer), _prompt(scripted_model, tokenizer, "much longer message here")]
    events = list(scripted_model.engine.generate(scripted))
    for prompt in scripted:
        mine = [event for event in events if event.request_id == prompt.request_id]
        assert [i for event in mine for i in event.token_ids] == tokenizer.encode(SCRIPT)
        assert [event.finish_reason for event in mine][-1] == "eos" and sum(e.finished for e in mine) == 1


def test_abort_from_another_thread_ends_only_that_request(tiny_model, tokenizer):
    engine = tiny_model.engine
    victim, other = (_prompt(tiny_model, tokenizer, "hi", max_new_tokens=60) for _ in range(2))
    events = []
    for event in engine.generate([victim, other]):
        events.append(event)
        if len(events) == 1:
            aborter = threading.Thread(target=engine.abort, args=(victim.request_id,))
            aborter.start()
            aborter.join()
    by_request = _by_request(events)
    victim_ids, victim_end = by_request[victim.request_id]
    other_ids, other_end = by_request[other.request_id]
    assert [event.finish_reason for event in victim_end] == ["abort"]
    assert len(victim_ids) < 60 and victim_end[0].usage.completion_tokens == len(victim_ids)
    # The other row ran to its limit, token for token what it gives alone.
    assert [event.finish_reason for event in other_end] == ["length"] and len(other_ids) == 60
    assert other_ids == _by_request(engine.generate([other]))[other.request_id][0]
    engine.abort("no-such-request")  # unknown ids are ignored


def test_closing_the_iterator_stops_generation(tiny_model, tokenizer):
    prompt = _prompt(tiny_model, tokenizer, "hi", max_new_tokens=2000)
    with ForwardLog(tiny_model) as log:
        events = tiny_model.engine.generate([prompt])
        first = next(events)
        events.close()  # returns once the worker thread has stopped
        passes = len(log.calls)
    assert first.token_ids and not first.finished
    assert not [t for t in threading.enumerate() if t.name == "modelscope-llama2-generate"]
    assert passes < 2000


def test_engine_refuses_what_it_cannot_honour(tiny_model, tokenizer):
    engine = tiny_model.engine
    with pytest.raises(ValueError, match=r"inputs\['num_beams'\]: not supported by the transformers engine"):
        engine.check_sampling(SamplingParams(max_new_tokens=4, options={"num_beams": 2}))
    first = _prompt(tiny_model, tokenizer, "hi")
    second = _prompt(tiny_model, tokenizer, "hi", seed=3)
    with pytest.raises(ValueError, match=r"inputs\[1\]: a batch runs as one generate\(\) call"):
        list(engine.generate([first, second]))
    assert list(engine.generate([])) == []
    vocab_size = tiny_model.config.vocab_size
    for ids in ((), (1, vocab_size), (1, -1)):
        bad = SamplingParams(max_new_tokens=4)
        with ForwardLog(tiny_model) as log, pytest.raises(ValueError, match=r"prompts\[1\]\.token_ids: expected a non-"):
            list(engine.generate([first, Prompt(token_ids=ids, sampling=bad)]))
        assert log.calls == []
