"""Session setup shared by the test suite and the package's doctests (``--doctest-modules``).

The hub client reads these variables at import: no cloud probes, no upload
tracker in uploaded folders, and a dead default endpoint so that nothing
(test or doctest) can reach the internet.

Doctests run for real on the demo checkpoint: their namespace holds
``DEMO_DIR``, ``model`` (built by ``modelscope.Model.from_pretrained``) and
``tokenizer``.
"""

import importlib.util
import os

os.environ.setdefault("MODELSCOPE_DOWNLOAD_INTRA_CLOUD", "false")
os.environ.setdefault("MODELSCOPE_UPLOAD_CACHE_ENABLED", "false")
os.environ.setdefault("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")

import pytest  # noqa: E402

# Modules of an optional stack are doctested where that stack is installed
# (.ci/ray.sh); any other module that fails to import fails the run.
OPTIONAL_STACK_MODULES = {"modelscope_llama2/serving/ray.py": "ray", "modelscope_llama2/engines/structured.py": "xgrammar"}
collect_ignore = [path for path, stack in OPTIONAL_STACK_MODULES.items() if importlib.util.find_spec(stack) is None]


@pytest.fixture(scope="session", autouse=True)
def _isolated_modelscope_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("modelscope-home")
    os.environ["MODELSCOPE_CACHE"] = str(home / "cache")
    os.environ["MODELSCOPE_HOME"] = str(home / "home")
    yield


# Doctests whose examples work on files or a hub, as written: the fixture that lays them out in a fresh
# working directory (stand-ins, small, under the names the examples use).
DOCTEST_WORKSPACES = {
    "modelscope_llama2.checkpoints.convert_meta": "_meta_releases",
    "modelscope_llama2.checkpoints.hub": "_test_hub",
}


@pytest.fixture(autouse=True)
def _doctest_demo(request, doctest_namespace):
    """For doctests only: the demo checkpoint's model and tokenizer, loaded once; the module's workspace."""
    if isinstance(request.node, pytest.DoctestItem):
        doctest_namespace.update(request.getfixturevalue("_demo_namespace"))
        workspace = DOCTEST_WORKSPACES.get(request.node.dtest.globs["__name__"])
        if workspace:
            request.getfixturevalue(workspace)


@pytest.fixture
def _meta_releases(tmp_path, monkeypatch):
    """Tiny releases in Meta's layout as llama-2-13b-chat/ and llama-2-70b-chat/ (GQA), tokenizer.model beside."""
    import shutil

    from modelscope_llama2.constants import DEMO_DIR
    from tests.helpers import GQA, MHA, meta_weights, write_meta_release

    monkeypatch.chdir(tmp_path)
    shutil.copy(os.path.join(DEMO_DIR, "tokenizer.model"), "tokenizer.model")
    for name, params in (("llama-2-13b-chat", MHA), ("llama-2-70b-chat", GQA)):
        write_meta_release(name, params, meta_weights(params, vocab_size=512), n_shards=2)


@pytest.fixture
def _test_hub(tmp_path, monkeypatch):
    """The test suite's hub emulator as MODELSCOPE_ENDPOINT, with a token; the demo checkpoint as
    out/Llama-2-7b-chat-ms/ and ckpt/ in the working directory."""
    import shutil

    from modelscope_hub.config import set_default_config

    from modelscope_llama2.constants import DEMO_DIR
    from tests.hub_server import HubServer, HubState

    server = HubServer(HubState(str(tmp_path / "hub")), tokens={"ms-doctest-token"}).start()
    for name, value in {"MODELSCOPE_ENDPOINT": server.endpoint, "MODELSCOPE_API_TOKEN": "ms-doctest-token",
                        "MODELSCOPE_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    set_default_config(None)  # the client reads its configuration once: read it again
    monkeypatch.chdir(tmp_path)
    for copy in ("out/Llama-2-7b-chat-ms", "ckpt"):
        shutil.copytree(DEMO_DIR, copy)
    yield server
    server.stop()
    set_default_config(None)


@pytest.fixture(scope="session")
def _demo_namespace():
    import modelscope_llama2  # noqa: F401  (registers the model with ModelScope)
    from modelscope import Model

    from modelscope_llama2 import Llama2Tokenizer
    from modelscope_llama2.constants import DEMO_DIR

    return {"DEMO_DIR": DEMO_DIR, "model": Model.from_pretrained(DEMO_DIR, device="cpu"),
            "tokenizer": Llama2Tokenizer.from_pretrained(DEMO_DIR)}
