"""``python -m modelscope_llama2``: what a bare install (no extras) gets, flags, one-line errors.

A bare install is simulated with a ``sitecustomize`` that makes the named
modules fail to import, as they would if not installed.
"""

import os
import socket
import subprocess
import sys
import sysconfig

import pytest

from tests.helpers import REPO_ROOT

OPTIONAL_STACKS = ("fastapi", "uvicorn", "starlette", "prometheus_client", "gradio", "ray", "vllm", "openai")
HEAVY = ("torch", "transformers", "modelscope", "accelerate", "safetensors", "sentencepiece")
SUBCOMMANDS = ("chat", "serve", "web", "push", "download", "convert")

# A None entry in sys.modules is how Python spells "not importable": import raises ModuleNotFoundError,
# importlib.util.find_spec answers None, as for a module that is not installed.
BLOCKER = """
import os, sys

sys.modules.update(dict.fromkeys(os.environ["BLOCKED_MODULES"].split(",")))
"""


@pytest.fixture(scope="module")
def without(tmp_path_factory):
    """Run the CLI in a subprocess where the given modules are not installed."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(BLOCKER)

    def run(blocked, *args, timeout=120, script=None):
        # The package comes from the working directory (python -m; a script's own dir comes first on its
        # sys.path, so PYTHONPATH names this checkout too), the blocker from PYTHONPATH.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), REPO_ROOT]),
               "BLOCKED_MODULES": ",".join(blocked)}
        command = [script] if script else [sys.executable, "-m", "modelscope_llama2"]
        return subprocess.run([*command, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    return run


def test_the_blocker_blocks(without):
    # The same run with torch blocked fails the way a missing torch fails.
    done = without(("torch",), "chat")
    assert done.returncode != 0 and "ModuleNotFoundError: import of torch halted" in done.stderr


@pytest.mark.parametrize("args", [["--help"], *[[command, "--help"] for command in SUBCOMMANDS]])
def test_help_needs_no_optional_stack_nor_torch(without, args):
    done = without(OPTIONAL_STACKS + HEAVY, *args, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m modelscope_llama2") and done.stderr == ""
    assert "``" not in done.stdout  # plain text, not reStructuredText


@pytest.mark.parametrize("args, status", [(["--help"], 0), (["serve", "--help"], 0), (["--bogus"], 2),
                                          (["serve", "--port", "x"], 2)])
def test_the_installed_console_script_needs_no_torch_for_help_and_flag_errors(without, args, status):
    # The `modelscope-llama2` script pip installs from setup.py's entry point, run as a shell runs it.
    script = os.path.join(sysconfig.get_path("scripts"), "modelscope-llama2")
    assert os.access(script, os.X_OK), f"{script} is not installed: pip install -e ."
    done = without(HEAVY, *args, script=script, timeout=60)
    assert done.returncode == status, done.stderr
    assert (done.stdout if status == 0 else done.stderr).startswith("usage: python -m modelscope_llama2")
    assert "halted" not in done.stderr  # no import of a blocked module was tried


@pytest.mark.parametrize("command, extra, missing", [
    ("serve", "serve", "fastapi, uvicorn, prometheus_client"),
    ("web", "web", "gradio, openai"),
])
def test_serve_and_web_without_their_extra_are_one_line(without, command, extra, missing):
    # torch blocked too: the check comes before anything loads.
    done = without(OPTIONAL_STACKS + HEAVY, command)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f'error: {command} needs {missing}, not installed: pip install "modelscope_llama2[{extra}]"\n'


def test_replicas_without_ray_is_one_line(without):
    done = without(("ray",) + HEAVY, "serve", "--replicas", "2")
    assert (done.returncode, done.stderr) == (
        1, 'error: serve --replicas needs ray, not installed: pip install "modelscope_llama2[ray]"\n')


@pytest.mark.parametrize("command", ["serve", "web"])
def test_a_busy_port_is_one_line_before_the_model_loads(without, command):
    if command == "web":
        pytest.importorskip("gradio", reason="the web extra is not installed")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # torch blocked: loading the model first would fail on it instead.
        done = without(HEAVY, command, "--port", str(port))
    assert (done.returncode, done.stderr) == (
        1, f"error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use); "
           "choose another --port\n")


def test_an_abbreviated_flag_is_refused(without):
    done = without(HEAVY, "chat", "--max-new-token", "5")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "python -m modelscope_llama2: error: unrecognized arguments: " \
                                           "--max-new-token 5"
