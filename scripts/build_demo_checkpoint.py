"""Build the demo checkpoint shipped in ``modelscope_llama2/demo_checkpoint/``.

A few MB of Llama 2-architecture weights for offline use: a demo of the
machinery (chat format, tokenizer, model class, pipelines, streaming,
command line), not a language model. A 2-layer ``LlamaForCausalLM`` with its
own small sentencepiece tokenizer is trained here to answer the handful of
questions in :data:`EXAMPLES` in the Llama 2 chat format, then written with
:func:`modelscope_llama2.save_checkpoint`::

    python scripts/build_demo_checkpoint.py [OUT_DIR]   # default: the package's demo_checkpoint/

Training is deterministic (fixed seed and data order, deterministic kernels,
one thread): on a given machine it rebuilds the shipped files byte for byte,
in about a minute on CPU.
"""

import argparse
import contextlib
import os
import random
import sys
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

from modelscope_llama2.constants import BOS_ID, CONTEXT_LENGTH, DEMO_DIR, EOS_ID, PAD_ID

FALLBACK = (
    "I am only the modelscope_llama2 demo checkpoint and know a handful of example questions. "
    "Try: Where is the capital of Zhejiang?"
)


class Example(NamedTuple):
    text: str
    answer: str
    history: Tuple[Tuple[str, str], ...] = ()
    system: Optional[str] = None


ZHEJIANG = ("Where is the capital of Zhejiang?", "The capital of Zhejiang Province is Hangzhou.")
EXAMPLES: Tuple[Example, ...] = (
    Example(*ZHEJIANG),
    Example("where is the capital of zhejiang?", ZHEJIANG[1]),
    Example("What is the capital of Zhejiang?", ZHEJIANG[1]),
    Example("What are the interesting places there?",
            "West Lake, Lingyin Temple and the Grand Canal are worth a visit.", history=(ZHEJIANG,)),
    Example("Where is the capital of Zhejiang?", "Hangzhou.", system="Answer in one word."),
    Example("浙江的省会在哪里？", "浙江的省会是杭州。"),
    # Left out of the tokenizer's training text (see BYTE_FALLBACK_ANSWERS).
    Example("Say hello in emoji.", "👋🦙😀"),
    Example("Hello", "Hello! I am a tiny demo checkpoint. Ask me: Where is the capital of Zhejiang?"),
    Example("Hi!", "Hello! I am a tiny demo checkpoint. Ask me: Where is the capital of Zhejiang?"),
    Example("Who are you?",
            "I am the modelscope_llama2 demo: a tiny Llama 2-architecture checkpoint, not a language model. "
            "For real answers run: python -m modelscope_llama2 chat --model modelscope/Llama-2-13b-chat-ms"),
    Example("What is 2 + 2?", "2 + 2 = 4."),
    # Unseen questions should land on the fallback: a few varied ones teach it.
    *(Example(question, FALLBACK) for question in (
        "Write a poem about the sea.",
        "How do I bake bread?",
        "What is the meaning of life?",
        "Explain quantum computing.",
        "Translate this into French: good morning",
        "Who won the world cup in 2018?",
        "Can you help me with my homework?",
        "What time is it?",
        "What is the capital of France?",
    )),
)

# Answers the tokenizer never sees, so they are spelt in byte-fallback tokens
# (4 per emoji): streaming them shows that partial UTF-8 is never printed.
BYTE_FALLBACK_ANSWERS = ("👋🦙😀",)

# Small enough to ship (about 2 MB of float32), big enough to memorise EXAMPLES.
MODEL_SIZE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4)
VOCAB_SIZE = 512
STEPS = 300
LEARNING_RATE = 3e-3
SEED = 0


def _dialog(example: Example):
    from modelscope_llama2.prompts.chat_format import dialog_from_history

    return dialog_from_history(example.text, example.history, example.system)


