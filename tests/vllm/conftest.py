"""One vLLM engine for the whole session (start-up takes 30-60 s on CPU), on the demo checkpoint.

It is built the way users build it, through ModelScope's ``pipeline()``; the
engine tests use the pipeline model's engine.

The demo checkpoint is a small trained Llama (head size 32, which vLLM's CPU
attention accepts) with the package's own tokenizer, so its greedy answers
are real sentences that end with EOS.
"""

import shutil

import pytest

# No importorskip here: a conftest that skips breaks collection; each test
# module skips itself where vLLM is not installed, and these fixtures import it lazily.


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """A copy of the shipped demo checkpoint (vLLM may write next to it)."""
    from modelscope_llama2.constants import DEMO_DIR

    directory = str(tmp_path_factory.mktemp("vllm") / "demo")
    shutil.copytree(DEMO_DIR, directory)
    return directory


@pytest.fixture(scope="session")
def vllm_chat_pipe(vllm_model_dir):
    """``pipeline('chat', model=dir, llm_framework='vllm')``: the session's one vLLM engine."""
    import modelscope_llama2  # noqa: F401  (registers the pipelines)
    from modelscope.pipelines import pipeline

    pipe = pipeline("chat", model=vllm_model_dir, llm_framework="vllm", dtype="float32")
    yield pipe
    pipe.model.close()


@pytest.fixture(scope="session")
def vllm_engine(vllm_chat_pipe):
    from modelscope_llama2.engines.vllm_engine import VllmEngine

    assert isinstance(vllm_chat_pipe.model.engine, VllmEngine)
    return vllm_chat_pipe.model.engine


@pytest.fixture(scope="session")
def demo_tokenizer(vllm_model_dir):
    from modelscope_llama2 import Llama2Tokenizer

    return Llama2Tokenizer.from_pretrained(vllm_model_dir)


@pytest.fixture
def received_prompts(vllm_engine):
    """The prompt ids each request handed to vLLM's engine core, by request id.

    Recorded from vLLM's own ``InputProcessor.process_inputs`` (the step
    that builds the ``EngineCoreRequest`` sent to the engine process); the
    real method runs unchanged.
    """
    processor = vllm_engine.async_llm.input_processor
    real = processor.process_inputs
    seen = {}

    def recording(*args, **kwargs):
        request = real(*args, **kwargs)
        seen[request.request_id] = list(request.prompt_token_ids)
        return request

    processor.process_inputs = recording
    yield seen
    del processor.process_inputs  # back to the class's method
