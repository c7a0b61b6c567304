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

from .checkpoints.convert_meta import convert_meta_checkpoint
from .checkpoints.hub import fetch_checkpoint, push_checkpoint
from .checkpoints.save import save_checkpoint
from .decoding import StreamingDetokenizer
from .engines.base import Engine, TokenEvent, Usage
from .engines.prefix_cache import PromptCache
from .engines.transformers_engine import TransformersEngine
from .model import ChatResult, CompletionResult, Llama2ForChat
from .prompts.chat_format import Dialog, Message, encode_dialog
from .prompts.prompt import Prompt, SamplingParams
from .registration import register as _register
from .tokenizer import Llama2Tokenizer

_register()

__all__ = [
    "Dialog",
    "Message",
    "encode_dialog",
    "Prompt",
    "SamplingParams",
    "Engine",
    "TokenEvent",
    "Usage",
    "TransformersEngine",
    "PromptCache",
    "StreamingDetokenizer",
    "Llama2ForChat",
    "ChatResult",
    "CompletionResult",
    "Llama2Tokenizer",
    "save_checkpoint",
    "push_checkpoint",
    "fetch_checkpoint",
    "convert_meta_checkpoint",
]
__version__ = "0.1.0"
