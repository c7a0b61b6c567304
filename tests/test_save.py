"""save_checkpoint: a complete ModelScope checkpoint that transformers loads, written atomically."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, LlamaTokenizer

from modelscope_llama2.checkpoints import save as checkpoint
from modelscope_llama2.checkpoints.save import DEFAULT_CONFIGURATION, save_checkpoint
from modelscope_llama2.checkpoints.hub import local_manifest
from modelscope_llama2.tokenizer import Llama2Tokenizer
from tests.helpers import repo_configuration, tiny_config

PROMPT = torch.tensor([[1, 5, 17, 42, 99, 7]])
META_FORMAT = ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhere is Hangzhou? [/INST] In Zhejiang. </s>"
               "<s>[INST] And West Lake? [/INST]")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_dir):
    tokenizer = Llama2Tokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(3)
    return LlamaForCausalLM(tiny_config(tokenizer.vocab_size)), tokenizer


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def test_default_configuration_is_the_repo_roots():
    assert DEFAULT_CONFIGURATION == repo_configuration()


def test_save_writes_a_complete_checkpoint_that_transformers_loads(model_and_tokenizer, tiny_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    target = str(tmp_path / "Llama-2-tiny-chat-ms")
    assert save_checkpoint(model, target, tokenizer=tokenizer, max_shard_size="200KB") == target

    shards = sorted(n for n in os.listdir(target) if n.endswith(".safetensors"))
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
    assert sorted(os.listdir(target)) == sorted(shards + [
        "README.md", "config.json", "configuration.json", "generation_config.json",
        "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json"])
    with open(os.path.join(target, "configuration.json")) as f:
        assert json.load(f) == DEFAULT_CONFIGURATION
    with open(os.path.join(target, "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"].values()) == set(shards)
    assert local_manifest(target)["tokenizer.model"] == local_manifest(tiny_dir)["tokenizer.model"]
    with open(os.path.join(target, "README.md")) as f:
        assert "tasks:\n- chat" in f.read()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging dir left

    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), _logits(model))
    hf_tokenizer = LlamaTokenizer.from_pretrained(target)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Hangzhou?"},
              {"role": "assistant", "content": "In Zhejiang."}, {"role": "user", "content": "And West Lake?"}]
    assert hf_tokenizer.apply_chat_template(dialog, tokenize=False) == META_FORMAT


def test_tokenizer_defaults_to_the_one_the_model_was_loaded_with(tiny_dir, tmp_path):
    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    save_checkpoint(model, str(tmp_path / "copy"), configuration={"task": "text-generation",
                                                                   "model": {"type": "llama"}})
    assert local_manifest(str(tmp_path / "copy"))["tokenizer.model"] == local_manifest(tiny_dir)["tokenizer.model"]
    with open(tmp_path / "copy" / "configuration.json") as f:
        assert json.load(f)["task"] == "text-generation"


def test_model_class_save_pretrained_writes_the_same_checkpoint(tiny_dir, tmp_path):
    from modelscope_llama2 import Llama2ForChat

    model = Llama2ForChat.from_pretrained(tiny_dir)
    model.save_pretrained(str(tmp_path / "out"), max_shard_size="200KB")
    assert "configuration.json" in os.listdir(tmp_path / "out")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))), _logits(model))


class _Interrupted(Exception):
    pass


def _interrupt_after_weights(monkeypatch):
    """Fail the first text write, which comes after the weights and tokenizer are on disk."""
    def fail(path, text):
        raise _Interrupted(path)

    monkeypatch.setattr(checkpoint, "_write_text", fail)


def test_interrupted_save_leaves_nothing_at_the_target(model_and_tokenizer, tmp_path, monkeypatch):
    model, tokenizer = model_and_tokenizer
    _interrupt_after_weights(monkeypatch)
    with pytest.raises(_Interrupted):
        save_checkpoint(model, str(tmp_path / "ckpt"), tokenizer=tokenizer)
    assert os.listdir(tmp_path) == []


def test_interrupted_replace_keeps_the_old_checkpoint_intact(model_and_tokenizer, tmp_path, monkeypatch):
    model, tokenizer = model_and_tokenizer
    target = save_checkpoint(model, str(tmp_path / "ckpt"), tokenizer=tokenizer, max_shard_size="200KB")
    before = local_manifest(target)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    try:
        _interrupt_after_weights(monkeypatch)
        with pytest.raises(_Interrupted):
            save_checkpoint(model, target, tokenizer=tokenizer)
    finally:
        with torch.no_grad():
            model.lm_head.weight.sub_(1.0)
    assert local_manifest(target) == before
    assert os.listdir(tmp_path) == ["ckpt"]


def test_save_replaces_an_existing_checkpoint_completely(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    target = save_checkpoint(model, str(tmp_path / "ckpt"), tokenizer=tokenizer, max_shard_size="200KB")
    save_checkpoint(model, target, tokenizer=tokenizer)
    assert [n for n in os.listdir(target) if n.endswith(".safetensors")] == ["model.safetensors"]
    assert os.listdir(tmp_path) == ["ckpt"]


def test_bad_arguments_name_the_field(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ValueError, match="save_directory.*not a checkpoint"):
        save_checkpoint(model, str(tmp_path / "photos"), tokenizer=tokenizer)
    assert os.listdir(tmp_path / "photos") == ["cat.jpg"]
    with pytest.raises(ValueError, match="tokenizer"):
        save_checkpoint(model, str(tmp_path / "a"))
    with pytest.raises(TypeError, match="configuration"):
        save_checkpoint(model, str(tmp_path / "a"), tokenizer=tokenizer, configuration="chat")
    with pytest.raises(ValueError, match="configuration"):
        save_checkpoint(model, str(tmp_path / "a"), tokenizer=tokenizer, configuration={"task": "chat"})
    with pytest.raises(TypeError, match="save_directory"):
        save_checkpoint(model, 3, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="max_shard_size"):
        save_checkpoint(model, str(tmp_path / "a"), tokenizer=tokenizer, max_shard_size=2.5)
    assert sorted(os.listdir(tmp_path)) == ["photos"]
