import json
import os

import pytest
import sentencepiece as spm
import torch
from transformers import LlamaTokenizer

from modelscope_llama2 import Llama2Tokenizer
from modelscope_llama2.tokenizer import sentencepiece_tokenizer


@pytest.fixture(scope="module")
def sp(tiny_dir):
    return spm.SentencePieceProcessor(model_file=os.path.join(tiny_dir, "tokenizer.model"))


def test_encode_is_one_sentencepiece_call_with_bos_eos_ids(tokenizer, sp):
    text = "Hello  there\tworld 浙江 😀 123"
    assert tokenizer.encode(text) == sp.encode(text)
    assert tokenizer.encode(text, bos=True, eos=True) == [1, *sp.encode(text), 2]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.vocab_size) == (1, 2, sp.vocab_size())


def test_special_token_strings_stay_text(tokenizer, sp):
    ids = tokenizer.encode("a </s> b <s>")
    assert 1 not in ids and 2 not in ids
    assert ids == sp.encode("a </s> b <s>")
    assert tokenizer.decode(ids) == "a </s> b <s>"


def test_decode_shows_or_skips_special_ids(tokenizer):
    ids = tokenizer.encode("hi there", bos=True, eos=True)
    assert tokenizer.decode(ids) == "<s>hi there</s>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi there"
    assert tokenizer.batch_decode(torch.tensor([ids, ids]), skip_special_tokens=True) == ["hi there"] * 2


def test_call_returns_ids_and_left_padded_tensors(tokenizer, sp):
    single = tokenizer("hi")
    assert single["input_ids"] == [1, *sp.encode("hi")] and single["attention_mask"] == [1] * len(single["input_ids"])
    batch = tokenizer(["hi", "a longer text"], return_tensors="pt")
    long_ids = [1, *sp.encode("a longer text")]
    short_ids = [1, *sp.encode("hi")]
    pad = len(long_ids) - len(short_ids)
    assert batch["input_ids"].tolist() == [[tokenizer.pad_token_id] * pad + short_ids, long_ids]
    assert batch["attention_mask"].tolist() == [[0] * pad + [1] * len(short_ids), [1] * len(long_ids)]
    assert tokenizer.pad_token_id == 0 != tokenizer.eos_token_id
    assert tokenizer("hi", add_special_tokens=False)["input_ids"] == sp.encode("hi")


def test_save_and_reload_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.model", "tokenizer_config.json"]
    with open(tmp_path / "tokenizer.model", "rb") as a, open(tokenizer.vocab_file, "rb") as b:
        assert a.read() == b.read()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and "chat_template" in config
    reloaded = Llama2Tokenizer.from_pretrained(tmp_path)
    assert reloaded.encode("西湖 😀", bos=True) == tokenizer.encode("西湖 😀", bos=True)
    # transformers loads the same files and finds the same sentencepiece model.
    assert sentencepiece_tokenizer(LlamaTokenizer.from_pretrained(str(tmp_path))).vocab_file == str(
        tmp_path / "tokenizer.model")


def test_missing_tokenizer_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model in"):
        Llama2Tokenizer.from_pretrained(tmp_path)


def test_a_tokenizer_without_sentencepiece_model_is_refused():
    with pytest.raises(TypeError, match="tokenizer: expected a Llama 2 tokenizer"):
        sentencepiece_tokenizer(object())


def test_encode_refuses_non_strings(tokenizer):
    with pytest.raises(TypeError, match="text: expected a string, got int"):
        tokenizer.encode(3)


def test_trained_tokenizers_have_llamas_sentencepiece_settings(tiny_dir):
    # tests/helpers.py trains the tiny checkpoints' tokenizer with checkpoints.train_tokenizer.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(os.path.join(tiny_dir, "tokenizer.model"), "rb") as f:
        proto.ParseFromString(f.read())
    spec, normalizer = proto.trainer_spec, proto.normalizer_spec
    assert (spec.model_type, spec.byte_fallback, spec.split_digits) == (spec.BPE, True, True)
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, -1)
    assert (normalizer.name, normalizer.add_dummy_prefix, normalizer.remove_extra_whitespaces) == (
        "identity", True, False)
    # Byte fallback: the 256 byte pieces exist, so any text encodes without <unk>.
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tiny_dir, "tokenizer.model"))
    assert all(sp.piece_to_id(f"<0x{b:02X}>") != sp.unk_id() for b in range(256))
    assert sp.unk_id() not in sp.encode("never seen: ℵ 𝔘 ꙮ")
