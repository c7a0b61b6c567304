"""The benchmark checkpoint: a 166M-parameter Llama 2-shaped model in ModelScope layout.

Shape (from issue 5): hidden 1024, 8 layers, 16 heads (16 KV heads, as in
Llama 2 7B/13B), intermediate 2752, vocab 32000, fp32, random weights with a
fixed seed. The tokenizer is a sentencepiece BPE with Meta's settings
(byte fallback, split digits, identity normalization, dummy prefix, unk=0
bos=1 eos=2) trained here on a deterministic synthetic corpus to exactly
32000 pieces, so every id the model can emit decodes. Nothing is downloaded.

Built once into a cache dir (``~/.cache/modelscope_llama2-bench/llama2-166m``
or ``--dir``) and reused; a build takes about a minute.

Also here: the conversation every CPU benchmark uses, and loaders for both
sides (this package's ``Llama2ForChat`` and ModelScope's built-in
``LlamaForTextGeneration``) so the scripts share one definition of each.
"""

import json
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Iterator, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python bench/x.py` puts bench/ on the path, not the checkout: make the
# package importable without installing it (an installed copy loses).
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "modelscope_llama2-bench")
# Bump when anything below changes what gets built, so stale caches are rebuilt.
BUILD_VERSION = 2
SEED = 0
VOCAB_SIZE = 32000
SHAPE_166M = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=2752, vocab_size=VOCAB_SIZE)

SYSTEM = "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe."

# Nine turns of one realistic conversation, 15-30 words each.
QUESTIONS = [
    "I am planning a three day trip to Hangzhou next month with my parents. Which neighbourhoods would be "
    "the most convenient places for us to stay?",
    "My father has trouble walking long distances. Are the paths around West Lake flat enough, and can we "
    "rent an electric cart or take a boat instead?",
    "What local dishes should we try while we are there, and which of them are mild enough for someone "
    "who does not like spicy food?",
    "How early should we arrive at Lingyin Temple to avoid the crowds, and is there a dress code or an "
    "entrance fee we should know about?",
    "Could you suggest a simple itinerary for the second day that mixes a museum, a tea plantation and an "
    "easy walk without too much travelling?",
    "If it rains most of the week, which indoor attractions in the city would still make the trip "
    "worthwhile for a family with older travellers?",
    "We will take the high speed train from Shanghai. How long is the journey, and how far is Hangzhou East "
    "station from the lake area?",
    "Is it easy to pay with foreign credit cards in shops and restaurants, or should we set up a mobile "
    "payment app before we leave home?",
    "Finally, could you summarise the whole plan in a short checklist that I can print out and share with "
    "my parents before the trip?",
]


def checkpoint_dir(cache_dir: Optional[str] = None) -> str:
    """The 166M checkpoint's dir, built on first use."""
    directory = os.path.join(cache_dir or DEFAULT_CACHE, "llama2-166m")
    if not _is_complete(directory):
        build(directory)
    return directory


def _is_complete(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "bench_build.json")) as f:
            return json.load(f).get("version") == BUILD_VERSION
    except (OSError, ValueError):
        return False


def build(directory: str) -> None:
    """Write the checkpoint to ``directory`` (via a temp dir, so an interrupted build is never used)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from modelscope_llama2 import Llama2Tokenizer

    start = time.perf_counter()
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=".building-")
    os.chmod(work, 0o755)  # mkdtemp makes it private; the cache is shareable
    print(f"# building the benchmark checkpoint in {directory} (once; about a minute)", flush=True)
    vocab_file = os.path.join(work, "tokenizer.model")
    train_tokenizer(vocab_file)
    tokenizer = Llama2Tokenizer(vocab_file)
    if tokenizer.vocab_size != VOCAB_SIZE:  # every id the model emits must decode
        raise RuntimeError(f"the synthetic corpus gave {tokenizer.vocab_size} pieces, not {VOCAB_SIZE}")
    tokenizer.save_pretrained(work)  # tokenizer_config.json, which transformers' LlamaTokenizer reads too

    torch.manual_seed(SEED)
    config = LlamaConfig(**SHAPE_166M, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Llama 2 chat's own sampling defaults; the benchmarks ask for greedy explicitly.
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True,
                                               temperature=0.6, top_p=0.9, max_length=4096)
    model.save_pretrained(work)
    shutil.copy(os.path.join(REPO_ROOT, "configuration.json"), os.path.join(work, "configuration.json"))
    with open(os.path.join(work, "bench_build.json"), "w") as f:
        json.dump({"version": BUILD_VERSION, "seed": SEED, "shape": SHAPE_166M}, f)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.replace(work, directory)
    print(f"# built in {time.perf_counter() - start:.0f} s", flush=True)


# -- tokenizer ----------------------------------------------------------------

def train_tokenizer(path: str) -> None:
    """A 32000-piece sentencepiece BPE with Llama 2's trainer settings."""
    from modelscope_llama2.checkpoints.train_tokenizer import train_sentencepiece

    train_sentencepiece(synthetic_corpus(), path, VOCAB_SIZE, num_threads=os.cpu_count() or 1)


# Common English words, so the benchmark questions tokenize into realistic
# whole-word pieces; made-up words below give BPE enough distinct material
# to reach 32000 pieces.
ENGLISH = (
    "the of and to a in is you that it he was for on are as with his they I at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find long down day did get come "
    "made may part trip travel city lake temple train station food dish spicy mild museum tea walk rain family "
    "parents father mother hotel stay plan itinerary checklist print share card payment app shop restaurant "
    "crowd early fee dress code boat cart electric distance neighbourhood convenient month week journey high "
    "speed East West north south summarise finally suggest simple second easy indoor attraction worthwhile older "
    "travellers foreign credit mobile before leave home should would could which where why what how answer "
    "helpful respectful honest assistant always possible while being safe question please thank"
).split()
SYLLABLES = [o + n + c for o in ("", "b", "br", "c", "ch", "d", "f", "g", "gr", "h", "j", "k", "l", "m", "n",
                                 "p", "pl", "qu", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z")
             for n in ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
             for c in ("", "n", "r", "s", "t", "l", "ck", "nd", "ng", "m")]


def synthetic_corpus(sentences: int = 60_000) -> Iterator[str]:
    """Deterministic English-like text: the benchmark questions, then sentences of real and made-up words."""
    rng = random.Random(SEED)
    made_up = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(60_000)})
    rng.shuffle(made_up)
    words = ENGLISH + made_up
    # Zipf-like weights: frequent words become whole pieces, rare ones split.
    weights = [1.0 / (rank + 1) ** 0.9 for rank in range(len(words))]
    for question in QUESTIONS * 20:
        # Chat markup too, so "[INST]" and "<<SYS>>" take a few pieces as in
        # Meta's tokenizer rather than a dozen byte-fallback tokens.
        yield f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{question} [/INST] Sure, here you are. </s>"
    for _ in range(sentences):
        chosen = rng.choices(words, weights=weights, k=rng.randint(8, 24))
        chosen[0] = chosen[0].capitalize()
        if rng.random() < 0.2:
            chosen.insert(rng.randrange(len(chosen)), str(rng.randint(0, 99999)))
        yield " ".join(chosen) + rng.choice(".?!,;:")


# -- loading the two sides ----------------------------------------------------

def load_package_model(directory: str):
    """This package's ``Llama2ForChat`` through ModelScope's ``Model.from_pretrained``, fp32 on CPU, with its tokenizer."""
    import torch
    from modelscope import Model

    import modelscope_llama2

    model = Model.from_pretrained(directory, device="cpu", torch_dtype=torch.float32)
    assert isinstance(model, modelscope_llama2.Llama2ForChat), type(model)
    return model, modelscope_llama2.Llama2Tokenizer.from_pretrained(directory)


def load_builtin_model(directory: str):
    """ModelScope's own ``LlamaForTextGeneration`` on the same files, with the transformers tokenizer it expects."""
    import torch
    from modelscope.models.nlp.llama.text_generation import LlamaForTextGeneration
    from transformers import LlamaTokenizer

    model = LlamaForTextGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    return model, LlamaTokenizer.from_pretrained(directory)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build (or find) the 166M benchmark checkpoint.")
    parser.add_argument("--dir", default=None)
    print(checkpoint_dir(parser.parse_args().dir))
