"""``pipeline(..., llm_framework='vllm')`` and the model's chat API on vLLM give what the transformers engine gives."""

import pytest

pytest.importorskip("vllm")

from modelscope.pipelines import pipeline  # noqa: E402

from modelscope_llama2 import Llama2Tokenizer  # noqa: E402
from modelscope_llama2.model import EngineChatModel  # noqa: E402

ZHEJIANG = "Where is the capital of Zhejiang?"
CHATS = [
    {"text": ZHEJIANG},
    {"text": ZHEJIANG, "system": "Answer in one word."},
    {"text": "What are the interesting places there?",
     "history": [(ZHEJIANG, "The capital of Zhejiang Province is Hangzhou.")]},
    {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Say hello in emoji."}]},
    {"text": "Hi!", "max_new_tokens": 5},
    {"text": ZHEJIANG, "stop": ["Province"]},
    {"text": "and now?", "history": [(f"question {i}", f"answer {i}") for i in range(30)], "max_length": 120},
]


@pytest.fixture(scope="module")
def transformers_model(vllm_model_dir):
    import modelscope_llama2  # noqa: F401
    from modelscope import Model

    return Model.from_pretrained(vllm_model_dir, device="cpu")


def comparable(result):
    """A result without what legitimately differs between engines (prefix-cache hits)."""
    usage = dict(result["usage"])
    usage.pop("cached_tokens")
    return {**result, "usage": usage}


def test_pipeline_answers_the_model_cards_two_turn_usage(vllm_chat_pipe):
    assert isinstance(vllm_chat_pipe.model, EngineChatModel)
    first = vllm_chat_pipe(ZHEJIANG, max_length=512, do_sample=False)
    assert first["response"] == "The capital of Zhejiang Province is Hangzhou."
    second = vllm_chat_pipe("What are the interesting places there?", history=first["history"])
    assert second["response"] == "West Lake, Lingyin Temple and the Grand Canal are worth a visit."
    assert second["history"] == [(ZHEJIANG, first["response"]), ("What are the interesting places there?",
                                                                   second["response"])]


@pytest.mark.parametrize("inputs", CHATS, ids=range(len(CHATS)))
def test_chat_equals_the_transformers_engine(vllm_chat_pipe, transformers_model, vllm_model_dir, inputs):
    tokenizer = Llama2Tokenizer.from_pretrained(vllm_model_dir)
    expected = transformers_model.chat(dict(inputs), tokenizer)
    assert comparable(vllm_chat_pipe.model.chat(dict(inputs), tokenizer)) == comparable(expected)
    streamed = list(vllm_chat_pipe.model.stream_chat(dict(inputs), tokenizer))
    assert comparable(streamed[-1]) == comparable(expected)
    assert all(a["response"] == b["response"][: len(a["response"])] for a, b in zip(streamed, streamed[1:]))


def test_batch_equals_the_transformers_engine(vllm_chat_pipe, transformers_model, vllm_model_dir):
    tokenizer = Llama2Tokenizer.from_pretrained(vllm_model_dir)
    batch = [dict(c) for c in CHATS if "stop" not in c and "max_length" not in c]
    expected = [transformers_model.chat(dict(c), tokenizer) for c in batch]
    assert [comparable(r) for r in vllm_chat_pipe.model.chat(batch, tokenizer)] == [comparable(r) for r in expected]
    texts = [(c, r) for c, r in zip(batch, expected) if "text" in c]
    answers = vllm_chat_pipe([c for c, _ in texts])
    assert [a["response"] for a in answers] == [r["response"] for _, r in texts]


def test_text_generation_pipeline_on_the_same_engine(vllm_chat_pipe, transformers_model, vllm_model_dir):
    pipe = pipeline("text-generation", model=vllm_chat_pipe.model)
    out = pipe("The capital of Zhejiang is", max_new_tokens=8)
    expected = transformers_model.complete({"text": "The capital of Zhejiang is", "max_new_tokens": 8},
                                           Llama2Tokenizer.from_pretrained(vllm_model_dir))
    assert out["text"] == expected["text"] and out["finish_reason"] == expected["finish_reason"]


def test_seeded_sampling_is_reproducible_through_the_pipeline(vllm_chat_pipe):
    settings = dict(do_sample=True, temperature=2.0, top_k=0, seed=11, max_new_tokens=24)
    answers = [vllm_chat_pipe("Tell me about dragons", **settings)["response"] for _ in range(2)]
    assert answers[0] == answers[1]


def test_settings_vllm_lacks_are_refused_by_name(vllm_chat_pipe):
    with pytest.raises(ValueError, match=r"\['no_repeat_ngram_size'\]: not supported by the vllm engine"):
        vllm_chat_pipe(ZHEJIANG, no_repeat_ngram_size=2)
