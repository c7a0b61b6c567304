"""README's CPU-only vLLM example, run as written (a script of its own: it starts vLLM's engine processes)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from tests.helpers import HANGZHOU, REPO_ROOT, doc_block  # noqa: E402

RUN_IN_VLLM_STEP = "run: in .ci/vllm.sh (tests/vllm/test_readme_example.py)"


def test_readme_cpu_example_answers(tmp_path):
    (block,) = doc_block(RUN_IN_VLLM_STEP)
    script = tmp_path / "example.py"
    script.write_text(block.code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert HANGZHOU in done.stdout.splitlines()  # among vLLM's own log lines
