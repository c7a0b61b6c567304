"""Conversation affinity on Ray Serve: 16 conversations x 6 turns against 2 replicas, affinity vs Ray's default router.

A simulated two-node Ray cluster (one CPU each, as in ``tests/ray``) runs
the OpenAI app with 2 replicas of the 166M benchmark checkpoint
(``bench/checkpoint.py``), behind Ray Serve's default router (power of two
choices: the less loaded of two random replicas) and behind this package's
conversation-affinity router, in alternating rounds (``--rounds``, medians
reported). Each replica runs the batching engine (in a child process; up to 8 requests in the
same forward passes, idle KV slots keeping conversations for their next
turn); clients send the 16 conversations 4 at a time, every turn streamed
with the real ``openai`` SDK, 16 sampled tokens per answer (temperature
0.8, top-p 0.95, a seed per turn, as chat UIs send them), and a user pause of
0-2 s (seeded) before each later turn. Without pauses, closed-loop clients
make any least-loaded router look sticky: the replica that just finished a
client's turn is the one with a free slot when its next turn arrives (with
2 replicas and 4 clients in lockstep, Ray's default router then keeps every
conversation in place by accident); with pauses, turns arrive as real users'
do, at moments unrelated to where their conversation lives.

For turns 2-6 of each conversation:

* hit rate: the share of turns whose ``usage.prompt_tokens_details.cached_tokens``
  covers the whole previous turn's prompt (it was answered by the replica
  that holds the conversation's KV);
* TTFT p50: the median time from sending the request to the first streamed
  text, also over the hits and the misses apart;
* tokens computed p50: ``prompt_tokens - cached_tokens``, the prefill a turn
  cost (on these CPUs TTFT grows with it, about 3 ms a token).

Rounds run both routers, which one goes first alternating (ABBA), so a
drift in the shared machine's load weighs on both; each ratio is the median
of the rounds' ratios (also printed over all rounds' turns pooled).

Targets (issue 20): hit rate >= 0.9 with affinity; later-turn TTFT p50 with
affinity at most half the default router's; throughput (wall time) not
below the default router's.

Run: ``python bench/scale.py`` (about 10 minutes on 2 idle cores; needs the
``[ray]`` extra; the first run also builds the checkpoint, about a minute).
``--conversations 8 --rounds 1`` gives a quick look while developing;
``--answer-tokens 64`` gives answers closer to a chat model's (each later
turn then re-sends more history), ``--replicas 4`` spreads the same load
over more, smaller replicas (the two nodes' CPUs shared among them).
"""

import argparse
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

from checkpoint import QUESTIONS, SYSTEM, checkpoint_dir
from timing import machine_line, table, verdict

CONVERSATIONS = 16
TURNS = 6
CLIENTS = 4
NEW_TOKENS = 16
THINK_S = 2.0  # the longest pause of a user between turns
MODEL = "bench-166m"

Turn = Tuple[int, float, bool, int]  # (turn index, seconds to first text, previous prompt fully cached, prompt
# tokens the replica computed: prompt_tokens - cached_tokens)


def conversation(client, index: int, new_tokens: int) -> List[Turn]:
    """One conversation's turns: TTFT and whether the previous prompt came from the cache."""
    messages = [{"role": "system", "content": SYSTEM}]
    previous_prompt, turns = 0, []
    pauses = random.Random(index)
    for turn in range(TURNS):
        if turn:
            time.sleep(pauses.uniform(0, THINK_S))
        # The first question names the conversation, so conversations differ after the shared system prompt.
        question = QUESTIONS[turn] if turn else f"(Family {index}) {QUESTIONS[0]}"
        messages.append({"role": "user", "content": question})
        started, first, pieces, usage = time.perf_counter(), None, [], None
        for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=new_tokens,
                                                    temperature=0.8, top_p=0.95, seed=index * TURNS + turn,
                                                    stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - started
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        cached = usage.prompt_tokens_details.cached_tokens
        turns.append((turn, first if first is not None else time.perf_counter() - started,
                      turn > 0 and cached >= previous_prompt, usage.prompt_tokens - cached))
        previous_prompt = usage.prompt_tokens
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return turns


