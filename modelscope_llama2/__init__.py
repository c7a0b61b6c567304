"""Meta's Llama 2 chat models through ModelScope's standard APIs, token-exact and fast.

Importing the package registers its model and pipelines with ModelScope
(see :mod:`modelscope_llama2.registration`).

Example (the offline demo checkpoint; a ModelScope model id such as
``modelscope/Llama-2-13b-chat-ms`` or a checkpoint dir works the same):

    >>> import modelscope_llama2
    >>> from modelscope import Model
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> model = Model.from_pretrained(DEMO_DIR, device="cpu")
    >>> tokenizer = modelscope_llama2.Llama2Tokenizer.from_pretrained(model.model_dir)
    >>> model.chat({"text": "Where is the capital of Zhejiang?"}, tokenizer)["response"]
    'The capital of Zhejiang Province is Hangzhou.'
"""

import importlib
import os
import re
import sys

# Public name -> the module that defines it, imported on first use (PEP 562).
_PUBLIC = {
    "Dialog": ".prompts.chat_format",
    "Message": ".prompts.chat_format",
    "encode_dialog": ".prompts.chat_format",
    "Prompt": ".prompts.prompt",
    "SamplingParams": ".prompts.prompt",
    "Engine": ".engines.base",
    "TokenEvent": ".engines.base",
    "Usage": ".engines.base",
    "TransformersEngine": ".engines.transformers_engine",
    "PromptCache": ".engines.prefix_cache",
    "StreamingDetokenizer": ".decoding",
    "Llama2ForChat": ".model",
    "ChatResult": ".model",
    "CompletionResult": ".model",
    "Llama2Tokenizer": ".tokenizer",
    "save_checkpoint": ".checkpoints.save",
    "push_checkpoint": ".checkpoints.hub",
    "fetch_checkpoint": ".checkpoints.hub",
    "convert_meta_checkpoint": ".checkpoints.convert_meta",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


# The console script setup.py installs (`modelscope-llama2 = modelscope_llama2.cli:main`).
_CONSOLE_SCRIPT = "modelscope-llama2"


def _imported_to_run_the_cli() -> bool:
    # The CLI registers with ModelScope itself once a command needs a model, so that --help and a bad flag
    # answer without importing torch and ModelScope (seconds). Both ways in import this package first:
    # `python -m modelscope_llama2 ...` while sys.argv[0] is still "-m" (Python's documented behaviour while
    # it locates the module), and the console script, whose sys.argv[0] is its own path (".exe" and
    # "-script.py" are its Windows launcher's names).
    if sys.argv[:1] == ["-m"]:
        return True
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return re.sub(r"(-script\.pyw?|\.exe)$", "", script) == _CONSOLE_SCRIPT


if not _imported_to_run_the_cli():
    from .registration import register as _register

    _register()
