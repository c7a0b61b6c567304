"""Structured-output and tool clients (pydantic-ai, instructor, LangChain, the SDK's ``.parse()``) against the real server.

Their pins clash with the package's, so they live in a venv of their own that
``.ci/structured.sh`` builds and names in ``MODELSCOPE_LLAMA2_STRUCTURED_VENV``;
the server runs in this process on 127.0.0.1 (demo checkpoint, API key) and
each client runs a script in that venv and prints JSON. Without the variable
the client tests are not collected (the core CI step); with it, a missing
client fails. The SDK's ``.parse()`` needs only ``openai`` (a test
dependency): its test is collected everywhere.

The server runs on each engine named in ``MODELSCOPE_LLAMA2_SERVER_ENGINES``
(comma-separated, default ``transformers``): ``.ci/vllm_clients.sh`` runs the
same tests from the vLLM venv with ``vllm``.
"""

import json
import os
import subprocess

import pytest

from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.serving.server import build_app
from tests.helpers import running_server

CLIENTS_VENV = os.environ.get("MODELSCOPE_LLAMA2_STRUCTURED_VENV")
collect_ignore_glob = [] if CLIENTS_VENV else ["test_clients.py"]
ENGINES = os.environ.get("MODELSCOPE_LLAMA2_SERVER_ENGINES", "transformers").split(",")

KEY = "sk-structured"
MODEL = "demo"


@pytest.fixture(scope="session", params=ENGINES)
def server(request):
    """The real server on the demo checkpoint and ``request.param``'s engine, with an API key; its ``/v1`` URL."""
    with running_server(build_app(DEMO_DIR, MODEL, engine=request.param, dtype="float32", api_key=KEY)) as url:
        yield url + "/v1"


def run_script(script: str, server: str, timeout: int = 300):
    """Run ``script`` with the clients' venv python (argv: base URL, key, model); its last stdout line as JSON."""
    done = subprocess.run([os.path.join(CLIENTS_VENV, "bin", "python"), "-c", script, server, KEY, MODEL],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
