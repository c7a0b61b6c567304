"""Write a complete ModelScope Llama 2 checkpoint directory, atomically.

A checkpoint holds ``configuration.json`` (ModelScope's task, model and
pipeline types), ``config.json``, ``generation_config.json``, safetensors
weights (sharded by ``max_shard_size``, with ``model.safetensors.index.json``
when there is more than one shard), ``tokenizer.model``,
``tokenizer_config.json`` (with a chat template rendering Meta's format) and a
``README.md`` model card (a stub unless given).

Everything is written into a hidden staging directory next to the target and
renamed into place at the end, so an interrupted save never leaves a directory
at the target that looks like a complete checkpoint.

Example:
    >>> import os, tempfile
    >>> from modelscope_llama2.checkpoints.save import save_checkpoint
    >>> out = os.path.join(tempfile.mkdtemp(), "Llama-2-demo-ms")
    >>> save_checkpoint(model, out, tokenizer=tokenizer) == out
    True
    >>> sorted(os.listdir(out))  # doctest: +NORMALIZE_WHITESPACE
    ['README.md', 'config.json', 'configuration.json', 'generation_config.json', 'model.safetensors',
     'tokenizer.model', 'tokenizer_config.json']
"""

import copy
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional, Union

from transformers import PreTrainedModel

from ..constants import CHAT_PIPELINE
from ..tokenizer import VOCAB_FILE, Llama2Tokenizer, sentencepiece_tokenizer

CONFIGURATION_FILE = "configuration.json"
README_FILE = "README.md"

# What ModelScope reads to pick the task, model class and pipeline; the repo
# root's configuration.json carries the same content.
DEFAULT_CONFIGURATION: Dict[str, Any] = {
    "framework": "pytorch",
    "task": "chat",
    "model": {"type": "llama2"},
    "pipeline": {"type": CHAT_PIPELINE},
}

# Files whose presence marks a directory as a checkpoint that a save may replace.
_CHECKPOINT_MARKERS = (CONFIGURATION_FILE, "config.json")


def save_checkpoint(
    model: PreTrainedModel,
    save_directory: Union[str, os.PathLike],
    *,
    tokenizer: Any = None,
    max_shard_size: Union[int, str] = "2GB",
    configuration: Optional[Dict[str, Any]] = None,
    readme: Optional[str] = None,
) -> str:
    """Save ``model`` (and its tokenizer) as a ModelScope checkpoint at ``save_directory``.

    ``tokenizer`` may be a :class:`~modelscope_llama2.Llama2Tokenizer` or
    transformers' ``LlamaTokenizer``; when omitted, the ``tokenizer.model`` of
    the directory the model was loaded from is used. ``configuration`` replaces
    :data:`DEFAULT_CONFIGURATION`; ``readme`` replaces the generated model card
    (:func:`model_card`). An existing checkpoint at ``save_directory`` is
    replaced only once the new one is complete; a non-empty directory that is
    not a checkpoint is never overwritten. Returns ``save_directory``.
    """
    target = _checked_target(save_directory)
    sp_tokenizer = _checked_tokenizer(model, tokenizer)
    configuration = _checked_configuration(configuration)
    if not isinstance(max_shard_size, (int, str)) or isinstance(max_shard_size, bool):
        raise TypeError(f"max_shard_size: expected an int or a string such as '2GB', got {max_shard_size!r}")
    if readme is not None and not isinstance(readme, str):
        raise TypeError(f"readme: expected a string or None, got {type(readme).__name__}")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{name}.saving-")
    try:
        # Not model.save_pretrained: model classes of this package route that
        # method back here. transformers 5 always writes safetensors.
        PreTrainedModel.save_pretrained(model, staging, max_shard_size=max_shard_size)
        sp_tokenizer.save_pretrained(staging)
        _write_text(os.path.join(staging, CONFIGURATION_FILE), json.dumps(configuration, indent=4) + "\n")
        _write_text(os.path.join(staging, README_FILE), model_card(name, model, configuration) if readme is None
                    else readme)
        _fsync_tree(staging)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return os.fspath(save_directory)


