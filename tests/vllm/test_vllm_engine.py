"""The vLLM engine on real vLLM (CPU build): Meta's ids in, transformers' greedy tokens out, the engine contract.

Every test shares one engine (see conftest.py); each uses fresh request ids.
"""

import threading

import pytest
import sentencepiece as spm
import torch

pytest.importorskip("vllm")

from modelscope_llama2.constants import EOS_ID  # noqa: E402
from modelscope_llama2.decoding import decode_stream  # noqa: E402
from modelscope_llama2.prompts.chat_format import dialog_from_history, encode_dialog  # noqa: E402
from modelscope_llama2.prompts.prompt import Prompt, SamplingParams  # noqa: E402
from tests.helpers import as_meta_dialog, meta_chat_tokens  # noqa: E402
from tests.helpers import DIALOGS  # noqa: E402

GREEDY = {"do_sample": False}
# Dialogs the demo checkpoint was trained on (short answers ending in EOS) and
# some it was not (long answers that run into the token limit).
ANSWERED = [
    (None, [], "Where is the capital of Zhejiang?"),
    (None, [("Where is the capital of Zhejiang?", "The capital of Zhejiang Province is Hangzhou.")],
     "What are the interesting places there?"),
    ("Answer in one word.", [], "Where is the capital of Zhejiang?"),
    (None, [], "Say hello in emoji."),
    (None, [], "Hi!"),
    (None, [], "digits 0123456789 and 3.14159 and 2023-07-18"),
    (None, [], "浙江的省会是哪里？"),
    ("multi-line\nsystem\n\nprompt", [], "tabs\tin\t\tthe\ttext"),
]


def chat_ids(tokenizer, system, history, text):
    return tuple(encode_dialog(dialog_from_history(text, history, system), tokenizer.sp_model.encode, 1, 2))


def prompt(token_ids, max_new_tokens=32, **sampling):
    options = sampling.pop("options", GREEDY)
    return Prompt(tuple(token_ids), SamplingParams(max_new_tokens, options=options, **sampling))


def run(engine, prompts):
    """``{request_id: (token ids, finish event)}`` for one ``generate()`` call."""
    ids, finals = {p.request_id: [] for p in prompts}, {}
    for event in engine.generate(prompts):
        assert event.request_id not in finals, "no event after a request's last one"
        ids[event.request_id] += event.token_ids
        if event.finished:
            finals[event.request_id] = event
    return {rid: (ids[rid], finals[rid]) for rid in ids}