def replica_split(metrics_text: str) -> Dict[str, float]:
    """Finished requests by replica, from the app's ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.labels["replica"]: sample.value for family in text_string_to_metric_families(metrics_text)
            if family.name == "modelscope_llama2_replica_requests" for sample in family.samples
            if sample.name.endswith("_total")}


def run_router(model_dir: str, router: str, port: int, args: argparse.Namespace) -> Dict[str, object]:
    """One round of one router: every conversation's turns, the requests each replica answered, the wall time."""
    import httpx
    import openai
    from ray import serve

    from modelscope_llama2.serving.config import ServerConfig
    from modelscope_llama2.serving.ray import EngineSpec, ScaleSpec, build_application

    options = {"kv_cache_bytes": kv_slot_bytes(model_dir) * args.kv_slots} if args.kv_slots else {}
    engine = EngineSpec(model_dir, device="cpu", max_concurrent=8, engine_options=options)
    # The two simulated nodes' CPUs, a quarter of each left to the ingress and Serve's actors.
    scale = ScaleSpec(replicas=args.replicas, replica_cpus=1.5 / args.replicas, router=router,
                      imbalance=args.imbalance)
    serve.run(build_application(engine, ServerConfig(MODEL), scale), name=router, route_prefix="/")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=600)
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            turns = [t for result in pool.map(lambda i: conversation(client, i, args.answer_tokens),
                                                     range(args.conversations))
                     for t in result]
        wall = time.perf_counter() - started
        split = replica_split(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
        return {"turns": turns, "wall_s": wall,
                "split": "/".join(str(int(n)) for n in sorted(split.values(), reverse=True))}
    finally:
        serve.delete(router)


def kv_slot_bytes(model_dir: str) -> int:
    """The KV bytes of one batching-engine slot (a whole context) of the checkpoint in ``model_dir``."""
    import torch
    from transformers import AutoConfig

    from modelscope_llama2.engines.batching.kv import bytes_per_token

    config = AutoConfig.from_pretrained(model_dir)
    return bytes_per_token(config, torch.float32) * config.max_position_embeddings


def figures(turns: List[Turn]) -> Dict[str, float]:
    """Hit rate, TTFT p50 (later turns; first turns) and prompt tokens computed per later turn (p50)."""
    later = [t for t in turns if t[0] > 0]
    hits = [ttft for _, ttft, hit, _ in later if hit]
    misses = [ttft for _, ttft, hit, _ in later if not hit]
    return {"hit_rate": len(hits) / len(later),
            "ttft_later_p50": statistics.median(ttft for _, ttft, _, _ in later),
            "ttft_first_p50": statistics.median(ttft for turn, ttft, _, _ in turns if turn == 0),
            "computed_p50": statistics.median(computed for *_, computed in later),
            "ttft_hits_p50": statistics.median(hits) if hits else float("nan"),
            "ttft_misses_p50": statistics.median(misses) if misses else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="checkpoint cache dir (default: ~/.cache/modelscope_llama2-bench)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of both routers, the first router alternating (default: 3)")
    parser.add_argument("--imbalance", type=int, default=4,
                        help="the affinity router's --imbalance: requests over the least loaded replica before "
                             "a conversation leaves its replica (default: 4)")
    parser.add_argument("--conversations", type=int, default=CONVERSATIONS,
                        help=f"conversations per round (default: {CONVERSATIONS}; fewer for a quick look only)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas over the 2 simulated nodes (default: 2)")
    parser.add_argument("--answer-tokens", type=int, default=NEW_TOKENS,
                        help=f"sampled tokens per answer (default: {NEW_TOKENS})")
    parser.add_argument("--kv-slots", type=int, default=0,
                        help="KV slots per replica, running and idle (default: the engine's own, 32 here: every "
                             "conversation fits on every replica). Fewer make a replica evict idle conversations, "
                             "as a GPU's KV memory does at 7B+ scale")
    args = parser.parse_args()
    model_dir = checkpoint_dir(args.dir)
    print(machine_line())

    # Nothing written to ~/.ray, nothing shared with other Ray instances on this machine.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-bench-")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"  # other work on a shared box must not get replicas killed
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 200 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    rounds: Dict[str, List[Dict[str, object]]] = {"default": [], "affinity": []}
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        for index in range(args.rounds):
            # ABBA: a drift in the machine's load over the run weighs on both routers alike.
            for router in list(rounds)[::1 if index % 2 == 0 else -1]:
                result = run_router(model_dir, router, port, args)
                rounds[router].append({**result, **figures(result["turns"])})
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return report(rounds, args)


def report(rounds: Dict[str, List[Dict[str, object]]], args: argparse.Namespace) -> int:
    print(f"\n{args.conversations} conversations x {TURNS} turns, {args.replicas} replicas, {CLIENTS} clients, "
          f"{args.answer_tokens} sampled tokens per answer, imbalance {args.imbalance}, "
          f"KV slots per replica {args.kv_slots or 'the engine default'}, {args.rounds} rounds (median of each figure)")
    ratios = [a["ttft_later_p50"] / d["ttft_later_p50"] for a, d in zip(rounds["affinity"], rounds["default"])]
    throughputs = [d["wall_s"] / a["wall_s"] for a, d in zip(rounds["affinity"], rounds["default"])]
    for router, results in rounds.items():
        print(f"{router} per round: later-turn TTFT p50 " + ", ".join(f"{r['ttft_later_p50']:.3f}" for r in results)
              + "; hit rate " + ", ".join(f"{r['hit_rate']:.2f}" for r in results))
    print("later-turn TTFT p50 affinity / default per round: " + ", ".join(f"{r:.2f}" for r in ratios))
    middle = {router: sorted(results, key=lambda r: r["wall_s"])[len(results) // 2] for router, results in rounds.items()}
    keys = ["hit_rate", "ttft_later_p50", "ttft_hits_p50", "ttft_misses_p50", "computed_p50", "ttft_first_p50",
            "wall_s"]
    print(table(["router", "requests per replica", "hit rate (turns 2-6)", "TTFT p50 turns 2-6 (s)",
                 "of hits (s)", "of misses (s)", "tokens computed p50 turns 2-6", "TTFT p50 turn 1 (s)",
                 "wall (s)"],
                [[router, middle[router]["split"], *(statistics.median(r[key] for r in results) for key in keys)]
                 for router, results in rounds.items()]))
    # Every round's later turns together: the same ratio with 3x the samples, a check on the per-round median.
    pooled = {router: statistics.median(t[1] for r in results for t in r["turns"] if t[0] > 0)
              for router, results in rounds.items()}
    ttft_ratio, throughput_ratio = statistics.median(ratios), statistics.median(throughputs)
    hit_rate = statistics.median(r["hit_rate"] for r in rounds["affinity"])
    print(f"\nlater-turn TTFT p50, affinity / default: {ttft_ratio:.2f}x (median of rounds); "
          f"{pooled['affinity'] / pooled['default']:.2f}x (all rounds' turns pooled)")
    ok = verdict("affinity hit rate", hit_rate, ">= 0.9", hit_rate >= 0.9)
    ok &= verdict("later-turn TTFT p50, affinity / default (median of rounds)", ttft_ratio, "<= 0.5",
                  ttft_ratio <= 0.5)
    ok &= verdict("throughput (wall time default / affinity)", throughput_ratio, ">= 1.0", throughput_ratio >= 1.0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