def model_card(name: str, model: PreTrainedModel, configuration: Dict[str, Any]) -> str:
    """A README stub: ModelScope front matter, the model's shape and how to load it."""
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    return (
        "---\n"
        f"tasks:\n- {configuration.get('task', 'chat')}\n"
        "frameworks:\n- pytorch\n"
        "license: llama2\n"
        "---\n"
        f"# {name}\n\n"
        "Meta's Llama 2 chat model in ModelScope layout "
        f"({parameters / 1e9:.2f}B parameters, {str(config.dtype).replace('torch.', '')}, "
        f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
        f"{config.num_attention_heads} attention heads, {config.num_key_value_heads} key/value heads, "
        f"vocabulary {config.vocab_size}).\n\n"
        "## Usage\n\n"
        "```python\n"
        "import modelscope_llama2\n"
        "from modelscope import Model, snapshot_download\n\n"
        f"model_dir = snapshot_download('<owner>/{name}', revision='<tag>')\n"
        "model = Model.from_pretrained(model_dir)\n"
        "tokenizer = modelscope_llama2.Llama2Tokenizer.from_pretrained(model_dir)\n"
        "print(model.chat({'text': 'Hello!'}, tokenizer)['response'])\n"
        "```\n\n"
        "Use of the weights is governed by the Llama 2 Community License and Acceptable Use Policy.\n"
    )


def _checked_target(save_directory: Any) -> str:
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory: expected a path, got {type(save_directory).__name__}")
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"save_directory: {target} exists and is not a directory")
    if os.path.isdir(target) and os.listdir(target) and not any(
        os.path.isfile(os.path.join(target, marker)) for marker in _CHECKPOINT_MARKERS
    ):
        raise ValueError(
            f"save_directory: {target} is a non-empty directory without config.json or configuration.json; "
            "refusing to replace something that is not a checkpoint"
        )
    return target


def _checked_tokenizer(model: PreTrainedModel, tokenizer: Any) -> Llama2Tokenizer:
    if tokenizer is None:
        source = getattr(model, "name_or_path", "") or ""
        vocab = os.path.join(source, VOCAB_FILE)
        if not source or not os.path.isfile(vocab):
            raise ValueError(
                f"tokenizer: required, since the model was not loaded from a directory with a {VOCAB_FILE} "
                "(a checkpoint without its tokenizer is incomplete)"
            )
        tokenizer = Llama2Tokenizer(vocab)
    sp_tokenizer = sentencepiece_tokenizer(tokenizer)
    if sp_tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer: its {sp_tokenizer.vocab_size} pieces do not fit the model's "
            f"vocab_size {model.config.vocab_size}"
        )
    return sp_tokenizer


def _checked_configuration(configuration: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if configuration is None:
        return copy.deepcopy(DEFAULT_CONFIGURATION)
    if not isinstance(configuration, dict):
        raise TypeError(f"configuration: expected a dict, got {type(configuration).__name__}")
    if not isinstance(configuration.get("task"), str) or not isinstance(configuration.get("model"), dict) \
            or "type" not in configuration["model"]:
        raise ValueError("configuration: needs a 'task' string and a 'model': {'type': ...} entry, "
                         f"got {configuration!r}")
    return configuration


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _fsync_tree(directory: str) -> None:
    """Flush every file and the directory itself, so the rename publishes data already on disk."""
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(staging: str, target: str) -> None:
    """Rename ``staging`` to ``target``; an old ``target`` is set aside first and dropped last."""
    if not os.path.exists(target):
        os.rename(staging, target)
        return
    parent, name = os.path.split(target)
    trash = tempfile.mkdtemp(dir=parent, prefix=f".{name}.replaced-")
    old = os.path.join(trash, name)
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        os.rmdir(trash)
        raise
    shutil.rmtree(trash, ignore_errors=True)
