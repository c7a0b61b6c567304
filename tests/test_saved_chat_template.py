"""A saved checkpoint's tokenizer files give Meta's prompt ids to transformers' ``apply_chat_template``.

Run on the project's trained test tokenizer (a sentencepiece BPE with Llama 2's
settings; no package on the registry ships Meta's own ``tokenizer.model``).
"""

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from modelscope_llama2 import Llama2Tokenizer
from tests.helpers import DIALOGS, as_messages, has_typed_specials, meta_chat_tokens

@pytest.fixture(scope="module")
def saved(tiny_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved-tokenizer")
    Llama2Tokenizer.from_pretrained(tiny_dir).save_pretrained(directory)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    return AutoTokenizer.from_pretrained(str(directory)), sp


def template_ids(hf_tokenizer, messages):
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("system,history,text", DIALOGS + [("", [("hi", "hello")], "explicit empty system")])
def test_apply_chat_template_gives_metas_ids(saved, system, history, text):
    hf_tokenizer, sp = saved
    messages = as_messages(system, history, text)
    expected = meta_chat_tokens(sp, messages)
    if has_typed_specials(messages):
        assert template_ids(hf_tokenizer, messages) != expected  # the documented limit (docs/vllm.md)
    else:
        assert template_ids(hf_tokenizer, messages) == expected


def test_explicit_empty_system_keeps_its_block(saved):
    hf_tokenizer, _ = saved
    text = hf_tokenizer.apply_chat_template(as_messages("", [], "hi"), tokenize=False)
    assert text == "<s>[INST] <<SYS>>\n\n<</SYS>>\n\nhi [/INST]"
    assert hf_tokenizer.apply_chat_template(as_messages(None, [], "hi"), tokenize=False) == "<s>[INST] hi [/INST]"
