"""KV-cache reuse across turns: same greedy outputs as without it, less prefill."""

import threading

import pytest

from modelscope_llama2 import PromptCache
from modelscope_llama2.prompts.chat_format import dialog_from_history, encode_dialog
from tests.helpers import ForwardLog, assert_usage, without_usage

SYSTEM = "you are a helpful assistant!"
QUESTIONS = ["Where is the capital of Zhejiang?", "What are the interesting places there?", "西湖在哪里？",
             "Tell me more  about   it.", "And the food? 😀"]


def converse(model, tokenizer, questions, system=SYSTEM, **settings):
    """The documented usage: each turn passes back the history it got."""
    history, outputs = [], []
    for text in questions:
        out = model.chat({"text": text, "system": system, "history": history, "max_new_tokens": 10,
                          "do_sample": False, **settings}, tokenizer)
        history = out["history"]
        outputs.append(out)
    return outputs


@pytest.fixture
def without_reuse(tiny_model, tokenizer):
    def run(*args, **kwargs):
        tiny_model.set_prompt_cache(max_entries=0)
        try:
            return converse(tiny_model, tokenizer, *args, **kwargs)
        finally:
            tiny_model.set_prompt_cache()
    return run


def test_multi_turn_reuse_gives_identical_outputs_and_prefills_only_new_tokens(tiny_model, tokenizer, without_reuse):
    expected = without_reuse(QUESTIONS)
    with ForwardLog(tiny_model) as log:
        outputs = converse(tiny_model, tokenizer, QUESTIONS)
    assert without_usage(outputs) == without_usage(expected)
    prefills = [len(ids) for ids in log.calls if len(ids) > 1]
    prompts = [len(prompt_ids(tokenizer, out["history"][:-1], out["history"][-1][0])) for out in expected]
    stats = tiny_model.prompt_cache.stats
    assert stats.lookups == len(QUESTIONS) and stats.hits == len(QUESTIONS) - 1
    # usage tells the caller what the cache saved: each prompt is prefilled minus its cached tokens.
    for out, reference, prompt, prefill in zip(outputs, expected, prompts, prefills):
        assert_usage(reference, prompt, 10, cached_tokens=0)
        assert_usage(out, prompt, 10, cached_tokens=prompt - prefill)
    assert outputs[0]["usage"]["cached_tokens"] == 0
    assert all(out["usage"]["cached_tokens"] > 0 for out in outputs[1:])
    assert sum(out["usage"]["cached_tokens"] for out in outputs) == stats.reused_tokens
    # Each turn prefills at most what its prompt adds to the previous prompt:
    # the new message, the last answer, and nothing before them.
    assert prefills[0] == prompts[0]
    assert all(prefill <= now - before for prefill, now, before in zip(prefills[1:], prompts[1:], prompts))
    assert stats.reused_tokens >= sum(prompts[:-1])


