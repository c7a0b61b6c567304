"""One home for the facts the whole package shares: context length, special ids, names.

Example:
    >>> from modelscope_llama2.constants import CONTEXT_LENGTH, BOS_ID, EOS_ID
    >>> CONTEXT_LENGTH, BOS_ID, EOS_ID
    (4096, 1, 2)
"""

import os

# Llama 2's context window (Meta's max_seq_len), for every size.
CONTEXT_LENGTH = 4096

# Meta's tokenizer.model: <unk> 0, <s> 1, </s> 2 and no pad piece (-1).
# <unk> pads batches: an id the attention mask hides that never reads as EOS.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = UNK_ID

# Pipeline names this package registers (and writes into configuration.json).
CHAT_PIPELINE = "modelscope-llama2-chat"
TEXT_GENERATION_PIPELINE = "modelscope-llama2-text-generation"

# ModelScope's keyword choosing the inference engine, and its values here.
LLM_FRAMEWORK_KEY = "llm_framework"
DEFAULT_ENGINE = "transformers"
ENGINES = ("transformers", "vllm")

# The offline demo checkpoint shipped inside the package.
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_checkpoint")

# Sampling limits shared by the Python API and the server. Temperatures below
# SAMPLING_EPS decode greedily, as vLLM does (dividing logits by 1e-40 gives
# inf/nan); seeds are what torch.manual_seed and OpenAI's int64 both take.
SAMPLING_EPS = 1e-5
MAX_SEED = 2**63 - 1

# Weights dtypes: what a converted checkpoint is written in, and what a model loads in ("auto": as saved).
CHECKPOINT_DTYPES = ("float16", "bfloat16", "float32")
LOAD_DTYPES = ("auto", *CHECKPOINT_DTYPES)

# The environment variable `serve` reads its API key from (and the web chat's client, too).
API_KEY_ENV = "MODELSCOPE_LLAMA2_API_KEY"

# OpenAI's frequency/presence penalties: option names every engine implements
# itself (transformers has neither), and the range OpenAI allows.
PENALTY_OPTIONS = ("frequency_penalty", "presence_penalty")
PENALTY_RANGE = (-2.0, 2.0)
