"""The chat and text-generation pipelines, built by ModelScope's own ``pipeline()``.

Exact answers come from the demo checkpoint (trained to answer its examples);
the seed test uses the tiny random checkpoint, whose sampling varies.
"""

import inspect
import os
import subprocess
import sys

import pytest
import torch
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks

import modelscope_llama2  # noqa: F401  (registers the pipelines)
from modelscope_llama2 import Llama2ForChat
from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.pipelines import Llama2ChatPipeline, Llama2TextGenerationPipeline
from tests.helpers import REPO_ROOT, assert_usage, without_usage

ZHEJIANG = "Where is the capital of Zhejiang?"
HANGZHOU = "The capital of Zhejiang Province is Hangzhou."
PLACES = "What are the interesting places there?"
SIGHTS = "West Lake, Lingyin Temple and the Grand Canal are worth a visit."
# Chinese pieces and emoji spelt in byte-fallback tokens (4 per character).
MULTI_BYTE = {"浙江的省会在哪里？": "浙江的省会是杭州。", "Say hello in emoji.": "👋🦙😀"}


def answer_tokens(sp, question, answer):
    """How many tokens the demo generates for ``answer`` (its part of Meta's round, EOS not counted)."""
    return len(sp.encode(f"[INST] {question} [/INST] {answer} ")) - len(sp.encode(f"[INST] {question} [/INST]"))


def test_documented_chat_calls_on_a_modelscope_llama2_repo(demo_ms_dir):
    # The calls in ModelScope's Llama 2 docs, on a dir whose configuration.json
    # names ModelScope's own (unimportable) llama2 chat pipeline.
    pipe = pipeline(task=Tasks.chat, model=demo_ms_dir, device_map="auto", torch_dtype=torch.float16)
    assert type(pipe) is Llama2ChatPipeline
    assert isinstance(pipe.model, Llama2ForChat) and pipe.model.dtype == torch.float16

    first = pipe(ZHEJIANG, max_length=512, do_sample=False)
    assert without_usage(first) == {"response": HANGZHOU, "history": [(ZHEJIANG, HANGZHOU)], "finish_reason": "eos",
                                    "dropped_rounds": 0}
    result = pipe(PLACES, history=first["history"], max_length=512, do_sample=False)
    assert without_usage(result) == {"response": SIGHTS, "history": [(ZHEJIANG, HANGZHOU), (PLACES, SIGHTS)],
                                     "finish_reason": "eos", "dropped_rounds": 0}
    # The answers' token counts, and the second turn reused the first turn's KV cache (prompt and answer).
    sp = pipe.tokenizer.sp_model
    first_prompt = [1, *sp.encode(f"[INST] {ZHEJIANG} [/INST]")]
    assert_usage(first, len(first_prompt), answer_tokens(sp, ZHEJIANG, HANGZHOU), cached_tokens=0)
    second_prompt = pipe.preprocess(PLACES, history=first["history"])["prepared"].token_ids
    assert_usage(result, len(second_prompt), answer_tokens(sp, PLACES, SIGHTS))
    assert result["usage"]["cached_tokens"] > len(first_prompt)
    one_word = pipe(ZHEJIANG, system="Answer in one word.", max_length=512, do_sample=False)
    assert one_word["response"] == "Hangzhou."


