"""What the tests share: tiny checkpoints, Meta's reference prompt, a forward recorder.

Test modules import from here, never from each other or from conftest.

* Tiny Llama 2 checkpoints in ModelScope layout, built from scratch: the
  tokenizer is a sentencepiece BPE trained here with Llama's settings (byte
  fallback, split digits, identity normalization, dummy prefix, no whitespace
  folding, unk=0 bos=1 eos=2); the model is a random ``LlamaConfig`` with a
  few layers. Nothing is downloaded.
* :func:`meta_chat_tokens`: Meta's ``chat_completion`` prompt, written
  independently of the package.
* :class:`ForwardLog`: the input ids of every forward pass of a model.
* :func:`write_meta_release`: a checkpoint in Meta's release layout.
* :func:`doc_blocks`: the code blocks of README.md and docs/, each with the
  marker comment that says how it is run or why it is not.
* :func:`engine_processes`, :func:`process_runs`: a server's engine child
  processes, read from ``/proc``.
"""

import glob
import json
import os
import re
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from typing import Any, Dict, List, Optional, Sequence, Tuple

import sentencepiece as spm
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from modelscope_llama2.checkpoints.convert_meta import intermediate_size
from modelscope_llama2.checkpoints.train_tokenizer import train_sentencepiece
from modelscope_llama2.constants import BOS_ID, CONTEXT_LENGTH, EOS_ID
from modelscope_llama2.prompts.chat_format import dialog_from_history, fit_dialog

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORPUS = [
    "Where is the capital of Zhejiang? The capital of Zhejiang is Hangzhou.",
    "What are the interesting places there? West Lake, Lingyin Temple and the Grand Canal.",
    "[INST] <<SYS>>\nyou are a helpful assistant!\n<</SYS>>\n\nHello there [/INST] Hi! How can I help? ",
    "浙江的省会是杭州。西湖很美，灵隐寺也很有名。你好，世界！",
    "日本語のテキストも少し。한국어 문장도 있습니다.",
    "Numbers: 0123456789, 3.14159, 2023-07-18, 4096 tokens and 70B parameters.",
    "Emoji 😀🎉👍🏽 and symbols ©®™ ✓ → ← «quotes» “curly” ‘single’.",
    "Tabs\tand  double  spaces   and    more     spaces\nnew lines\n\nparagraphs.",
    "def chat(inputs, tokenizer):\n    return model.generate(**inputs)  # code",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "</s> <s> <unk> are sentencepiece control pieces but plain text here.",
]


def train_tiny_tokenizer(path: str, vocab_size: int = 400) -> None:
    """The tiny checkpoints' ``tokenizer.model``: Llama's sentencepiece settings on :data:`CORPUS`.

    ``tests/test_tokenizer.py`` checks those settings in the trained model itself.
    """
    train_sentencepiece(CORPUS * 20, path, vocab_size)


def tiny_config(vocab_size: int, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


# What the ModelScope Llama 2 chat repos carry.
MODELSCOPE_CHAT_CONFIGURATION = {
    "framework": "pytorch",
    "task": "chat",
    "model": {"type": "llama2"},
    "pipeline": {"type": "llama2-text-generation-chat-pipeline"},
}
MODELSCOPE_TEXT_GENERATION_CONFIGURATION = {
    "framework": "pytorch",
    "task": "text-generation",
    "model": {"type": "llama"},
    "pipeline": {"type": "llama2-text-generation-pipeline"},
}


def repo_configuration() -> dict:
    with open(os.path.join(REPO_ROOT, "configuration.json")) as f:
        return json.load(f)


def build_tiny_checkpoint(directory: str, configuration: dict = None, seed: int = 0, tokenizer_dir: str = None,
                          **config_overrides) -> str:
    """Write a complete tiny checkpoint to ``directory`` and return it."""
    os.makedirs(directory, exist_ok=True)
    vocab = os.path.join(directory, "tokenizer.model")
    if tokenizer_dir:
        shutil.copy(os.path.join(tokenizer_dir, "tokenizer.model"), vocab)
    else:
        train_tiny_tokenizer(vocab)
    vocab_size = spm.SentencePieceProcessor(model_file=vocab).vocab_size()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size, **config_overrides))
    # Random init gives near-uniform logits; a larger scale makes greedy
    # decoding decisive, so tiny numerical differences cannot flip a token.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.6, top_p=0.9, max_length=4096
    )
    model.save_pretrained(directory)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": 4096, "legacy": False}, f)
    with open(os.path.join(directory, "configuration.json"), "w") as f:
        json.dump(configuration or repo_configuration(), f, indent=4)
    return directory


