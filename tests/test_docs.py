"""Every code block of README.md and docs/ runs here as written, or its marker says why it cannot.

The marker is an HTML comment on the line above the block: ``<!-- run: HOW -->``
(one of the ways below) or ``<!-- not run here: REASON -->``.
"""

import base64
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from modelscope_llama2.constants import DEMO_DIR
from tests.helpers import DOCS, HANGZHOU, REPO_ROOT, SIGHTS, doc_block, doc_blocks, running_server
from tests.hub_server import HubServer, HubState

RUN_AGAINST_HUB = "run: against the test hub, which holds the demo checkpoint under the ids used here"
RUN_WITH_SERVE = "run: with serve on the demo checkpoint"
RUN_OUTPUT_IN_COMMENTS = "run: its stdout is the comment lines"
RUN_IN_VLLM_STEP = "run: in .ci/vllm.sh (tests/vllm/test_readme_example.py)"
RUN_MARKERS = (RUN_AGAINST_HUB, RUN_WITH_SERVE, RUN_OUTPUT_IN_COMMENTS, RUN_IN_VLLM_STEP)
NOT_RUN = "not run here: "
API_KEY = "sk-docs"


def test_every_block_is_run_or_says_why():
    blocks = doc_blocks()
    for path in DOCS:  # the parser saw every fence
        with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
            fences = sum(line.startswith("```") for line in f)
        assert fences == 2 * len([block for block in blocks if block.path == path]), path
    for block in blocks:
        reason = block.marker[len(NOT_RUN):] if block.marker.startswith(NOT_RUN) else None
        assert block.marker in RUN_MARKERS or (reason and reason.strip()), f"{block}: no run/not-run marker"
    assert all(doc_block(marker) for marker in RUN_MARKERS)  # every way of running is used


def run_block(block, tmp_path, env=None, timeout=300):
    """The block as a script in an empty directory, with the package importable as installed."""
    script = tmp_path / ("block.py" if block.language == "python" else "block.sh")
    script.write_text(block.code)
    command = [sys.executable, str(script)] if block.language == "python" else ["bash", "-e", str(script)]
    # `python` in a shell block is this interpreter, as in the reader's activated venv.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "PATH": path, **(env or {})}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{block} failed:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("block", doc_block(RUN_OUTPUT_IN_COMMENTS), ids=str)
def test_block_prints_its_comment_lines(block, tmp_path):
    commands, comments = re.match(r"(.*?\n)((?:# .*\n)+)$", block.code, re.S).groups()
    assert run_block(block, tmp_path) == "".join(line[2:] + "\n" for line in comments.splitlines())


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The test hub, holding the demo checkpoint (tagged v1.0.2) under every ``modelscope/...`` id the docs use."""
    state = HubState(str(tmp_path_factory.mktemp("hub")))
    actions = []
    for name in sorted(os.listdir(DEMO_DIR)):
        with open(os.path.join(DEMO_DIR, name), "rb") as f:
            actions.append({"action": "create", "path": name, "content": base64.b64encode(f.read()).decode()})
    for repo_id in sorted({repo for block in doc_block(RUN_AGAINST_HUB)
                           for repo in re.findall(r'"(modelscope/[\w.-]+)"', block.code)}):
        state.create_repo(repo_id)
        state.commit(repo_id, "master", "the demo checkpoint", actions)
        state.create_tag(repo_id, "v1.0.2", "master")
    server = HubServer(state).start()
    yield server
    server.stop()


@pytest.mark.parametrize("block", doc_block(RUN_AGAINST_HUB), ids=str)
def test_block_against_the_test_hub(block, hub, tmp_path):
    stdout = run_block(block, tmp_path, env={"MODELSCOPE_ENDPOINT": hub.endpoint,
                                              "MODELSCOPE_CACHE": str(tmp_path / "cache")})
    # The demo's answers to the model card's two questions (streamed ones growing word by word).
    lines = stdout.splitlines()
    assert SIGHTS in lines, stdout
    assert all(HANGZHOU.startswith(line) or SIGHTS.startswith(line) for line in lines), stdout


@pytest.fixture(scope="module")
def demo_server_port():
    """``serve`` on the demo checkpoint (as the docs start it), in this process, with a key."""
    from modelscope_llama2.serving.server import build_app

    with running_server(build_app(DEMO_DIR, "modelscope-llama2-demo", api_key=API_KEY)) as url:
        yield url.rsplit(":", 1)[1]


@pytest.mark.parametrize("block", doc_block(RUN_WITH_SERVE), ids=str)
def test_block_with_serve(block, demo_server_port, tmp_path):
    on_this_port = dataclasses.replace(block, code=block.code.replace("127.0.0.1:8000",
                                                                      f"127.0.0.1:{demo_server_port}"))
    stdout = run_block(on_this_port, tmp_path, env={"MODELSCOPE_LLAMA2_API_KEY": API_KEY})
    # The first thing each prints: curl the reply to the first question, the SDK examples an answer.
    answer = json.loads(stdout)["choices"][0]["message"]["content"] if block.language == "bash" else \
        stdout.splitlines()[0]
    assert answer in ((HANGZHOU,) if block.language == "bash" else (HANGZHOU, SIGHTS)), stdout
