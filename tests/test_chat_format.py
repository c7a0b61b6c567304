"""Prompt token ids, compared with an independent re-implementation of Meta's ``chat_completion``."""

import pytest
import sentencepiece as spm
from modelscope.models.nlp.llama2 import Llama2Tokenizer as ModelScopeLlama2Tokenizer
from transformers import AutoTokenizer, LlamaTokenizerFast

from modelscope_llama2 import Llama2Tokenizer
from modelscope_llama2.prompts.chat_format import dialog_from_history, encode_dialog, fit_dialog
from tests.helpers import ForwardLog, as_meta_dialog, meta_chat_tokens

LONG_HISTORY = [(f"question {i}: what is {i} + {i}?", f"{i} + {i} = {2 * i}.") for i in range(12)]

# (system, history, text): at least 20 dialogs over the cases that trip prompt builders up.
DIALOGS = [
    (None, [], "Where is the capital of Zhejiang?"),
    ("you are a helpful assistant!", [], "Where is the capital of Zhejiang?"),
    ("you are a helpful assistant!", [("Where is the capital of Zhejiang?", "Hangzhou.")],
     "What are the interesting places there?"),
    ("", [], "system is the empty string"),
    (None, [("hi", "hello")], "system is None"),
    (None, [], "浙江的省会是哪里？"),
    ("请用中文回答。", [("你好", "你好！有什么可以帮你？")], "西湖在哪里？"),
    (None, [], "emoji 😀🎉👍🏽 and a dragon 🐉 and ©®™"),
    (None, [], "digits 0123456789 and 3.14159 and 2023-07-18"),
    (None, [], "runs  of   spaces    inside"),
    (None, [], "   leading and trailing spaces   "),
    (None, [], "tabs\tin\t\tthe\ttext"),
    (None, [], "new\nlines\n\nand paragraphs\n"),
    ("multi-line\nsystem\n\nprompt", [], "hi"),
    ("  system with spaces  ", [], "  user with spaces  "),
    (None, [("first", ""), ("second", "  ")], "empty answers in history"),
    (None, [("", "answer to an empty message")], ""),
    (None, [], "user text with </s> and <s> in it"),
    (None, [("tell me </s>", "<s> is plain text too </s>")], "<unk> as well"),
    ("you are a helpful assistant!", LONG_HISTORY, "and the next one?"),
    (None, LONG_HISTORY, "long history, no system"),
    (None, [], "日本語 and 한국어 mixed with English"),
    ("sys", [("a\tb", "c\nd")], "e  f"),
    (None, [], "x"),
]


@pytest.fixture(scope="module")
def sp(tiny_dir):
    return spm.SentencePieceProcessor(model_file=f"{tiny_dir}/tokenizer.model")


@pytest.mark.parametrize("system,history,text", DIALOGS)
def test_encode_dialog_matches_meta(sp, system, history, text):
    expected = meta_chat_tokens(sp, as_meta_dialog(system, history, text))
    dialog = dialog_from_history(text, history, system)
    assert encode_dialog(dialog, sp.encode, sp.bos_id(), sp.eos_id()) == expected


def test_empty_system_adds_no_sys_block(sp):
    without = encode_dialog(dialog_from_history("hi"), sp.encode, 1, 2)
    assert encode_dialog(dialog_from_history("hi", system=""), sp.encode, 1, 2) == without
    assert encode_dialog(dialog_from_history("hi", system=None), sp.encode, 1, 2) == without
    assert without == [1, *sp.encode("[INST] hi [/INST]")]


def test_bos_after_eos_is_an_id_not_text(sp):
    ids = encode_dialog(dialog_from_history("b", [("a", "x")]), sp.encode, 1, 2)
    first_round = [1, *sp.encode("[INST] a [/INST] x "), 2]
    assert ids[: len(first_round)] == first_round
    assert ids[len(first_round)] == 1 and ids.count(1) == 2 and ids.count(2) == 1


def prompt_ids_fed_to_model(model, tokenizer, inputs):
    """The input ids of the model's first forward pass during chat()."""
    with ForwardLog(model) as log:
        model.chat({**inputs, "max_new_tokens": 1, "do_sample": False}, tokenizer)
    return log.calls[0]


@pytest.fixture(scope="module", params=["package", "modelscope-import", "transformers-fast", "auto"])
def any_tokenizer(request, tiny_dir):
    load = {
        "package": Llama2Tokenizer.from_pretrained,
        "modelscope-import": ModelScopeLlama2Tokenizer.from_pretrained,
        "transformers-fast": LlamaTokenizerFast.from_pretrained,
        "auto": AutoTokenizer.from_pretrained,
    }[request.param]
    return load(tiny_dir)


@pytest.mark.parametrize("system,history,text", DIALOGS)
def test_chat_feeds_meta_tokens_with_any_tokenizer(tiny_model, any_tokenizer, sp, system, history, text):
    tiny_model.set_prompt_cache(max_entries=0)  # the whole prompt reaches the first forward pass
    inputs = {"text": text, "history": history}
    if system is not None:
        inputs["system"] = system
    expected = meta_chat_tokens(sp, as_meta_dialog(system, history, text))
    assert prompt_ids_fed_to_model(tiny_model, any_tokenizer, inputs) == expected


def test_fit_dialog_drops_oldest_rounds_and_keeps_system(sp):
    history = LONG_HISTORY
    dialog = dialog_from_history("last?", history, "keep me")
    full = encode_dialog(dialog, sp.encode, 1, 2)
    for dropped in (1, 5, len(history)):
        expected = meta_chat_tokens(sp, as_meta_dialog("keep me", history[dropped:], "last?"))
        budget = len(expected)
        assert budget < len(full)
        assert fit_dialog(dialog, sp.encode, 1, 2, budget) == (expected, dropped)
    assert fit_dialog(dialog, sp.encode, 1, 2, len(full)) == (full, 0)


def test_fit_dialog_refuses_when_system_and_message_alone_do_not_fit(sp):
    dialog = dialog_from_history("a fairly long current message", [("x", "y")], "a system prompt")
    alone = len(meta_chat_tokens(sp, as_meta_dialog("a system prompt", [], "a fairly long current message")))
    with pytest.raises(ValueError, match=f"take {alone} tokens, more than the {alone - 1} tokens"):
        fit_dialog(dialog, sp.encode, 1, 2, alone - 1)