def prompt_ids(tokenizer, history, text):
    dialog = dialog_from_history(text, history, SYSTEM)
    return encode_dialog(dialog, tokenizer.sp_model.encode, tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_truncated_history_reuses_what_still_matches(tiny_model, tokenizer, without_reuse):
    questions = QUESTIONS * 2
    expected = without_reuse(questions, max_length=200)
    outputs = converse(tiny_model, tokenizer, questions, max_length=200)
    assert without_usage(outputs) == without_usage(expected)
    assert tiny_model.prompt_cache.stats.hits >= 1
    # Rounds were dropped to fit, the same with and without reuse, and reported.
    dropped = [out["dropped_rounds"] for out in outputs]
    assert dropped[0] == 0 and max(dropped) > 0 and dropped == [out["dropped_rounds"] for out in expected]
    assert sum(out["usage"]["cached_tokens"] for out in outputs) == tiny_model.prompt_cache.stats.reused_tokens > 0


def test_edited_history_recomputes_from_the_edit(tiny_model, tokenizer, without_reuse):
    first = converse(tiny_model, tokenizer, QUESTIONS[:3])
    edited = [list(pair) for pair in first[-1]["history"]]
    edited[1][1] = "an answer the model never gave"
    inputs = {"text": "next?", "system": SYSTEM, "history": edited, "max_new_tokens": 10, "do_sample": False}
    with_reuse = tiny_model.chat(inputs, tokenizer)
    tiny_model.set_prompt_cache(max_entries=0)
    without = tiny_model.chat(inputs, tokenizer)
    assert without_usage(with_reuse) == without_usage(without)
    # Exactly the tokens before the edit came from the cache (of the last turn's prompt).
    before_edit = prompt_ids(tokenizer, first[-1]["history"][:-1], QUESTIONS[2])
    now = prompt_ids(tokenizer, edited, "next?")
    shared = next(i for i, (a, b) in enumerate(zip(before_edit, now)) if a != b)
    assert shared > len(prompt_ids(tokenizer, [], QUESTIONS[0]))
    assert_usage(with_reuse, len(now), 10, cached_tokens=shared)
    assert_usage(without, len(now), 10, cached_tokens=0)


def test_interleaved_conversations_each_keep_their_cache(tiny_model, tokenizer, without_reuse):
    conversations = {"a": QUESTIONS, "b": list(reversed(QUESTIONS)), "c": QUESTIONS[1:] + QUESTIONS[:1]}
    expected = {name: without_reuse(qs) for name, qs in conversations.items()}
    histories = {name: [] for name in conversations}
    got = {name: [] for name in conversations}
    for turn in range(len(QUESTIONS)):
        for name, questions in conversations.items():
            out = tiny_model.chat({"text": questions[turn], "system": SYSTEM, "history": histories[name],
                                   "max_new_tokens": 10, "do_sample": False}, tokenizer)
            histories[name] = out["history"]
            got[name].append(out)
    assert {name: without_usage(outs) for name, outs in got.items()} == {
        name: without_usage(outs) for name, outs in expected.items()}
    assert all(out["usage"]["cached_tokens"] > 0 for outs in got.values() for out in outs[1:])
    # Every turn after each conversation's first found its own entry again.
    stats = tiny_model.prompt_cache.stats
    assert stats.hits == stats.lookups - 1 and len(tiny_model.prompt_cache) == 3


def test_two_threads_chatting_at_once_do_not_cross_talk(tiny_model, tokenizer, without_reuse):
    plans = {"a": QUESTIONS, "b": list(reversed(QUESTIONS))}
    expected = {name: without_reuse(qs) for name, qs in plans.items()}
    got, errors = {}, []

    def worker(name):
        try:
            got[name] = converse(tiny_model, tokenizer, plans[name])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,)) for name in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and {name: without_usage(outs) for name, outs in got.items()} == {
        name: without_usage(outs) for name, outs in expected.items()}
    assert all(out["usage"]["cached_tokens"] > 0 for outs in got.values() for out in outs[1:])


def test_lru_bound_clear_and_off(tiny_model, tokenizer):
    cache = tiny_model.set_prompt_cache(max_entries=2)
    for i in range(5):
        converse(tiny_model, tokenizer, [f"conversation {i}"], system=f"system {i}")
    assert len(cache) == 2
    one_entry = cache.nbytes // 2
    cache = tiny_model.set_prompt_cache(max_entries=10, max_bytes=3 * one_entry)
    for i in range(5):
        converse(tiny_model, tokenizer, [f"conversation {i}"], system=f"system {i}")
    assert 0 < cache.nbytes <= 3 * one_entry and len(cache) <= 3
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    cache = tiny_model.set_prompt_cache(max_entries=0)
    converse(tiny_model, tokenizer, QUESTIONS[:2])
    assert not cache.enabled and len(cache) == 0 and cache.stats.hits == 0


def test_prompt_cache_refuses_bad_bounds():
    with pytest.raises(ValueError, match="max_entries: expected a non-negative int"):
        PromptCache(max_entries=-1)
    with pytest.raises(ValueError, match="max_bytes: expected a non-negative int or None"):
        PromptCache(max_bytes="1GB")


def held_bytes(kv):
    """Bytes of the storage behind a KV cache's tensors (a cropped view still holds all of it)."""
    return sum(t.untyped_storage().nbytes() for layer in kv.layers for t in (layer.keys, layer.values))


def test_a_diverging_prompt_copies_only_the_shared_prefix_within_the_byte_cap(tiny_model, tokenizer):
    # Finding 15 of issue 19: the whole cache was deep-copied (memory doubled, uncounted) before cropping.
    cache = tiny_model.set_prompt_cache(max_entries=4)
    converse(tiny_model, tokenizer, ["Where is the capital of Zhejiang?"])
    held, (length,) = cache.nbytes, [len(ids) for ids, *_ in cache._entries.values()]
    other = encode_dialog(dialog_from_history("Something else", [], SYSTEM), tokenizer.sp_model.encode, 1, 2)
    kv, usable = cache.checkout(other)
    assert 0 < usable < length * 0.6 and kv.get_seq_length() == usable
    assert held_bytes(kv) == held * usable // length  # the prefix, not a copy of everything
    assert len(cache) == 1 and cache.nbytes == held  # the entry stays for its own conversation

    # With no room for a copy next to it, the entry itself is taken: memory never exceeds the cap.
    cache = tiny_model.set_prompt_cache(max_entries=4, max_bytes=held)
    converse(tiny_model, tokenizer, ["Where is the capital of Zhejiang?"])
    kv, usable = cache.checkout(other)
    assert kv.get_seq_length() == usable and len(cache) == 0