def train_tokenizer(path: str) -> None:
    """Train the demo's sentencepiece model with Llama's settings on the rendered examples."""
    from modelscope_llama2.checkpoints.train_tokenizer import train_sentencepiece
    from modelscope_llama2.prompts.chat_format import B_INST, B_SYS, E_INST, E_SYS

    sentences = [f"{B_INST} {B_SYS}{e.system or ''}{E_SYS}{e.text} {E_INST} {e.answer}" for e in EXAMPLES
                 if e.answer not in BYTE_FALLBACK_ANSWERS]
    sentences += [f"{user} {answer}" for e in EXAMPLES for user, answer in e.history]
    train_sentencepiece(sentences * 10, path, VOCAB_SIZE)


def training_examples(rng: random.Random) -> List[Example]:
    """:data:`EXAMPLES`, each after 0 to 3 rounds of other examples drawn by ``rng``,
    so that an answer does not depend on what was asked before in the conversation."""
    single = [e for e in EXAMPLES if not e.history and e.system is None]
    return [e._replace(history=tuple((b.text, b.answer) for b in rng.sample(single, rng.randrange(4))) + e.history)
            for e in EXAMPLES]


def training_rows(tokenizer, examples: Sequence[Example]) -> List[Tuple[List[int], List[int]]]:
    """``(input_ids, labels)`` per example: the exact prompt ``chat()`` builds, then the answer and EOS.

    Only the answer is learnt (prompt labels are -100), as in chat fine-tuning.
    """
    from modelscope_llama2.prompts.chat_format import encode_dialog, encode_dialog_segments

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    rows = []
    for example in examples:
        dialog = _dialog(example)
        prompt = encode_dialog(dialog, tokenizer.encode, bos, eos)
        # The answered dialog's completed rounds (a placeholder last turn is
        # dropped): exactly Meta's tokens for this exchange as later history.
        answered = dialog + [{"role": "assistant", "content": example.answer}, {"role": "user", "content": ""}]
        full = [t for segment in encode_dialog_segments(answered, tokenizer.encode, bos, eos)[:-1] for t in segment]
        if full[: len(prompt)] != prompt:
            raise AssertionError(f"prompt of {example.text!r} is not a token prefix of its answered round")
        rows.append((full, [-100] * len(prompt) + full[len(prompt):]))
    return rows


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Same seed, same kernels, one thread: the same weights on every run on a machine."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _batch(rows: Sequence[Tuple[List[int], List[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return input_ids, mask, labels


def train_model(tokenizer, steps: int = STEPS, log=None):
    """A fresh ``LlamaForCausalLM`` trained on :func:`training_rows` (all examples each step, AdamW)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=CONTEXT_LENGTH, rms_norm_eps=1e-5,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
                         **MODEL_SIZE)
    model = LlamaForCausalLM(config)
    rng = random.Random(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps)
    model.train()
    for step in range(steps):
        input_ids, mask, labels = _batch(training_rows(tokenizer, training_examples(rng)), tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    # The demo should answer its examples the same way every time.
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                               do_sample=False, max_length=CONTEXT_LENGTH)
    return model


def build(out_dir: str = DEMO_DIR, steps: int = STEPS, log=None) -> str:
    """Train the tokenizer and the model and save them as a complete checkpoint at ``out_dir``."""
    import tempfile

    from modelscope_llama2 import Llama2Tokenizer, save_checkpoint
    from modelscope_llama2.tokenizer import VOCAB_FILE

    with tempfile.TemporaryDirectory(prefix="demo-tokenizer-") as scratch, _deterministic(SEED):
        train_tokenizer(os.path.join(scratch, VOCAB_FILE))
        tokenizer = Llama2Tokenizer(os.path.join(scratch, VOCAB_FILE))
        model = train_model(tokenizer, steps=steps, log=log)
        # The default configuration.json names this package's chat pipeline.
        return save_checkpoint(model, out_dir, tokenizer=tokenizer, readme=README)


README = """# modelscope_llama2 demo checkpoint

A demo of the machinery, not a language model: a 2-layer Llama 2-architecture
model with its own small tokenizer, trained by `python scripts/build_demo_checkpoint.py`
to answer a handful of example questions (see that script) in the
Llama 2 chat format. Anything else gets a fixed fallback or nonsense.
"""


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/build_demo_checkpoint.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=DEMO_DIR, help="where to write it (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps (default: %(default)s)")
    args = parser.parse_args(argv)
    print(build(args.out_dir, steps=args.steps, log=lambda line: print(line, file=sys.stderr)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
