"""The documented ModelScope calls for Llama 2 chat, runnable: the model card's usage, then pipelines.

    python examples/chat.py                                        # the offline demo checkpoint
    python examples/chat.py --model modelscope/Llama-2-13b-chat-ms # the real model (GPU, float16)
    python examples/chat.py --model /path/to/checkpoint --device cpu

The demo checkpoint answers only a handful of example questions (it is a demo
of the machinery, not a language model); the calls are the same for 13B.
"""

import argparse
import os

import torch
from modelscope import Model, snapshot_download
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks

import modelscope_llama2  # noqa: F401  (registers the Llama 2 model and pipelines with ModelScope)
from modelscope_llama2 import Llama2Tokenizer
from modelscope_llama2.constants import DEMO_DIR


def model_card_usage(model_id_or_dir: str, revision: str, placement: dict) -> None:
    """The usage on the Llama-2-13b-chat-ms model card, word for word but for the model id."""
    model_dir = model_id_or_dir if os.path.isdir(model_id_or_dir) else snapshot_download(model_id_or_dir,
                                                                                          revision=revision)
    tokenizer = Llama2Tokenizer.from_pretrained(model_dir)
    model = Model.from_pretrained(model_dir, **placement)
    system = "you are a helpful assistant!"
    inputs = {"text": "Where is the capital of Zhejiang?", "system": system, "max_length": 512, "do_sample": False}
    output = model.chat(inputs, tokenizer)
    print(output["response"])
    inputs = {"text": "What are the interesting places there?", "system": system, "history": output["history"],
              "max_length": 512, "do_sample": False}
    output = model.chat(inputs, tokenizer)
    print(output["response"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEMO_DIR, help="ModelScope model id or local dir (default: the demo)")
    parser.add_argument("--revision", default="v1.0.2", help="hub revision for a model id (default: v1.0.2)")
    parser.add_argument("--device", help="cpu, gpu, cuda:N (default: device_map='auto' in float16)")
    args = parser.parse_args()

    # The model card's placement; on CPU, float32 is faster than float16.
    placement = {"device": args.device} if args.device else {"device_map": "auto", "torch_dtype": torch.float16}
    model_card_usage(args.model, args.revision, placement)

    pipe = pipeline(task=Tasks.chat, model=args.model, model_revision=args.revision, **placement)

    result = pipe("Where is the capital of Zhejiang?", max_length=512, do_sample=False)
    print(result["response"])
    result = pipe("What are the interesting places there?", history=result["history"], max_length=512,
                  do_sample=False)
    print(result["response"])

    # A system prompt (there is none by default), and OpenAI-style messages.
    print(pipe("Where is the capital of Zhejiang?", system="Answer in one word.", do_sample=False)["response"])
    messages = [{"role": "user", "content": "浙江的省会在哪里？"}]
    print(pipe({"messages": messages}, do_sample=False)["message"])

    # Streaming: each item holds the whole answer so far.
    shown = ""
    for partial in pipe.stream("Say hello in emoji.", do_sample=False):
        print(partial["response"][len(shown):], end="", flush=True)
        shown = partial["response"]
    print()

    # A batch: one padded generate() call, answers in order.
    for answer in pipe(["Who are you?", "What is 2 + 2?"], do_sample=False, max_new_tokens=128):
        print(answer["response"])

    # Plain completion with the same weights: BOS + text, no chat format.
    complete = pipeline(task=Tasks.text_generation, model=args.model, model_revision=args.revision, **placement)
    print(complete("[INST] Where is the capital of Zhejiang? [/INST]", max_new_tokens=16, do_sample=False)["text"])


if __name__ == "__main__":
    main()
