"""The shipped demo checkpoint: it answers its examples, and its build script is deterministic."""

import filecmp
import os

import pytest
from transformers import AutoConfig, GenerationConfig

import modelscope_llama2  # noqa: F401  (registers the model)
from modelscope_llama2 import Llama2Tokenizer
from modelscope_llama2.constants import DEMO_DIR
from scripts.build_demo_checkpoint import EXAMPLES, build, train_tokenizer


@pytest.fixture(scope="module")
def demo_model():
    from modelscope import Model

    return Model.from_pretrained(DEMO_DIR, device="cpu")


def test_demo_answers_every_example_greedily(demo_model):
    tokenizer = Llama2Tokenizer.from_pretrained(DEMO_DIR)
    inputs = [{"text": e.text, "history": list(e.history), "system": e.system} for e in EXAMPLES]
    answers = [out["response"] for out in demo_model.chat(inputs, tokenizer)]  # one batch: quick
    assert answers == [e.answer for e in EXAMPLES]


def test_demo_answers_along_a_conversation(demo_model):
    # Trained with up to 3 earlier rounds, it keeps answering for a dozen or so (not for ever: it is tiny).
    tokenizer = Llama2Tokenizer.from_pretrained(DEMO_DIR)
    history = []
    for example in [e for e in EXAMPLES if not e.history and e.system is None][:8]:
        out = demo_model.chat({"text": example.text, "history": history}, tokenizer)
        assert out["response"] == example.answer, f"after {len(history)} rounds"
        history = out["history"]


def test_shipped_tokenizer_is_what_the_script_trains(tmp_path):
    train_tokenizer(str(tmp_path / "tokenizer.model"))
    assert filecmp.cmp(tmp_path / "tokenizer.model", os.path.join(DEMO_DIR, "tokenizer.model"), shallow=False)


def test_build_is_deterministic_and_writes_the_shipped_files(tmp_path):
    # A few steps stand for the full run: same seed, data order and kernels, same bytes.
    first, second = build(str(tmp_path / "a"), steps=3), build(str(tmp_path / "b"), steps=3)
    names = sorted(os.listdir(first))
    assert names == sorted(os.listdir(DEMO_DIR))
    match, mismatch, errors = filecmp.cmpfiles(first, second, names, shallow=False)
    assert (mismatch, errors) == ([], [])
    # Everything but the trained weights is what ships (written by save_checkpoint): the configs as the
    # installed transformers reads them, less the version stamp of whichever transformers wrote them.
    configs = {"config.json": AutoConfig, "generation_config.json": GenerationConfig}
    for name, config_class in configs.items():
        assert loaded_config(config_class, first) == loaded_config(config_class, DEMO_DIR), name
    others = [name for name in names if name not in configs]
    match, mismatch, errors = filecmp.cmpfiles(first, DEMO_DIR, others, shallow=False)
    assert (mismatch, errors) == (["model.safetensors"], [])


def loaded_config(config_class, directory):
    values = config_class.from_pretrained(directory).to_dict()
    for where_from in ("transformers_version", "_name_or_path"):  # who wrote it, where it was read
        values.pop(where_from, None)
    return values