def test_modelscope_docs_legacy_token_id_settings_are_accepted_when_they_match(demo_chat_pipe):
    result = demo_chat_pipe(ZHEJIANG, max_length=512, do_sample=False, top_p=0.9, temperature=0.6,
                            repetition_penalty=1.0, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    assert result["response"] == HANGZHOU
    with pytest.raises(ValueError, match="eos_token_id: this checkpoint's tokenizer uses 2, got 5"):
        demo_chat_pipe(ZHEJIANG, eos_token_id=5)


def test_chat_pipeline_by_own_name_on_cpu():
    pipe = pipeline("chat", model=DEMO_DIR, device="cpu")
    assert type(pipe) is Llama2ChatPipeline
    assert pipe.model.device.type == "cpu" and pipe.model.dtype == torch.float32
    assert pipe(ZHEJIANG)["response"] == HANGZHOU
    # A loaded model is used as it is.
    reused = pipeline("chat", model=pipe.model)
    assert type(reused) is Llama2ChatPipeline and reused.model is pipe.model
    assert reused(ZHEJIANG)["response"] == HANGZHOU


def test_gpu_device_without_cuda_falls_back_to_cpu_and_device_map_excludes_device(demo_ms_dir):
    pipe = pipeline(Tasks.chat, model=demo_ms_dir)  # pipeline()'s default device is 'gpu'
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pipe.model.device.type == expected
    with pytest.raises(ValueError, match="device and device_map: give one"):
        Llama2ChatPipeline(model=demo_ms_dir, device="cpu", device_map="auto")


def test_preprocess_tokenizes_with_no_default_system_prompt(demo_chat_pipe):
    # preprocess yields Meta's prompt ids for exactly what the caller gave.
    sp = demo_chat_pipe.tokenizer.sp_model
    prepared = demo_chat_pipe.preprocess(ZHEJIANG)["prepared"]
    assert prepared.token_ids == (1, *sp.encode(f"[INST] {ZHEJIANG} [/INST]"))
    prepared = demo_chat_pipe.preprocess(ZHEJIANG, system="Be brief.")["prepared"]
    assert prepared.token_ids == (1, *sp.encode(f"[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{ZHEJIANG} [/INST]"))


def test_openai_style_messages_return_the_assistant_message(demo_chat_pipe):
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": ZHEJIANG},
    ]
    assert demo_chat_pipe({"messages": messages}) == {
        "message": {"role": "assistant", "content": "Hangzhou."}, "finish_reason": "eos"}
    conversation = [{"role": "user", "content": ZHEJIANG}, {"role": "assistant", "content": HANGZHOU},
                    {"role": "user", "content": PLACES}]
    assert demo_chat_pipe({"messages": conversation})["message"]["content"] == SIGHTS


@pytest.mark.parametrize("bad, error, field", [
    (42, TypeError, "input"),
    ({"role": "user", "content": ZHEJIANG}, TypeError, "messages"),
    ({"text": ZHEJIANG, "history": "not a list"}, TypeError, "history"),
    ({"text": ZHEJIANG, "temperature": -1}, ValueError, "temperature"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, ValueError, "role"),
    ({"text": ZHEJIANG, "no_such_setting": 1}, ValueError, "no_such_setting"),
])
def test_bad_input_raises_naming_the_field(demo_chat_pipe, bad, error, field):
    with pytest.raises(error, match=field):
        demo_chat_pipe(bad)
    # A stream checks its input when it is asked for, not when first read.
    with pytest.raises(error, match=field):
        demo_chat_pipe.stream(bad)


def _assert_streams_cleanly(items, final, text_key):
    """Every item is whole text (no U+FFFD), a prefix of the next, and only the last is finished."""
    texts = [item[text_key] for item in items]
    assert len(items) > 2, "streamed in one piece: nothing partial was shown"
    assert without_usage(items[-1]) == without_usage(final)
    assert items[-1]["usage"]["completion_tokens"] == final["usage"]["completion_tokens"] > 0
    assert [item["usage"] for item in items[:-1]] == [None] * (len(items) - 1)
    assert all("\ufffd" not in text for text in texts)
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert [item["finish_reason"] for item in items[:-1]] == [None] * (len(items) - 1)


@pytest.mark.parametrize("text, answer", [(ZHEJIANG, HANGZHOU), *MULTI_BYTE.items()])
def test_stream_yields_clean_prefixes_ending_in_the_chat_result(demo_chat_pipe, text, answer):
    final = demo_chat_pipe(text)
    assert final["response"] == answer
    items = demo_chat_pipe(text, stream=True)
    assert inspect.isgenerator(items)
    items = list(items)
    _assert_streams_cleanly(items, final, "response")
    assert without_usage(list(demo_chat_pipe.stream_generate(text))) == without_usage(items)


