"""The Llama 2 tokenizer: the checkpoint's own sentencepiece model, as Meta uses it.

Unlike transformers' tokenizers, text is never parsed for special tokens: a
user typing ``</s>`` gets the characters, not an end-of-sequence id. BOS/EOS
are added as ids, on request.

Example:
    >>> from modelscope_llama2 import Llama2Tokenizer
    >>> from modelscope_llama2.constants import DEMO_DIR
    >>> tok = Llama2Tokenizer.from_pretrained(DEMO_DIR)  # or a checkpoint dir, or a ModelScope model id
    >>> ids = tok.encode("Hello </s>", bos=True)
    >>> ids[0], tok.eos_token_id in ids
    (1, False)
    >>> tok.decode(ids, skip_special_tokens=True)
    'Hello </s>'
"""

import functools
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Union

import sentencepiece as spm
from transformers import BatchEncoding

from .constants import CONTEXT_LENGTH

VOCAB_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# transformers' chat template for the same format, written into
# tokenizer_config.json so transformers and vLLM users of a saved checkpoint
# render Meta's prompt. As in Meta's chat_completion, a system message folds a
# <<SYS>> block into the first user message even when its content is empty.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = none %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message is not none %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


class Llama2Tokenizer:
    """Sentencepiece tokenizer with Meta's Llama 2 semantics.

    Example:
        >>> tok = Llama2Tokenizer(os.path.join(DEMO_DIR, "tokenizer.model"))
        >>> batch = tok(["Hello", "Where is the capital of Zhejiang?"], return_tensors="pt")
        >>> batch["input_ids"][:, 0].tolist(), batch["attention_mask"][0].tolist()
        ([0, 1], [0, 0, 0, 0, 0, 0, 1, 1])
    """

    def __init__(self, vocab_file: str):
        self.vocab_file = os.fspath(vocab_file)
        self.sp_model = spm.SentencePieceProcessor(model_file=self.vocab_file)

    @classmethod
    def from_pretrained(cls, model_name_or_path: Union[str, os.PathLike], revision: Optional[str] = None, **_: Any):
        """Load from a checkpoint dir, a ``tokenizer.model`` path, or a ModelScope model id.

        Extra keyword arguments that transformers-style callers pass
        (``trust_remote_code``, ``use_fast``...) are accepted and ignored.
        """
        path = os.fspath(model_name_or_path)
        if not os.path.exists(path):
            from modelscope import snapshot_download

            path = snapshot_download(path, revision=revision)
        vocab_file = os.path.join(path, VOCAB_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"no {VOCAB_FILE} in {path}: a Llama 2 checkpoint ships its sentencepiece model")
        return cls(vocab_file)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> List[str]:
        """Write ``tokenizer.model`` and ``tokenizer_config.json`` (with a chat template)."""
        os.makedirs(save_directory, exist_ok=True)
        vocab_path = os.path.join(save_directory, VOCAB_FILE)
        if os.path.abspath(vocab_path) != os.path.abspath(self.vocab_file):
            _write_atomic(vocab_path, self._copy_vocab_file)
        config_path = os.path.join(save_directory, TOKENIZER_CONFIG_FILE)
        text = json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
        _write_atomic(config_path, lambda f: f.write(text.encode()))
        return [vocab_path, config_path]

    def _copy_vocab_file(self, out) -> None:
        with open(self.vocab_file, "rb") as f:
            shutil.copyfileobj(f, out)

    def tokenizer_config(self) -> Dict[str, Any]:
        """What transformers' ``LlamaTokenizer`` needs to load the same files."""
        return {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.sp_model.id_to_piece(self.sp_model.unk_id()),
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            # Meta encodes every round on its own, so the text after <s> starts
            # with sentencepiece's dummy prefix ("▁[INST]"); transformers keeps
            # that only in legacy mode (non-legacy gives "[" right after <s>).
            "legacy": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": CONTEXT_LENGTH,
            "chat_template": CHAT_TEMPLATE,
        }

    @property
    def vocab_size(self) -> int:
        return self.sp_model.vocab_size()

    @property
    def bos_token_id(self) -> int:
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self) -> int:
        return self.sp_model.eos_id()

    @property
    def pad_token_id(self) -> int:
        # Meta's model has no pad piece (pad_id = -1). Padding only needs an id
        # the attention mask hides and that never reads as end-of-sequence:
        # <unk> (0) is what Llama 2 checkpoints put in config.pad_token_id.
        pad = self.sp_model.pad_id()
        return pad if pad >= 0 else self.sp_model.unk_id()

    @property
    def bos_token(self) -> str:
        return self.sp_model.id_to_piece(self.bos_token_id)

    @property
    def eos_token(self) -> str:
        return self.sp_model.id_to_piece(self.eos_token_id)

    @property
    def all_special_ids(self) -> List[int]:
        return [self.bos_token_id, self.eos_token_id]

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        """One sentencepiece encode call, with BOS/EOS ids added on request (Meta's signature)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a string, got {type(text).__name__}")
        ids = self.sp_model.encode(text)
        return [self.bos_token_id] * bos + ids + [self.eos_token_id] * eos

    def decode(self, ids: Union[Sequence[int], Any], skip_special_tokens: bool = False, **_: Any) -> str:
        """Text of ``ids``; BOS/EOS show as ``<s>``/``</s>`` unless ``skip_special_tokens``."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and isinstance(ids[0], list):
            raise TypeError("ids: expected one sequence of ints; use batch_decode for several")
        special = set(self.all_special_ids)
        if special.isdisjoint(ids):  # the common case (every streamed token is decoded twice): one call
            return self.sp_model.decode(ids)
        if skip_special_tokens:
            return self.sp_model.decode([i for i in ids if i not in special])
        pieces, run = [], []
        for i in ids:
            if i in special:
                pieces += [self.sp_model.decode(run), self.sp_model.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(pieces) + self.sp_model.decode(run)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> List[str]:
        sequences = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        return [self.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs) for ids in sequences]

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        add_special_tokens: bool = True,
        return_tensors: Optional[str] = None,
        padding: bool = False,
        **_: Any,
    ) -> BatchEncoding:
        """``{'input_ids', 'attention_mask'}`` for one text or a batch (BOS added by default).

        ``padding=True`` left-pads a batch with :attr:`pad_token_id`, which a
        tensor batch of unequal lengths needs.
        """
        single = isinstance(text, str)
        rows = [self.encode(t, bos=add_special_tokens) for t in ([text] if single else text)]
        if padding or (return_tensors and len({len(r) for r in rows}) > 1):
            width = max(map(len, rows))
            masks = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
            rows = [[self.pad_token_id] * (width - len(r)) + r for r in rows]
        else:
            masks = [[1] * len(r) for r in rows]
        if single and not return_tensors:
            rows, masks = rows[0], masks[0]
        return BatchEncoding({"input_ids": rows, "attention_mask": masks}, tensor_type=return_tensors)


