"""Issue 19's findings, each as a regression test: hostile input, slow clients, overload, failures, shutdown.

Servers are real uvicorn processes or threads on 127.0.0.1 (a free port);
every test is bounded in requests and time.
"""

import asyncio

import pytest
from transformers import AutoModelForCausalLM

from modelscope_llama2.engines.transformers_engine import TransformersEngine
from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
from modelscope_llama2.serving.backend import LocalBackend


def test_an_engine_that_fails_on_the_call_fails_the_stream(tiny_dir, tokenizer):
    # Finding 12: generate() was called outside the worker's try; its error went to a future nobody read
    # and the request waited for ever, holding its slot.
    backend = LocalBackend(TransformersEngine(AutoModelForCausalLM.from_pretrained(tiny_dir)), tokenizer)
    bad = Prompt((1, 10**6), SamplingParams(max_new_tokens=4))

    async def consume():
        return [delta async for delta in backend.stream(bad)]

    with pytest.raises(ValueError, match=r"prompts\[0\]\.token_ids"):
        asyncio.run(asyncio.wait_for(consume(), 30))
