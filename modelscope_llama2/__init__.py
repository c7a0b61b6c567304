"""Meta's Llama 2 chat models through ModelScope's standard APIs, token-exact and fast.

Importing the package registers its model and pipelines with ModelScope
(see :mod:`modelscope_llama2.registration`).

Example:
    >>> import modelscope_llama2
    >>> from modelscope import Model
    >>> model = Model.from_pretrained("path/to/Llama-2-13b-chat-ms")  # doctest: +SKIP
    >>> tokenizer = modelscope_llama2.Llama2Tokenizer.from_pretrained(model.model_dir)  # doctest: +SKIP
    >>> model.chat({"text": "Where is the capital of Zhejiang?"}, tokenizer)["response"]  # doctest: +SKIP
"""

from .prompts.chat_format import Dialog, Message, encode_dialog
from .checkpoints.save import save_checkpoint
from .checkpoints.convert_meta import convert_meta_checkpoint
from .checkpoints.hub import fetch_checkpoint, push_checkpoint
from .model import Llama2ForChat
from .engines.prefix_cache import PromptCache
from .registration import register as _register
from .tokenizer import Llama2Tokenizer

_register()

__all__ = [
    "Dialog",
    "Message",
    "encode_dialog",
    "Llama2ForChat",
    "Llama2Tokenizer",
    "PromptCache",
    "save_checkpoint",
    "push_checkpoint",
    "fetch_checkpoint",
    "convert_meta_checkpoint",
]
__version__ = "0.1.0"