def test_streamed_messages_end_in_the_assistant_message(demo_chat_pipe):
    messages = {"messages": [{"role": "user", "content": "Say hello in emoji."}]}
    items = list(demo_chat_pipe.stream(messages))
    assert [item["message"]["content"] for item in items] == ["👋", "👋🦙", "👋🦙😀", "👋🦙😀"]
    assert items[-1] == demo_chat_pipe(messages)


def test_batch_equals_single(demo_chat_pipe, monkeypatch):
    inputs = [
        ZHEJIANG,
        {"text": PLACES, "history": [(ZHEJIANG, HANGZHOU)]},
        {"messages": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": ZHEJIANG}]},
        *MULTI_BYTE,
        "Who are you?",
    ]
    singles = [demo_chat_pipe(item) for item in inputs]
    generate_calls = _count_generate_calls(demo_chat_pipe.model, monkeypatch)
    batch = demo_chat_pipe(inputs)
    assert without_usage(batch) == without_usage(singles)
    assert len(generate_calls) == 1  # one padded batch
    assert without_usage(demo_chat_pipe(inputs, batch_size=4)) == without_usage(singles)
    assert len(generate_calls) == 3
    with_usage = [(row, single) for row, single in zip(batch, singles) if "usage" in single]
    assert len(with_usage) == len(inputs) - 1  # all but the messages input, which returns the message only
    for row, single in with_usage:
        assert_usage(row, single["usage"]["prompt_tokens"], single["usage"]["completion_tokens"], cached_tokens=0)


def _count_generate_calls(model, monkeypatch):
    """Record the batch size of each ``generate()`` call (the real one still runs)."""
    calls, generate = [], model.generate

    def counted(input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return generate(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "generate", counted)
    return calls


def test_stop_strings_pass_through_single_stream_and_batch(demo_chat_pipe):
    expected = {"response": "The capital of Zhejiang Province is", "history": [(ZHEJIANG, "The capital of Zhejiang "
                "Province is")], "finish_reason": "stop", "dropped_rounds": 0}
    assert without_usage(demo_chat_pipe(ZHEJIANG, stop=["Hangzhou"])) == expected
    items = list(demo_chat_pipe.stream(ZHEJIANG, stop=["Hangzhou"]))
    assert without_usage(items[-1]) == expected and all("Hang" not in item["response"] for item in items)
    # Generation ended at the token that completed the stop string ("▁Hangzhou"), not at EOS.
    sp = demo_chat_pipe.tokenizer.sp_model
    assert items[-1]["usage"]["completion_tokens"] == len(sp.encode(expected["response"])) + 1
    batch = demo_chat_pipe([ZHEJIANG, "浙江的省会在哪里？"], stop=["Hangzhou", "杭州"])
    assert [out["response"] for out in batch] == ["The capital of Zhejiang Province is", "浙江的省会是"]


def test_seed_makes_sampling_reproducible(tiny_ms_dir):
    pipe = pipeline(Tasks.chat, model=tiny_ms_dir, device="cpu")
    settings = dict(do_sample=True, temperature=1.5, top_p=1.0, max_new_tokens=12)
    first = pipe("Hello there", seed=1234, **settings)
    assert without_usage(pipe("Hello there", seed=1234, **settings)) == without_usage(first)
    assert without_usage(list(pipe.stream("Hello there", seed=1234, **settings))[-1]) == without_usage(first)
    others = {pipe("Hello there", seed=seed, **settings)["response"] for seed in range(4)}
    assert len(others) > 1


# -- text generation ---------------------------------------------------------

# Plain completion sees exactly the chat prompt's ids when given its text.
CHAT_PROMPT = f"[INST] {ZHEJIANG} [/INST]"


def test_text_generation_on_a_modelscope_llama2_base_repo(demo_base_dir):
    pipe = pipeline(task=Tasks.text_generation, model=demo_base_dir, device_map="auto", torch_dtype=torch.bfloat16)
    assert type(pipe) is Llama2TextGenerationPipeline and pipe.model.dtype == torch.bfloat16
    pipe = pipeline(task=Tasks.text_generation, model=demo_base_dir, device="cpu")
    assert pipe.model.dtype == torch.float32
    # The continuation only, spaces kept (a chat round is " answer " + EOS); BOS added, no chat format.
    completion = pipe(CHAT_PROMPT, do_sample=False)
    assert without_usage(completion) == {"text": f" {HANGZHOU} ", "finish_reason": "eos"}
    sp = pipe.tokenizer.sp_model
    assert_usage(completion, 1 + len(sp.encode(CHAT_PROMPT)), answer_tokens(sp, ZHEJIANG, HANGZHOU))
    assert pipe(CHAT_PROMPT, echo=True)["text"] == f"{CHAT_PROMPT} {HANGZHOU} "
    assert without_usage(pipe({"text": CHAT_PROMPT, "max_new_tokens": 3})) == {"text": " The capital of",
                                                                             "finish_reason": "length"}
    # Chat format comes from the caller only: the bare question is not answered.
    assert pipe(ZHEJIANG, max_new_tokens=8)["text"] != f" {HANGZHOU} "


def test_text_generation_stream_batch_and_stop(demo_base_dir):
    pipe = pipeline(task=Tasks.text_generation, model=demo_base_dir, device="cpu")
    emoji_prompt = "[INST] Say hello in emoji. [/INST]"
    for prompt in (CHAT_PROMPT, emoji_prompt):
        _assert_streams_cleanly(list(pipe(prompt, stream=True)), pipe(prompt), "text")
    prompts = [CHAT_PROMPT, emoji_prompt, {"text": "[INST] 浙江的省会在哪里？ [/INST]", "echo": True}]
    assert without_usage(pipe(prompts)) == without_usage([pipe(prompt) for prompt in prompts])
    assert without_usage(pipe(CHAT_PROMPT, stop=["Province"])) == {"text": " The capital of Zhejiang ",
                                                                   "finish_reason": "stop"}


def test_task_picks_the_pipeline_whatever_the_repo_names(demo_ms_dir, demo_base_dir):
    # A chat repo can complete text and a base repo can chat: the caller's task decides.
    assert type(pipeline(Tasks.text_generation, model=demo_ms_dir, device="cpu")) is Llama2TextGenerationPipeline
    assert type(pipeline(Tasks.chat, model=demo_base_dir, device="cpu")) is Llama2ChatPipeline
    by_name = pipeline(Tasks.text_generation, model=DEMO_DIR, pipeline_name="llama2-text-generation-pipeline",
                       device="cpu")
    assert type(by_name) is Llama2TextGenerationPipeline


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_placement(demo_ms_dir):
    pipe = pipeline(Tasks.chat, model=demo_ms_dir, device="gpu", torch_dtype=torch.float16)
    assert pipe.model.device.type == "cuda" and pipe.model.dtype == torch.float16
    assert pipe(ZHEJIANG)["response"] == HANGZHOU
    auto = pipeline(Tasks.chat, model=demo_ms_dir, device_map="auto", torch_dtype=torch.float16)
    assert auto.model.device.type == "cuda"
    assert list(auto.stream(ZHEJIANG))[-1] == auto(ZHEJIANG)


def test_example_script_runs_the_documented_calls():
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "examples", "chat.py"), "--device", "cpu"],
                          capture_output=True, text=True, encoding="utf-8", timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "Hangzhou.", SIGHTS,  # the model card's model.chat() calls, with its system prompt
        HANGZHOU, SIGHTS, "Hangzhou.", "{'role': 'assistant', 'content': '浙江的省会是杭州。'}", "👋🦙😀",
        "I am the modelscope_llama2 demo: a tiny Llama 2-architecture checkpoint, not a language model. For real "
        "answers run: python -m modelscope_llama2 chat --model modelscope/Llama-2-13b-chat-ms",
        "2 + 2 = 4.",
        f" {HANGZHOU} ",
    ]