def build_scripted_checkpoint(directory: str, script: str, tokenizer_dir: str, configuration: dict = None) -> str:
    """A checkpoint whose greedy answer to any chat prompt is ``script`` followed by EOS.

    ``script``: a text, or a list of sentencepiece pieces (for whitespace the
    encoder would normalise away).

    Every decoder block's output projections are zeroed, so the residual
    stream is the current token's embedding and the next token depends on the
    current one only; ``lm_head`` then maps each token of the chain
    ``prompt end -> script tokens -> EOS`` to its successor. A real
    ``LlamaForCausalLM`` with set weights: streaming, stops and batches can be
    checked against known text, multi-byte characters included.
    """
    build_tiny_checkpoint(directory, configuration=configuration, tokenizer_dir=tokenizer_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))
    script_ids = sp.encode(script) if isinstance(script, str) else [sp.piece_to_id(piece) for piece in script]
    chain = [sp.encode("[INST] x [/INST]")[-1], *script_ids, sp.eos_id()]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError(f"script {script!r}: every token must be distinct so the chain cannot loop")
    model = LlamaForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        embeddings.copy_(torch.nn.functional.normalize(embeddings, dim=-1))
        model.lm_head.weight.zero_()
        for token, successor in zip(chain, chain[1:]):
            model.lm_head.weight[successor] += 50.0 * embeddings[token]
    model.save_pretrained(directory)
    return directory


# The scripted checkpoint's greedy answer to every chat prompt: ASCII, then a
# 3-byte and a 4-byte character made of byte-fallback tokens, then EOS.
SCRIPT = "Yes,龍🐉!"


class ForwardLog:
    """Records the input ids (first row) of every forward pass of a model, as a context manager."""

    def __init__(self, model):
        self.calls: List[List[int]] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append(kwargs["input_ids"][0].tolist())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def meta_chat_tokens(sp: spm.SentencePieceProcessor, dialog: list) -> list:
    """Written from meta-llama/llama ``llama/generation.py`` (Aug 2023), on raw sentencepiece."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def encode(s, bos, eos):
        t = sp.encode(s)
        return ([sp.bos_id()] if bos else []) + t + ([sp.eos_id()] if eos else [])

    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] \
            + dialog[2:]
    dialog_tokens = sum(
        [
            encode(f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ", bos=True, eos=True)
            for prompt, answer in zip(dialog[::2], dialog[1::2])
        ],
        [],
    )
    dialog_tokens += encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True, eos=False)
    return dialog_tokens


def as_meta_dialog(system: Optional[str], history: Sequence[Tuple[str, str]], text: str) -> list:
    """Meta's own dialog, built here rather than with the package's helper."""
    dialog = [{"role": "system", "content": system}] if system else []
    for user, answer in history:
        dialog += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return dialog + [{"role": "user", "content": text}]


def without_usage(result: Any) -> Any:
    """A ``chat()``/``complete()`` result (or a list of them) without ``usage``.

    ``usage['cached_tokens']`` legitimately differs between a first call and a
    repeat (the prefix cache); answers are compared without it and usage is
    checked on its own (:func:`assert_usage`).
    """
    if isinstance(result, list):
        return [without_usage(item) for item in result]
    return {key: value for key, value in result.items() if key != "usage"}


def assert_usage(result: Dict[str, Any], prompt_tokens: int, completion_tokens: int,
                 cached_tokens: Optional[int] = None) -> None:
    """``result['usage']`` counts ``prompt_tokens`` and ``completion_tokens`` (and ``cached_tokens`` when given)."""
    usage = result["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt_tokens, completion_tokens), usage
    assert usage["total_tokens"] == prompt_tokens + completion_tokens, usage
    assert 0 <= usage["cached_tokens"] < prompt_tokens, usage
    if cached_tokens is not None:
        assert usage["cached_tokens"] == cached_tokens, usage


# -- dialog fixtures ------------------------------------------------------------

LONG_HISTORY = [(f"question {i}: what is {i} + {i}?", f"{i} + {i} = {2 * i}.") for i in range(12)]

# (system, history, text): at least 20 dialogs over the cases that trip prompt builders up.
DIALOGS = [
    (None, [], "Where is the capital of Zhejiang?"),
    ("you are a helpful assistant!", [], "Where is the capital of Zhejiang?"),
    ("you are a helpful assistant!", [("Where is the capital of Zhejiang?", "Hangzhou.")],
     "What are the interesting places there?"),
    ("", [], "system is the empty string"),
    (None, [("hi", "hello")], "system is None"),
    (None, [], "浙江的省会是哪里？"),
    ("请用中文回答。", [("你好", "你好！有什么可以帮你？")], "西湖在哪里？"),
    (None, [], "emoji 😀🎉👍🏽 and a dragon 🐉 and ©®™"),
    (None, [], "digits 0123456789 and 3.14159 and 2023-07-18"),
    (None, [], "runs  of   spaces    inside"),
    (None, [], "   leading and trailing spaces   "),
    (None, [], "tabs\tin\t\tthe\ttext"),
    (None, [], "new\nlines\n\nand paragraphs\n"),
    ("multi-line\nsystem\n\nprompt", [], "hi"),
    ("  system with spaces  ", [], "  user with spaces  "),
    (None, [("first", ""), ("second", "  ")], "empty answers in history"),
    (None, [("", "answer to an empty message")], ""),
    (None, [], "user text with </s> and <s> in it"),
    (None, [("tell me </s>", "<s> is plain text too </s>")], "<unk> as well"),
    ("you are a helpful assistant!", LONG_HISTORY, "and the next one?"),
    (None, LONG_HISTORY, "long history, no system"),
    (None, [], "日本語 and 한국어 mixed with English"),
    ("sys", [("a\tb", "c\nd")], "e  f"),
    (None, [], "x"),
]


# What no chat template can fix: transformers parses "<s>"/"</s>" typed in a
# message as the special tokens; Meta's (and this package's) encoder keeps them as text.
TYPED_SPECIALS = ("<s>", "</s>")


def as_messages(system, history, text):
    """A dialog in transformers' message form; a ``system`` of ``""`` stays an (empty) system message."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, answer in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": text}]


