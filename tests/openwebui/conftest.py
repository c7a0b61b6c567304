"""The real Open WebUI 0.12.4 on the real server, its chat page driven in headless Chromium.

Open WebUI pins its own stack (torch, transformers older than the package
needs), so it lives in a venv of its own that ``.ci/openwebui.sh`` builds and
names in ``MODELSCOPE_LLAMA2_OPENWEBUI_VENV``; it runs from there as its users
start it (``open-webui serve``). The server runs as users start it too
(``python -m modelscope_llama2 serve``, demo checkpoint, an API key), from
this venv, and its log is what the tests read on the server's side: uvicorn's
access log (every request's status) and the server's own warnings. Both
listen on 127.0.0.1 at free ports and are stopped afterwards; Open WebUI's
data goes to a temporary ``DATA_DIR``.

Without the variable these tests are not collected (the core CI step); with
it, a missing piece (Open WebUI, Playwright, Chromium) fails instead.
"""

import os
import re
import socket
import subprocess
import sys
import time
from typing import Dict, List

import pytest

from tests.helpers import REPO_ROOT

OPENWEBUI_VENV = os.environ.get("MODELSCOPE_LLAMA2_OPENWEBUI_VENV")
collect_ignore_glob = [] if OPENWEBUI_VENV else ["test_*.py"]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
KEY = "sk-openwebui"
MODEL = "demo"
# Generous, for a shared 2-core machine; every wait ends as soon as its condition holds.
START_TIMEOUT_S = 300
WAIT_MS = 120_000

# Open WebUI kept offline and to the chat: the OpenAI connection only (no Ollama at localhost:11434), one
# user without sign-in, no embedding model (its default, all-MiniLM-L6-v2, is loaded, or fetched from the
# Hugging Face hub, at start-up), no hub, version check or pip installs (OFFLINE_MODE), no telemetry. Its
# chat settings stay the defaults: built-in tools on, title, tags and follow-up generation on.
OPENWEBUI_ENV = {
    "ENABLE_OLLAMA_API": "False",
    "WEBUI_AUTH": "False",
    "RAG_EMBEDDING_MODEL": "",
    "OFFLINE_MODE": "True",
    "ANONYMIZED_TELEMETRY": "False",
    "DO_NOT_TRACK": "True",
    "SCARF_NO_ANALYTICS": "True",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Process:
    """A command serving HTTP on 127.0.0.1:``port`` until :meth:`stop`; its output in ``log_path``."""

    def __init__(self, command: List[str], port: int, log_path: str, env: Dict[str, str], cwd: str):
        self.command, self.port, self.log_path, self.env, self.cwd = command, port, log_path, env, cwd
        self.url = f"http://127.0.0.1:{port}"
        self.process = None

    def start(self) -> "Process":
        import httpx

        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.command[:3]} exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"{self.command[:3]} did not serve {self.url} within {START_TIMEOUT_S} s:\n"
                             f"{self.log()[-4000:]}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``python -m modelscope_llama2 serve`` on the demo checkpoint with an API key; restartable on its port."""
    command = [sys.executable, "-m", "modelscope_llama2", "serve", "--port", str(free_port()), "--api-key", KEY,
               "--served-model-name", MODEL]
    process = Process(command, int(command[5]), str(tmp_path_factory.mktemp("serve") / "serve.log"),
                      dict(os.environ), REPO_ROOT).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def openwebui(server, tmp_path_factory):
    """``open-webui serve`` from its venv, connected to ``server`` as its OpenAI API."""
    home = tmp_path_factory.mktemp("openwebui")
    env = {**os.environ, **OPENWEBUI_ENV, "OPENAI_API_BASE_URL": server.url + "/v1", "OPENAI_API_KEY": KEY,
           "DATA_DIR": str(home / "data"),
           # Else it writes a new key to .webui_secret_key in its working directory.
           "WEBUI_SECRET_KEY": "openwebui-test-secret"}
    env.pop("PYTHONPATH", None)  # its own venv's packages only
    port = free_port()
    process = Process([os.path.join(OPENWEBUI_VENV, "bin", "open-webui"), "serve", "--host", "127.0.0.1",
                       "--port", str(port)], port, str(home / "openwebui.log"), env, str(home)).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def chat_page_url(openwebui, browser):
    """Open WebUI's address, once its first-load dialog is dismissed (as a new user does: "Okay, Let's Go!")."""
    page = browser.new_page()
    try:
        page.set_default_timeout(WAIT_MS)
        page.goto(openwebui.url)
        page.get_by_role("button", name="Okay, Let's Go!").click()
        page.wait_for_function("() => !document.body.innerText.includes(\"Okay, Let's Go!\")")
    finally:
        page.close()
    return openwebui.url


def access_log(server: Process, path: str) -> List[int]:
    """The statuses of the ``POST path`` requests the server logged, in order."""
    return [int(status) for status in re.findall(rf'"POST {re.escape(path)} HTTP/1\.1" (\d{{3}})', server.log())]
