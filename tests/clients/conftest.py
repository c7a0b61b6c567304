"""Everyday OpenAI clients (litellm, the ``llm`` CLI) against the real server, each run from its own venv.

Their pins clash with the package's (and with each other's over time), so
they live in a venv of their own that ``.ci/clients.sh`` builds and names in
``MODELSCOPE_LLAMA2_CLIENTS_VENV``; the server runs in this process on
127.0.0.1 and the clients are subprocesses of that venv. Without the
variable these tests are not collected (the core CI step); with it, a
missing client fails.
"""

import os
import subprocess

import pytest

from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.serving.server import build_app
from tests.helpers import running_server

CLIENTS_VENV = os.environ.get("MODELSCOPE_LLAMA2_CLIENTS_VENV")
collect_ignore_glob = [] if CLIENTS_VENV else ["test_*.py"]

KEY = "sk-clients"


@pytest.fixture(scope="session")
def server():
    """The real server on the demo checkpoint, with an API key; yields its ``/v1`` base URL."""
    with running_server(build_app(DEMO_DIR, "demo", api_key=KEY)) as url:
        yield url + "/v1"


def run_client(args, env=None, timeout=300):
    """Run ``args[0]`` from the clients' venv (``bin/``); its stdout, or an error with its output."""
    executable = os.path.join(CLIENTS_VENV, "bin", args[0])
    done = subprocess.run([executable, *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise AssertionError(f"{args} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout
