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


@pytest.fixture(autouse=True)
def _doctest_demo(request, doctest_namespace):
    """For doctests only: the demo checkpoint's model and tokenizer, loaded once."""
    if isinstance(request.node, pytest.DoctestItem):
        doctest_namespace.update(request.getfixturevalue("_demo_namespace"))


@pytest.fixture(scope="session")
def _demo_namespace():
    import modelscope_llama2  # noqa: F401  (registers the model with ModelScope)
    from modelscope import Model

    from modelscope_llama2 import Llama2Tokenizer
    from modelscope_llama2.constants import DEMO_DIR

    return {"DEMO_DIR": DEMO_DIR, "model": Model.from_pretrained(DEMO_DIR, device="cpu"),
            "tokenizer": Llama2Tokenizer.from_pretrained(DEMO_DIR)}