def has_typed_specials(messages):
    return any(tag in m["content"] for m in messages for tag in TYPED_SPECIALS)


# -- the demo checkpoint's trained answers ---------------------------------------------

ZHEJIANG = "Where is the capital of Zhejiang?"
HANGZHOU = "The capital of Zhejiang Province is Hangzhou."
PLACES = "What are the interesting places there?"
SIGHTS = "West Lake, Lingyin Temple and the Grand Canal are worth a visit."
ONE_WORD = "Answer in one word."


def meta_prompt(tokenizer, system, rounds, text, max_new_tokens=None):
    """(token count, rounds dropped) of Meta's prompt for this history, fitted to the context as the model fits it."""
    if max_new_tokens is None:  # the web chat's default answer length
        from modelscope_llama2.apps.web import DEFAULT_MAX_NEW_TOKENS as max_new_tokens
    ids, dropped = fit_dialog(dialog_from_history(text, rounds, system), tokenizer.sp_model.encode, BOS_ID, EOS_ID,
                              budget=CONTEXT_LENGTH - max_new_tokens)
    return len(ids), dropped


# -- a real server on loopback ------------------------------------------------------------

@contextmanager
def running_server(app):
    """Serve ``app`` on a free loopback port in a thread; yields the base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    import uvicorn  # the server's test dependency; most tests never start one

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)



def signal_with_streams_in_flight(url: str, process, signum: int, headers: Optional[Dict[str, str]] = None,
                                  timeout: float = 120) -> Tuple[List[List[str]], int, float]:
    """Four long streams of model ``tiny`` running on the server ``process`` at ``url``, then ``signum``.

    Returns the SSE ``data:`` payloads of each stream, the exit code and the seconds from the signal to the exit.
    """
    import httpx  # the server's test dependency

    bodies: List[List[str]] = [[] for _ in range(4)]
    started = threading.Barrier(5)

    def stream(i):
        with httpx.Client(timeout=timeout, headers=headers) as client:
            with client.stream("POST", url + "/v1/completions", json={
                    "model": "tiny", "prompt": f"stream {i}", "max_tokens": 3000, "temperature": 0,
                    "ignore_eos": True, "stream": True}) as reply:
                lines = reply.iter_lines()
                first = next(lines)
                started.wait()
                bodies[i] = [line[6:] for line in [first, *lines] if line.startswith("data: ")]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    started.wait(timeout)
    signalled = time.monotonic()
    process.send_signal(signum)
    code = process.wait(timeout)
    exited = time.monotonic() - signalled
    for thread in threads:
        thread.join(30)
    return bodies, code, exited


def assert_drained(bodies: List[List[str]]) -> None:
    """Every stream ended with the drain's error event, then ``[DONE]`` (issue 19)."""
    for events in bodies:
        assert events and events[-1] == "[DONE]", events[-3:]
        assert json.loads(events[-2])["error"]["type"] == "service_unavailable_error", events[-3:]