@pytest.fixture(scope="module")
def transformers_model(vllm_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()


def transformers_greedy(model, token_ids, max_new_tokens, min_new_tokens=0):
    with torch.inference_mode():
        out = model.generate(torch.tensor([token_ids]), attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             max_length=None, pad_token_id=0)
    new = out[0, len(token_ids):].tolist()
    return (new[: new.index(EOS_ID)], "eos") if EOS_ID in new else (new, "length")


def test_prompt_ids_handed_to_vllm_are_metas(vllm_engine, demo_tokenizer, received_prompts):
    sp = spm.SentencePieceProcessor(model_file=demo_tokenizer.vocab_file)
    expected = {}
    prompts = []
    for system, history, text in DIALOGS:
        meta = meta_chat_tokens(sp, as_meta_dialog(system, history, text))
        p = prompt(chat_ids(demo_tokenizer, system, history, text), max_new_tokens=1)
        expected[p.request_id] = meta
        prompts.append(p)
    results = run(vllm_engine, prompts)
    assert received_prompts == expected
    assert all(final.usage.prompt_tokens == len(expected[rid]) for rid, (_, final) in results.items())


def test_greedy_tokens_equal_transformers(vllm_engine, demo_tokenizer, transformers_model):
    prompts = [prompt(chat_ids(demo_tokenizer, *dialog), max_new_tokens=40) for dialog in ANSWERED]
    # Past what the demo was trained on: EOS held back, 40 tokens of free-running text.
    long_run = {"do_sample": False, "min_new_tokens": 40}
    prompts += [prompt(demo_tokenizer.encode("The capital of Zhejiang is", bos=True), 40, options=long_run),
                prompt(chat_ids(demo_tokenizer, None, [], "Hi!"), 40, options=long_run)]
    results = run(vllm_engine, prompts)  # all in flight together: vLLM batches them
    reasons = set()
    for p in prompts:
        ids, final = results[p.request_id]
        expected_ids, expected_reason = transformers_greedy(transformers_model, list(p.token_ids), 40,
                                                            p.sampling.options.get("min_new_tokens", 0))
        assert (ids, final.finish_reason) == (expected_ids, expected_reason), demo_tokenizer.decode(p.token_ids)
        assert final.usage.completion_tokens == len(ids) and EOS_ID not in ids
        reasons.add(final.finish_reason)
    assert reasons == {"eos", "length"}  # both endings were compared
    first = results[prompts[0].request_id][0]
    # Meta's format trains " {answer} " before EOS; the facades strip the space.
    assert demo_tokenizer.decode(first) == "The capital of Zhejiang Province is Hangzhou. "


def test_events_stream_token_by_token_and_end_with_usage(vllm_engine, demo_tokenizer):
    p = prompt(chat_ids(demo_tokenizer, None, [], "Hello"), max_new_tokens=64)
    events = list(vllm_engine.generate([p]))
    assert len(events) > 5 and all(not e.finished for e in events[:-1])
    tokens = [t for e in events for t in e.token_ids]
    final = events[-1]
    assert final.finish_reason == "eos"
    assert final.usage.prompt_tokens == len(p.token_ids) and final.usage.completion_tokens == len(tokens)
    text = demo_tokenizer.decode(tokens)
    assert text == "Hello! I am a tiny demo checkpoint. Ask me: Where is the capital of Zhejiang? "


def test_token_limit_ends_with_length(vllm_engine, demo_tokenizer):
    p = prompt(chat_ids(demo_tokenizer, None, [], "Where is the capital of Zhejiang?"), max_new_tokens=3)
    ids, final = run(vllm_engine, [p])[p.request_id]
    assert len(ids) == 3 and final.finish_reason == "length" and final.usage.completion_tokens == 3


def test_prompt_near_the_context_end_gets_the_room_left(vllm_engine, demo_tokenizer):
    room = 4
    body = demo_tokenizer.encode("West Lake " * 2000)[: vllm_engine.context_length - 1 - room]
    p = prompt([1, *body], max_new_tokens=100, options={"do_sample": False, "min_new_tokens": 50})
    ids, final = run(vllm_engine, [p])[p.request_id]
    assert (len(ids), final.finish_reason) == (room, "length")


def test_batch_from_many_threads_equals_one_at_a_time(vllm_engine, demo_tokenizer):
    dialogs = ANSWERED * 2
    alone = [run(vllm_engine, [prompt(chat_ids(demo_tokenizer, *d))]) for d in dialogs[:len(ANSWERED)]]
    expected = [next(iter(r.values()))[0] for r in alone] * 2
    answers = [None] * len(dialogs)

    def ask(i):
        p = prompt(chat_ids(demo_tokenizer, *dialogs[i]))
        answers[i] = run(vllm_engine, [p])[p.request_id][0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(dialogs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert answers == expected


def test_stop_string_aborts_the_request_in_vllm(vllm_engine, demo_tokenizer):
    ids = chat_ids(demo_tokenizer, None, [], "Where is the capital of Zhejiang?")
    full = next(iter(run(vllm_engine, [prompt(ids)]).values()))
    p = prompt(ids, stop=("Province",))
    deltas = list(decode_stream(vllm_engine, [p], demo_tokenizer))
    assert "".join(d.text for d in deltas) == "The capital of Zhejiang "
    final = deltas[-1]
    assert final.finish_reason == "stop"
    assert final.usage.completion_tokens < len(full[0])  # generation ended early, not after EOS


def test_seed_makes_sampling_reproducible(vllm_engine, demo_tokenizer):
    ids = chat_ids(demo_tokenizer, None, [], "Tell me a story about dragons")
    hot = {"do_sample": True, "temperature": 2.0, "top_k": 0}

    def sample(seed):
        return [next(iter(run(vllm_engine, [prompt(ids, seed=seed, options=hot)]).values()))[0] for _ in range(2)]

    runs = {seed: sample(seed) for seed in (1, 2, 3)}
    assert all(a == b for a, b in runs.values())
    assert len({tuple(a) for a, _ in runs.values()}) > 1
    together = run(vllm_engine, [prompt(ids, seed=1, options=hot) for _ in range(3)])
    assert [ids for ids, _ in together.values()] == [runs[1][0]] * 3


def test_min_new_tokens_keeps_eos_away(vllm_engine, demo_tokenizer):
    ids = chat_ids(demo_tokenizer, None, [], "Where is the capital of Zhejiang?")
    p = prompt(ids, max_new_tokens=20, options={"do_sample": False, "min_new_tokens": 15})
    tokens, final = run(vllm_engine, [p])[p.request_id]
    assert len(tokens) >= 15 and EOS_ID not in tokens


def long_prompt(tokenizer, max_new_tokens=1000):
    ids = chat_ids(tokenizer, None, [], "Where is the capital of Zhejiang?")
    return prompt(ids, max_new_tokens=max_new_tokens, options={"do_sample": False, "min_new_tokens": max_new_tokens})


def test_abort_from_another_thread(vllm_engine, demo_tokenizer):
    target, other = long_prompt(demo_tokenizer), prompt(chat_ids(demo_tokenizer, None, [], "Hi!"))
    events = vllm_engine.generate([target, other])
    seen = {target.request_id: [], other.request_id: []}
    finals = {}
    for event in events:
        seen[event.request_id] += event.token_ids
        if event.finished:
            finals[event.request_id] = event
        if len(seen[target.request_id]) >= 3 and not finals.get(target.request_id):
            threading.Thread(target=vllm_engine.abort, args=(target.request_id,)).start()
    assert finals[target.request_id].finish_reason == "abort"
    assert 3 <= finals[target.request_id].usage.completion_tokens < 1000
    assert finals[other.request_id].finish_reason == "eos"  # the other request is not affected
    vllm_engine.abort(target.request_id)  # finished: ignored


def test_abort_before_iterating(vllm_engine, demo_tokenizer, received_prompts):
    p = long_prompt(demo_tokenizer)
    events = vllm_engine.generate([p])
    vllm_engine.abort(p.request_id)
    (final,) = list(events)
    assert final.finish_reason == "abort" and final.usage.completion_tokens == 0
    assert received_prompts == {}  # it never reached vLLM


def test_closing_the_iterator_aborts(vllm_engine, demo_tokenizer):
    p = long_prompt(demo_tokenizer)
    events = vllm_engine.generate([p])
    next(events)
    events.close()
    assert vllm_engine.async_llm.get_num_unfinished_requests() == 0
    # the id is free again once the request is gone
    ids, final = run(vllm_engine, [Prompt(p.token_ids, SamplingParams(2, options=GREEDY), request_id=p.request_id)])[
        p.request_id]
    assert final.finish_reason == "length"


def test_next_turn_reuses_the_cached_prefix(vllm_engine, demo_tokenizer):
    history = [(f"question {i}: what is {i} + {i}?", f"{i} + {i} = {2 * i}.") for i in range(12)]
    first = prompt(chat_ids(demo_tokenizer, "a fresh system prompt 7f3a", history, "and the next one?"))
    answer, final = run(vllm_engine, [first])[first.request_id]
    second = prompt(chat_ids(demo_tokenizer, "a fresh system prompt 7f3a",
                             history + [("and the next one?", demo_tokenizer.decode(answer))], "thanks!"))
    assert second.token_ids[: len(first.token_ids)] == first.token_ids and len(first.token_ids) > 256
    _, final = run(vllm_engine, [second])[second.request_id]
    assert 128 <= final.usage.cached_tokens <= len(first.token_ids)


@pytest.mark.parametrize("options,message", [
    ({"num_beams": 2}, r"inputs\['num_beams'\]: not supported by the vllm engine"),
    ({"typical_p": 0.5}, r"inputs\['typical_p'\]: not supported by the vllm engine"),
    ({"do_sample": True, "temperature": 3.0}, r"inputs\['temperature'\]: the vllm engine cannot take it: "
                                              r"temperature must be in \[0, 2\]"),
])
def test_unsupported_settings_are_refused_by_name(vllm_engine, received_prompts, options, message):
    with pytest.raises(ValueError, match=message):
        vllm_engine.generate([prompt([1, 100], options=options)])
    assert received_prompts == {}


def test_bad_prompts_are_refused_before_reaching_vllm(vllm_engine, received_prompts):
    cases = [
        ([prompt([])], r"prompts\[0\]\.token_ids: empty"),
        ([prompt([1, 10 ** 6])], r"prompts\[0\]\.token_ids: 1000000 is not a token id"),
        ([prompt([1] * vllm_engine.context_length)],
         rf"prompts\[0\]\.token_ids: {vllm_engine.context_length} tokens leave no room"),
    ]
    for prompts, message in cases:
        with pytest.raises(ValueError, match=message):
            vllm_engine.generate(prompts)
    twice = prompt([1, 100])
    with pytest.raises(ValueError, match="request_id .* already in use"):
        vllm_engine.generate([twice, twice])
    assert received_prompts == {}


def test_left_out_settings_fall_back_as_in_transformers(vllm_engine, vllm_model_dir, tmp_path):
    from transformers import GenerationConfig

    from modelscope_llama2.engines.vllm_engine import TRANSFORMERS_DEFAULTS, checkpoint_sampling_defaults

    fallback = GenerationConfig._get_default_generation_params()
    assert TRANSFORMERS_DEFAULTS == {key: fallback[key] for key in TRANSFORMERS_DEFAULTS}
    assert vllm_engine.defaults == {**TRANSFORMERS_DEFAULTS, "do_sample": False}  # the demo's generation config
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9).save_pretrained(tmp_path)
    assert checkpoint_sampling_defaults(str(tmp_path)) == {**TRANSFORMERS_DEFAULTS, "do_sample": True,
                                                           "temperature": 0.6, "top_p": 0.9}


def submitted(engine, p, abort_after=None):
    """``(token ids, final event, names of the threads that delivered)`` of one ``submit()`` request."""
    ids, finals, threads, done = [], [], set(), threading.Event()

    def on_event(event):
        assert not finals, "no event after a request's last one"
        threads.add(threading.current_thread().name)
        ids.extend(event.token_ids)
        if abort_after is not None and len(ids) >= abort_after:
            engine.abort(p.request_id)
        if event.finished:
            finals.append(event)
            done.set()

    engine.submit(p, on_event)
    assert done.wait(300)
    return ids, finals[0], threads


def test_submit_pushes_generate_s_events_from_the_engine_s_thread(vllm_engine, demo_tokenizer):
    for dialog in ANSWERED[:3]:
        p = prompt(chat_ids(demo_tokenizer, *dialog), max_new_tokens=48)
        expected, expected_final = run(vllm_engine, [p])[p.request_id]  # the id is free again afterwards
        ids, final, threads = submitted(vllm_engine, p)
        assert (ids, final.finish_reason, final.usage) == (expected, expected_final.finish_reason,
                                                           expected_final.usage)
        assert threads == {"modelscope-llama2-vllm"}  # no thread per request
    ids, final, _ = submitted(vllm_engine, p)  # a finished request's id may be used again
    assert ids == expected


def test_submit_abort_and_bad_input(vllm_engine, demo_tokenizer, received_prompts):
    ids, final, _ = submitted(vllm_engine, long_prompt(demo_tokenizer), abort_after=3)
    assert final.finish_reason == "abort" and 3 <= final.usage.completion_tokens < 1000
    with pytest.raises(ValueError, match=r"token_ids: 1000000 is not a token id"):
        vllm_engine.submit(prompt([1, 10 ** 6]), lambda event: None)
    assert len(received_prompts) == 1  # only the aborted request reached vLLM
