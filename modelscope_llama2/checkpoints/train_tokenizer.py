"""Train a Llama 2-style sentencepiece ``tokenizer.model`` for checkpoints built from scratch.

Used by ``scripts/build_demo_checkpoint.py`` and the benchmark checkpoint
(``bench/checkpoint.py``); loading and using a tokenizer is
:mod:`modelscope_llama2.tokenizer`'s job.

Example:
    >>> import os, tempfile
    >>> from modelscope_llama2 import Llama2Tokenizer
    >>> path = os.path.join(tempfile.mkdtemp(), "tokenizer.model")
    >>> train_sentencepiece(["Hello world! 浙江的省会是杭州。"] * 50, path, vocab_size=300)
    >>> tok = Llama2Tokenizer(path)
    >>> tok.bos_token_id, tok.eos_token_id, tok.decode(tok.encode("Hello 😀"))
    (1, 2, 'Hello 😀')
"""

import io
from typing import Iterable

import sentencepiece as spm

from ..constants import BOS_ID, EOS_ID, UNK_ID


def train_sentencepiece(sentences: Iterable[str], path: str, vocab_size: int, num_threads: int = 1) -> None:
    """Train a BPE ``tokenizer.model`` with Llama 2's sentencepiece settings and write it to ``path``.

    Byte fallback (any text reaches the model), split digits, identity
    normalization, a dummy prefix, whitespace kept as is, unk=0 bos=1 eos=2
    and no pad piece. One thread (the default) makes training reproducible
    byte for byte.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Small corpora cannot fill a vocabulary; take what they give.
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=num_threads,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())