# -- code blocks of the documentation ------------------------------------------

DOCS = ["README.md", *sorted(os.path.relpath(path, REPO_ROOT) for path in glob.glob(f"{REPO_ROOT}/docs/*.md"))]


@dataclass(frozen=True)
class DocBlock:
    """A fenced code block; ``marker`` is the ``<!-- ... -->`` comment on the line above it ("" if none)."""

    path: str
    line: int
    language: str
    code: str
    marker: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def doc_blocks(paths: Sequence[str] = DOCS) -> List[DocBlock]:
    blocks = []
    for path in paths:
        with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
            text = f.read()
        for match in re.finditer(r"^(?:<!-- (.*?) -->\n)?```(\w*)\n(.*?)^```$", text, re.M | re.S):
            line = text.count("\n", 0, match.start(2)) + 1
            blocks.append(DocBlock(path, line, match.group(2), match.group(3), match.group(1) or ""))
    return blocks


def doc_block(marker: str) -> List[DocBlock]:
    """The blocks whose marker is ``marker``."""
    return [block for block in doc_blocks() if block.marker == marker]


# -- Meta's release layout -------------------------------------------------------

MHA = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
# 70B-style: grouped-query attention and a widened MLP.
GQA = dict(MHA, n_kv_heads=2, ffn_dim_multiplier=1.3)

# Meta's model-parallel split: dim 0 for ColumnParallelLinear, dim 1 for
# RowParallelLinear and ParallelEmbedding, None for replicated norms.
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1,
             "tok_embeddings": 1, "output": 0, "attention_norm": None, "ffn_norm": None, "norm": None}


def meta_weights(params, vocab_size, seed=0):
    """Random full (unsplit) weights under Meta's names, with non-trivial norms."""
    generator = torch.Generator().manual_seed(seed)
    dim, head_dim = params["dim"], params["dim"] // params["n_heads"]
    kv_dim = params.get("n_kv_heads", params["n_heads"]) * head_dim
    hidden = intermediate_size(params)

    def rand(*shape, scale=0.08):
        return torch.randn(*shape, generator=generator) * scale

    weights = {"tok_embeddings.weight": rand(vocab_size, dim, scale=1.0), "norm.weight": 1 + rand(dim),
               "output.weight": rand(vocab_size, dim), "rope.freqs": torch.ones(head_dim // 2)}
    for i in range(params["n_layers"]):
        layer = {"attention.wq": rand(dim, dim), "attention.wk": rand(kv_dim, dim), "attention.wv": rand(kv_dim, dim),
                 "attention.wo": rand(dim, dim), "feed_forward.w1": rand(hidden, dim),
                 "feed_forward.w2": rand(dim, hidden), "feed_forward.w3": rand(hidden, dim),
                 "attention_norm": 1 + rand(dim), "ffn_norm": 1 + rand(dim)}
        weights.update({f"layers.{i}.{name}.weight": w for name, w in layer.items()})
    return weights


def write_meta_release(directory, params, weights, n_shards):
    """Meta's layout: params.json and consolidated.NN.pth, each rank holding its slice."""
    os.makedirs(directory)
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)
    for rank in range(n_shards):
        shard = {}
        for name, weight in weights.items():
            dim = SPLIT_DIM.get(name.split(".")[-2], None)
            shard[name] = weight.chunk(n_shards, dim)[rank].clone() if dim is not None else weight.clone()
        torch.save(shard, os.path.join(directory, f"consolidated.{rank:02d}.pth"))


def _children(pid: int) -> List[int]:
    try:
        return [int(child) for task in os.listdir(f"/proc/{pid}/task")
                for child in open(f"/proc/{pid}/task/{task}/children").read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def engine_processes(pid: int) -> List[int]:
    """The children of ``pid`` that multiprocessing spawned (its resource tracker, also a child, is not one)."""
    def command(child: int) -> bytes:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                return cmdline.read()
        except (FileNotFoundError, ProcessLookupError):
            return b""

    return [child for child in _children(pid) if b"spawn_main" in command(child)]


def process_runs(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