def sentencepiece_tokenizer(tokenizer: Any) -> Llama2Tokenizer:
    """The :class:`Llama2Tokenizer` behind any Llama 2 tokenizer a caller passes.

    transformers' ``LlamaTokenizer``/``LlamaTokenizerFast`` (what
    ``modelscope.models.nlp.llama2.Llama2Tokenizer`` returns) do not reproduce
    sentencepiece exactly, so prompts are always encoded with the
    checkpoint's own ``tokenizer.model``, found from the tokenizer.
    """
    if isinstance(tokenizer, Llama2Tokenizer):
        return tokenizer
    init_kwargs = getattr(tokenizer, "init_kwargs", None) or {}
    candidates = [getattr(tokenizer, "vocab_file", None), init_kwargs.get("vocab_file")]
    name_or_path = getattr(tokenizer, "name_or_path", None)
    if name_or_path:
        candidates.append(os.path.join(name_or_path, VOCAB_FILE))
    for candidate in candidates:
        if isinstance(candidate, str) and os.path.isfile(candidate):
            return _load_cached(os.path.abspath(candidate))
    raise TypeError(
        f"tokenizer: expected a Llama 2 tokenizer backed by the checkpoint's {VOCAB_FILE} "
        f"(modelscope_llama2.Llama2Tokenizer or transformers' LlamaTokenizer), got {type(tokenizer).__name__} "
        f"with no {VOCAB_FILE} found"
    )


@functools.lru_cache(maxsize=8)
def _load_cached(vocab_file: str) -> Llama2Tokenizer:
    return Llama2Tokenizer(vocab_file)


def _write_atomic(path: str, write: Any) -> None:
    """Write via a temp file in the same dir and rename, so readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

