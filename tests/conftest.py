import os

import pytest

from tests.helpers import (
    MODELSCOPE_CHAT_CONFIGURATION,
    MODELSCOPE_TEXT_GENERATION_CONFIGURATION,
    SCRIPT,
    build_scripted_checkpoint,
    build_tiny_checkpoint,
)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny chat checkpoint carrying the repo's own configuration.json."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_ms_dir(tmp_path_factory, tiny_dir):
    """The same weights and tokenizer with a ModelScope Llama 2 repo's configuration.json."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-ms") / "model"),
                                 configuration=MODELSCOPE_CHAT_CONFIGURATION, tokenizer_dir=tiny_dir)


@pytest.fixture(scope="session")
def scripted_dir(tmp_path_factory, tiny_dir):
    """A checkpoint that answers every chat prompt with ``SCRIPT`` (see build_scripted_checkpoint)."""
    return build_scripted_checkpoint(str(tmp_path_factory.mktemp("scripted") / "model"), SCRIPT, tiny_dir)


@pytest.fixture(scope="session")
def _tiny_model(tiny_dir):
    import modelscope_llama2  # noqa: F401  (registers the model with ModelScope)
    from modelscope import Model

    return Model.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture
def tiny_model(_tiny_model):
    """The tiny random model built through ModelScope, with a fresh prompt cache."""
    _tiny_model.set_prompt_cache()
    return _tiny_model


@pytest.fixture(scope="session")
def scripted_model(scripted_dir):
    import modelscope_llama2  # noqa: F401
    from modelscope import Model

    return Model.from_pretrained(scripted_dir, device="cpu")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from modelscope_llama2 import Llama2Tokenizer

    return Llama2Tokenizer.from_pretrained(tiny_dir)


def _demo_copy(directory: str, configuration: dict) -> str:
    """The shipped demo checkpoint's files with another ``configuration.json``."""
    import json
    import shutil

    from modelscope_llama2.constants import DEMO_DIR

    shutil.copytree(DEMO_DIR, directory)
    with open(os.path.join(directory, "configuration.json"), "w") as f:
        json.dump(configuration, f, indent=4)
    return directory


@pytest.fixture(scope="session")
def demo_ms_dir(tmp_path_factory):
    """The demo checkpoint (trained: exact answers) carrying a ModelScope Llama 2 chat repo's configuration.json."""
    return _demo_copy(str(tmp_path_factory.mktemp("demo-ms") / "model"), MODELSCOPE_CHAT_CONFIGURATION)


@pytest.fixture(scope="session")
def demo_base_dir(tmp_path_factory):
    """The demo checkpoint carrying a ModelScope Llama 2 base repo's (text-generation) configuration.json."""
    return _demo_copy(str(tmp_path_factory.mktemp("demo-base") / "model"), MODELSCOPE_TEXT_GENERATION_CONFIGURATION)


@pytest.fixture(scope="session")
def demo_chat_pipe(demo_ms_dir):
    """``pipeline(Tasks.chat, ...)`` on the demo weights, as a ModelScope Llama 2 repo configures it."""
    import modelscope_llama2  # noqa: F401
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    return pipeline(task=Tasks.chat, model=demo_ms_dir, device="cpu")
