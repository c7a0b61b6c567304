"""ModelScope builds this package's model for Llama 2 checkpoints, whatever the import order."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import (
    MODELSCOPE_CHAT_CONFIGURATION,
    MODELSCOPE_TEXT_GENERATION_CONFIGURATION,
    REPO_ROOT,
    repo_configuration,
)

CONFIGURATIONS = {
    "repo": repo_configuration(),
    "modelscope-chat-llama2": MODELSCOPE_CHAT_CONFIGURATION,
    "modelscope-text-generation-llama": MODELSCOPE_TEXT_GENERATION_CONFIGURATION,
    "chat-llama-model_type-key": {"framework": "pytorch", "task": "chat", "model": {"model_type": "llama"}},
}


@pytest.fixture(params=sorted(CONFIGURATIONS))
def configured_dir(request, tiny_dir, tmp_path):
    # Same weights and tokenizer as tiny_dir, another configuration.json.
    directory = tmp_path / request.param
    directory.mkdir()
    for name in os.listdir(tiny_dir):
        if name != "configuration.json":
            os.symlink(os.path.join(tiny_dir, name), directory / name)
    (directory / "configuration.json").write_text(json.dumps(CONFIGURATIONS[request.param]))
    return str(directory)


def test_every_configuration_style_builds_the_chat_model(configured_dir, tokenizer):
    import modelscope_llama2
    from modelscope import Model

    model = Model.from_pretrained(configured_dir, device="cpu")
    assert type(model) is modelscope_llama2.Llama2ForChat
    assert model.model_dir == configured_dir
    assert model.chat({"text": "hi", "max_new_tokens": 2, "do_sample": False}, tokenizer)["finish_reason"] == "length"


def test_repo_configuration_names_this_package(tiny_dir):
    with open(os.path.join(REPO_ROOT, "configuration.json")) as f:
        config = json.load(f)
    assert config == {"framework": "pytorch", "task": "chat", "model": {"type": "llama2"},
                      "pipeline": {"type": "modelscope-llama2-chat"}}


BUILD = """
import sys
from modelscope import Model
model = Model.from_pretrained(sys.argv[1], device="cpu")
print(type(model).__module__ + "." + type(model).__name__, hasattr(model, "chat"))
"""


@pytest.mark.parametrize("order", [
    "import modelscope.models.nlp.llama.text_generation, modelscope.models.nlp.llama2; import modelscope_llama2",
    "import modelscope_llama2; import modelscope.models.nlp.llama.text_generation, modelscope.models.nlp.llama2",
])
def test_import_order_does_not_matter(tiny_ms_dir, order):
    result = subprocess.run([sys.executable, "-c", order + "\n" + BUILD, tiny_ms_dir], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "modelscope_llama2.model.Llama2ForChat True"
