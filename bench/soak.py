"""Soak test of the OpenAI server: a bounded stream of mixed requests, watching latency, memory and files.

Starts ``python -m modelscope_llama2 serve`` on the demo checkpoint (a
subprocess on a free loopback port), warms it up, then sends ``--requests``
requests from ``--clients`` threads: whole and streamed chats, completions,
bad requests (400s), streams the client drops after the first chunk, and
unauthorised calls (401). Meanwhile ``/health`` is polled. (``/health``
while one heavy request runs alone: ``bench/health_latency.py``.)

Reports: requests, unexpected answers, request latency p50/p95, ``/health``
p50/p99 under the mixed load, the server's RSS and open files before and
after the soak, and RSS growth per 10,000 requests. Targets: no unexpected
answer; RSS growth < 10 MB per 10k requests; open files back where they were.
Exit status 1 on ``FAIL``. Bounded: a fixed number of requests, a time
limit per request; the server is stopped at the end.

    python bench/soak.py                    # 3,000 requests: about 3 minutes on 2 shared cores
    python bench/soak.py --requests 10000   # the 10k figure directly
"""

import argparse
import concurrent.futures
import os
import random
import signal
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Tuple

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from modelscope_llama2.serving.process import start_serve  # noqa: E402
KEY = "sk-soak"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = ["Where is the capital of Zhejiang?", "What are the interesting places there?", "Hello there",
             "What is West Lake?", "Who are you?"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def kinds(url: str) -> List[Tuple[str, Callable[[httpx.Client, int], bool]]]:
    """(name, send) pairs; ``send`` returns whether the answer was the expected one."""
    def chat(client, i):
        reply = client.post(url + "/v1/chat/completions", headers=AUTH, json={
            "model": "demo", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": 16, "temperature": 0})
        return reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("stop", "length")

    def stream(client, i):
        with client.stream("POST", url + "/v1/chat/completions", headers=AUTH, json={
                "model": "demo", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": 16, "temperature": 0.7, "seed": i, "stream": True}) as reply:
            lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
        return reply.status_code == 200 and lines[-1] == "data: [DONE]"

    def completion(client, i):
        reply = client.post(url + "/v1/completions", headers=AUTH, json={
            "model": "demo", "prompt": QUESTIONS[i % len(QUESTIONS)], "max_tokens": 8, "temperature": 0,
            "stop": ["\n"]})
        return reply.status_code == 200

    def bad(client, i):
        content = '"x\\ud800"' if i % 2 else '"ok"'  # a lone surrogate, or an out-of-range temperature
        reply = client.post(url + "/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                            content='{"model": "demo", "messages": [{"role": "user", "content": %s}], '
                                    '"temperature": %d}' % (content, 1 if i % 2 else 5))
        return reply.status_code == 400

    def dropped(client, i):
        with client.stream("POST", url + "/v1/chat/completions", headers=AUTH, json={
                "model": "demo", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": 64, "stream": True, "temperature": 0}) as reply:
            next(reply.iter_lines())  # then the client goes away
        return reply.status_code == 200

    def unauthorised(client, i):
        return client.get(url + "/v1/models").status_code == 401

    return [("chat", chat), ("stream", stream), ("completion", completion), ("bad", bad), ("dropped", dropped),
            ("unauthorised", unauthorised)]


def poll_health(url: str, stop: threading.Event, out: List[float]) -> None:
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get(url + "/health")
            out.append(time.perf_counter() - started)
            time.sleep(0.01)


def mixed(url: str, count: int, clients: int, seed: int) -> Tuple[Dict[str, int], List[float], List[str]]:
    rng = random.Random(seed)
    plan = [rng.choice(kinds(url)) for _ in range(count)]
    local = threading.local()
    latencies: List[float] = []
    unexpected: List[str] = []
    sent: Dict[str, int] = {}

    def one(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        name, send = plan[i]
        started = time.perf_counter()
        try:
            ok = send(local.client, i)
        except httpx.HTTPError as error:
            ok, name = False, f"{name}: {type(error).__name__}"
        latencies.append(time.perf_counter() - started)
        sent[plan[i][0]] = sent.get(plan[i][0], 0) + 1
        if not ok:
            unexpected.append(name)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(count)))
    return sent, latencies, unexpected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    server, _, url = start_serve(["--served-model-name", "demo", "--api-key", KEY, "--max-waiting", "256"],
                                 env={**os.environ, "PYTHONPATH": REPO_ROOT})
    try:
        mixed(url, args.warmup, args.clients, seed=0)  # allocator, caches and threads settle first
        rss_before, files_before = rss_mb(server.pid), open_files(server.pid)
        stop, health = threading.Event(), []
        poller = threading.Thread(target=poll_health, args=(url, stop, health))
        poller.start()
        started = time.perf_counter()
        try:
            sent, latencies, unexpected = mixed(url, args.requests, args.clients, seed=1)
        finally:
            stop.set()
            poller.join()
        elapsed = time.perf_counter() - started
        time.sleep(1)  # connections close
        rss_after, files_after = rss_mb(server.pid), open_files(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    growth = (rss_after - rss_before) / args.requests * 10_000
    print(f"requests: {args.requests} in {elapsed:.0f} s from {args.clients} clients, by kind: {sent}")
    print(f"unexpected answers: {len(unexpected)} {sorted(set(unexpected))[:5]}")
    print(f"request latency: p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms")
    print(f"/health under the mix: p50 {statistics.median(health) * 1000:.1f} ms, "
          f"p99 {percentile(health, 0.99) * 1000:.1f} ms ({len(health)} polls)")
    print(f"server RSS: {rss_before:.1f} -> {rss_after:.1f} MB; open files: {files_before} -> {files_after}")
    print(f"RSS growth per 10k requests: {growth:.1f} MB (target < 10)")
    passed = not unexpected and growth < 10 and files_after <= files_before + 2
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
