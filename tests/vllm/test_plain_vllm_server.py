"""A checkpoint saved by this package, served by plain vLLM: its chat endpoint renders Meta's prompt.

vLLM's ``/v1/chat/completions`` applies the saved ``chat_template`` with its
own (fast) tokenizer; ``return_token_ids`` shows the ids it fed the model.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import sentencepiece as spm

pytest.importorskip("vllm")

from openai import OpenAI  # noqa: E402

from tests.helpers import meta_chat_tokens  # noqa: E402
from tests.helpers import DIALOGS  # noqa: E402
from tests.helpers import as_messages, has_typed_specials  # noqa: E402

START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def saved_dir(vllm_model_dir, tmp_path_factory):
    """The demo weights written by ``save_checkpoint`` (tokenizer files and template included)."""
    from transformers import LlamaForCausalLM

    from modelscope_llama2 import Llama2Tokenizer
    from modelscope_llama2.checkpoints.save import save_checkpoint

    target = str(tmp_path_factory.mktemp("saved") / "demo-chat")
    model = LlamaForCausalLM.from_pretrained(vllm_model_dir)
    return save_checkpoint(model, target, tokenizer=Llama2Tokenizer.from_pretrained(vllm_model_dir))


@pytest.fixture(scope="module")
def vllm_server(saved_dir, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "vllm.log", "w+")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", saved_dir, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--served-model-name", "demo"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                log.seek(0)
                pytest.fail(f"vLLM's server exited with {server.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM's server did not answer /health within {START_TIMEOUT_S} s")
            time.sleep(2)
        yield OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_chat_endpoint_feeds_metas_ids(vllm_server, saved_dir):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(saved_dir, "tokenizer.model"))
    dialogs = DIALOGS + [("", [("hi", "hello")], "explicit empty system")]
    compared = 0
    for system, history, text in dialogs:
        messages = as_messages(system, history, text)
        if has_typed_specials(messages):
            continue  # what no template can fix (docs/vllm.md); tests/test_saved_chat_template.py pins it
        response = vllm_server.chat.completions.create(
            model="demo", messages=messages, max_tokens=1, temperature=0,
            extra_body={"return_token_ids": True, "skip_special_tokens": False})
        assert response.model_extra["prompt_token_ids"] == meta_chat_tokens(sp, messages), messages
        compared += 1
    assert compared == len(dialogs) - 2


def test_chat_endpoint_answers_like_the_package(vllm_server):
    response = vllm_server.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Where is the capital of Zhejiang?"}],
        max_tokens=32, temperature=0)
    assert response.choices[0].message.content.strip() == "The capital of Zhejiang Province is Hangzhou."
