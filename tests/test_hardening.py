"""Issue 19's findings, each as a regression test: hostile input, slow clients, overload, failures, shutdown.

Servers are real uvicorn processes or threads on 127.0.0.1 (a free port);
every test is bounded in requests and time.
"""

import asyncio
import threading
import time
from dataclasses import replace

import pytest
from transformers import AutoModelForCausalLM

from modelscope_llama2.engines.transformers_engine import TransformersEngine
from modelscope_llama2.prompts.prompt import Prompt, SamplingParams
from modelscope_llama2.serving.backend import LocalBackend


def test_an_engine_that_fails_on_the_call_fails_the_stream(tiny_dir, tokenizer):
    # Finding 12: generate() was called outside the worker's try; its error went to a future nobody read
    # and the request waited for ever, holding its slot.
    backend = LocalBackend(TransformersEngine(AutoModelForCausalLM.from_pretrained(tiny_dir)), tokenizer)
    bad = Prompt((1, 10**6), SamplingParams(max_new_tokens=4))

    async def consume():
        return [delta async for delta in backend.stream(bad)]

    with pytest.raises(ValueError, match=r"prompts\[0\]\.token_ids"):
        asyncio.run(asyncio.wait_for(consume(), 30))



def test_a_queued_sampled_request_can_be_aborted_and_close_ends_every_consumer(tiny_dir, tokenizer):
    # Findings 11 and 14: a sampled request waiting for the engine could not be aborted (it then ran in
    # full for nobody); close() left generate() consumers waiting for ever.
    from modelscope_llama2.engines.batching import BatchingEngine

    engine = BatchingEngine(AutoModelForCausalLM.from_pretrained(tiny_dir), max_batch_size=1, max_model_len=1024)
    try:
        running = Prompt(tuple(tokenizer.encode("Tabs and spaces", bos=True)),
                         SamplingParams(max_new_tokens=900, options={"do_sample": False}, ignore_eos=True))
        queued = Prompt(tuple(tokenizer.encode("Hello", bos=True)),
                        SamplingParams(max_new_tokens=50, seed=3, options={"do_sample": True}))
        events = engine.generate([running, queued])
        next(events)  # the first holds the only slot; the sampled one waits
        engine.abort(queued.request_id)
        first_final = next(e for e in events if e.finished)
        assert (first_final.request_id, first_final.finish_reason, first_final.usage.completion_tokens) == (
            queued.request_id, "abort", 0)
        threading.Timer(0.2, engine.close).start()
        rest = list(events)  # ends: close() finishes what still runs
        assert rest[-1].request_id == running.request_id and rest[-1].finish_reason == "abort"
        with pytest.raises(RuntimeError, match="closed"):
            engine.submit(queued, lambda event: None)
    finally:
        engine.close()

def test_a_refused_request_in_a_batch_leaves_nothing_behind(tiny_dir, tokenizer):
    # Finding 14: when adding a request failed, what was registered for the request before it leaked.
    from modelscope_llama2.engines.batching import BatchingEngine

    engine = BatchingEngine(AutoModelForCausalLM.from_pretrained(tiny_dir), max_batch_size=2, max_model_len=4096)
    try:
        good = Prompt(tuple(tokenizer.encode("Hello", bos=True)),
                      SamplingParams(max_new_tokens=4000, options={"do_sample": False}, ignore_eos=True))
        bad = Prompt((1, 10**6), SamplingParams(max_new_tokens=4))
        with pytest.raises(ValueError, match="token_ids"):
            engine.generate([good, bad])
        deadline = time.monotonic() + 3  # let go before the next step, not after 4,000 tokens
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0
        again = list(engine.generate([replace(good, sampling=SamplingParams(max_new_tokens=3, ignore_eos=True))]))
        assert again[-1].finish_reason == "length" and again[-1].usage.completion_tokens == 3  # its id is free
    finally:
        engine.close()


def test_a_consumer_that_falls_behind_holds_one_merged_event(tiny_dir, tokenizer):
    # Finding 14: events queued up a step at a time for a consumer that did not keep up (no backpressure).
    from modelscope_llama2.engines.batching import BatchingEngine
    from modelscope_llama2.prompts.prompt import new_request_id

    engine = BatchingEngine(AutoModelForCausalLM.from_pretrained(tiny_dir), max_batch_size=1, max_model_len=512)
    try:
        prompt = Prompt(tuple(tokenizer.encode("Hello", bos=True)),
                        SamplingParams(max_new_tokens=60, options={"do_sample": False}, ignore_eos=True))
        kept_up = []
        engine.submit(prompt, kept_up.append)  # every event as the engine hands it out, one per step
        events = engine.generate([replace(prompt, request_id=new_request_id())])
        deadline = time.monotonic() + 30
        while engine.running and time.monotonic() < deadline:  # generated in full while nobody reads
            time.sleep(0.01)
        fell_behind = list(events)
        assert len(kept_up) == 60 and len(fell_behind) == 1
        assert fell_behind[0].token_ids == tuple(t for e in kept_up for t in e.token_ids)
        assert (fell_behind[0].finish_reason, fell_behind[0].usage.completion_tokens) == ("length", 60)
    finally:
        engine.close()


# -- against a real server on 127.0.0.1 ------------------------------------------------

import json
import os
import re
import signal
import socket
import subprocess

import httpx

from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.serving.process import start_serve
from modelscope_llama2.serving.server import build_app
from tests.helpers import assert_drained, engine_processes, running_server, signal_with_streams_in_flight

KEY = "sk-hardening"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_dir):
    app = build_app(tiny_dir, "tiny", api_key=KEY, max_running=2, max_waiting=4)
    with running_server(app) as url:
        yield url, app


def metric(url, status):
    text = httpx.get(url + "/metrics", headers=AUTH).text
    found = re.search(rf'modelscope_llama2_requests_total{{status="{status}"}} ([0-9.]+)', text)
    return float(found.group(1)) if found else 0.0


def health_latencies(url, stop, out):
    with httpx.Client() as client:
        while not stop.is_set():
            started = time.perf_counter()
            assert client.get(url + "/health").status_code == 200
            out.append(time.perf_counter() - started)
            time.sleep(0.02)


def test_long_stop_strings_do_not_freeze_the_server(server):
    # Finding 1: four 200 KB stop strings froze /health for up to 56 s.
    url, _ = server
    stops = [f"{i}" + "z" * 200_000 for i in range(4)]
    stop, latencies = threading.Event(), []
    poller = threading.Thread(target=health_latencies, args=(url, stop, latencies))
    poller.start()
    try:
        reply = httpx.post(url + "/v1/completions", headers=AUTH, timeout=120, json={
            "model": "tiny", "prompt": "Hello", "max_tokens": 200, "temperature": 0, "stop": stops})
    finally:
        stop.set()
        poller.join()
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length"
    # The server went on answering (it froze for 56 s); bench/health_latency.py measures the p99, as a bound
    # here would measure the CI machine's load.
    assert len(latencies) >= 3 and max(latencies) < 10, latencies
    # At most 16 stop strings; none empty.
    for stops, message in [(list("abcdefghijklmnopq"), "stop: at most 16 stop sequences"),
                           (["a", ""], "stop: stop strings must not be empty")]:
        refused = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60, json={
            "model": "tiny", "prompt": "Hello", "stop": stops})
        assert refused.status_code == 400 and refused.json()["error"] == {
            "message": message, "type": "invalid_request_error", "param": "stop", "code": None}


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "x\\ud800y"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "system", "content": "\\udfff"}, '
                             '{"role": "user", "content": "hi"}]}', "messages[0].content"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "a\\ud800"]}', "prompt[1]"),
    ("/v1/completions", '{"model": "x\\ud800", "prompt": "ok"}', "model"),
    ("/v1/completions", '{"model": "tiny", "prompt": "ok", "stop": ["\\udc00"]}', "stop[0]"),
])
def test_text_that_cannot_be_encoded_is_a_400_naming_the_field(server, path, body, field):
    # Finding 2: lone surrogates gave 500s and a reset keep-alive connection.
    url, _ = server
    with httpx.Client(headers={**AUTH, "Content-Type": "application/json"}, timeout=60) as client:
        reply = client.post(url + path, content=body)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == field and "surrogate" in reply.json()["error"]["message"]
        # The same keep-alive connection goes on serving: a real pair of surrogates is an emoji, fine.
        ok = client.post(url + "/v1/completions", content='{"model": "tiny", "prompt": "\\ud83d\\ude00", '
                                                           '"max_tokens": 2, "temperature": 0}')
        assert ok.status_code == 200, ok.text


def test_degenerate_sampling_is_greedy_or_refused(server):
    # Finding 3: temperature 1e-40 and seed 2**64 gave 200 with empty text and finish_reason 'abort'.
    url, _ = server
    ask = {"model": "tiny", "prompt": "Hello", "max_tokens": 8}
    greedy = httpx.post(url + "/v1/completions", headers=AUTH, json={**ask, "temperature": 0}, timeout=60).json()
    tiny_t = httpx.post(url + "/v1/completions", headers=AUTH, json={**ask, "temperature": 1e-40}, timeout=60).json()
    assert tiny_t["choices"][0]["text"] == greedy["choices"][0]["text"] != ""
    assert tiny_t["choices"][0]["finish_reason"] in ("stop", "length")
    for seed in (2**64, 2**63, -1):
        reply = httpx.post(url + "/v1/completions", headers=AUTH, json={**ask, "seed": seed}, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "seed", reply.text


def test_a_burst_is_held_to_the_waiting_line_and_429_says_when_to_retry(server):
    # Findings 4 and 13: 7-8 of 40 streams released together were accepted against a bound of 6 (2 + 4).
    url, app = server
    admission = app.app.state.admission
    barrier, statuses, retry_after = threading.Barrier(40), [], []
    peak, watching = {"running": 0, "waiting": 0, "held": 0}, threading.Event()

    def watch():  # the line as the server sees it, sampled all along
        while not watching.is_set():
            peak["running"] = max(peak["running"], admission.running)
            peak["waiting"] = max(peak["waiting"], admission.waiting)
            peak["held"] = max(peak["held"], admission.running + admission.waiting)
            time.sleep(0.0005)

    def one(i):
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            with client.stream("POST", url + "/v1/completions", headers=AUTH, json={
                    "model": "tiny", "prompt": f"burst {i}", "max_tokens": 200, "temperature": 1.0,
                    "stream": True}) as reply:
                statuses.append(reply.status_code)
                if reply.status_code == 429:
                    retry_after.append(reply.headers.get("retry-after"))
                reply.read()

    before = metric(url, 429)
    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    watching.set()
    watcher.join()
    assert len(statuses) == 40 and set(statuses) == {200, 429}, statuses
    # Places are taken on arrival: a choice is "waiting" from then until it holds a running slot, so at
    # the instant of the burst all 6 admitted may still count as waiting; the bound is on what is held.
    assert peak["running"] <= 2 and peak["held"] <= 6, peak
    assert statuses.count(200) >= 6, statuses
    assert retry_after and all(value == "1" for value in retry_after)
    assert metric(url, 429) - before == statuses.count(429)
    assert admission.running == admission.waiting == 0


def test_every_refusal_is_counted_and_two_keys_are_refused(server):
    # Findings 7 and 8: 401 and 413 were not in requests_total; two Authorization headers -> the last won.
    url, _ = server
    before = {status: metric(url, status) for status in (400, 401, 413)}
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.post(url + "/v1/completions", headers=AUTH, content=b"x" * (2 << 20)).status_code == 413
    two = httpx.get(url + "/v1/models", headers=[("Authorization", "Bearer wrong"), ("Authorization", AUTH[
        "Authorization"])])
    assert two.status_code == 400 and two.json()["error"]["param"] == "authorization"
    assert {status: metric(url, status) - before[status] for status in before} == {400: 1, 401: 1, 413: 1}


def test_huge_requests_name_the_right_field_and_leave_the_loop_free(server):
    # Finding 9: 30,001 messages froze the loop for 1.6 s; 50,000 prompts got a 400 naming `n`.
    url, _ = server
    reply = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": ["a"] * 50_000},
                       timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", reply.text
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(30_001)]
    stop, latencies = threading.Event(), []
    poller = threading.Thread(target=health_latencies, args=(url, stop, latencies))
    poller.start()
    try:
        body = {"model": "tiny", "messages": messages, "truncation": "auto", "max_tokens": 4, "temperature": 0}
        reply = httpx.post(url + "/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                           timeout=120, content=json.dumps(body, separators=(",", ":")))
    finally:
        stop.set()
        poller.join()
    assert reply.status_code == 200, reply.text
    assert latencies and max(latencies) < 10, latencies  # answering all along; the p99: bench/health_latency.py


def test_an_engine_failure_is_a_500_or_an_error_event_and_counted(tiny_dir):
    # Finding 3: an engine failure answered 200 with finish_reason 'abort', counted as a 200.
    app = build_app(tiny_dir, "tiny", max_running=2, engine_process=False)  # its model patched below
    head = app.app.state.backend.engine.model.get_output_embeddings()  # the engine's every step ends in it

    def broken_forward(*args, **kwargs):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    with running_server(app) as url:
        head.forward = broken_forward  # a fault inside the real engine's step
        ask = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
        whole = httpx.post(url + "/v1/completions", json=ask, timeout=60)
        assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
        streamed = httpx.post(url + "/v1/completions", json={**ask, "stream": True}, timeout=60)
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        assert metric(url, 500) == 2 and metric(url, 200) == 0


def test_a_responses_stream_that_fails_midway_ends_with_response_failed(tiny_dir):
    # The Responses API's stream ends a failure with its own event, `response.failed` (the response, status
    # "failed", its error), not chat's error body, which the openai SDK raises as an APIError instead.
    import openai
    from openai.types.responses import ResponseFailedEvent

    app = build_app(tiny_dir, "tiny", max_running=2, engine_process=False)  # its model patched below
    head = app.app.state.backend.engine.model.get_output_embeddings()  # the engine's every step ends in it
    working, calls = head.forward, []

    def failing_after_three_steps(*args, **kwargs):  # a fault inside the real engine's step, mid-answer
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return working(*args, **kwargs)

    with running_server(app) as url:
        head.forward = failing_after_three_steps
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        events = list(client.responses.create(model="tiny", input="Tell me a long story.", temperature=0,
                                              max_output_tokens=50, stream=True))
        kinds = [event.type for event in events]
        assert kinds[:2] == ["response.created", "response.in_progress"] and "response.output_text.delta" in kinds
        failed = events[-1]
        assert isinstance(failed, ResponseFailedEvent) and kinds.count("response.failed") == 1, kinds
        assert failed.sequence_number == len(events) - 1
        assert (failed.response.id, failed.response.status) == (events[0].response.id, "failed")
        assert failed.response.error.code == "server_error"
        assert failed.response.error.message == "The server failed while generating."
        assert metric(url, 500) == 1 and metric(url, 200) == 0
        head.forward = working  # the server goes on serving
        assert client.responses.create(model="tiny", input="Hi", temperature=0, max_output_tokens=2).status in (
            "completed", "incomplete")


@pytest.fixture
def serve_process(tiny_dir):
    """``python -m modelscope_llama2 serve`` on the tiny checkpoint, short timeouts and a 2 s drain."""
    process, port, url = start_serve(
        ["--model", tiny_dir, "--header-timeout", "1", "--body-timeout", "1", "--keep-alive", "1",
         "--drain-timeout", "2", "--max-running", "4", "--served-model-name", "tiny"],
        env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout_s=120, stderr=subprocess.PIPE)
    try:
        yield url, port, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def closed_within(sock, seconds):
    """Whether the server closes ``sock`` within ``seconds`` (what it sent before that is ignored)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except socket.timeout:
        return False


def read_until_closed(sock, seconds):
    """Everything the server sends on ``sock`` until it closes it (or ``seconds`` of silence)."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except socket.timeout:
        pass
    return received


def test_idle_slow_and_stalled_connections_are_closed(serve_process):
    # Finding 6: a short body, 200 idle connections and 20 slowloris requests stayed open > 65 s.
    _, port, _ = serve_process
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    slowloris = socket.create_connection(("127.0.0.1", port))
    slowloris.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the headers never end
    short = socket.create_connection(("127.0.0.1", port))
    short.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\": ")  # 90 bytes short
    assert closed_within(slowloris, 15) and all(closed_within(sock, 15) for sock in idle)
    answer = read_until_closed(short, 15)  # the status line and the body may come in separate reads
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    for sock in [*idle, slowloris, short]:
        sock.close()


def test_sigterm_drains_every_stream_to_done_and_exits_cleanly(serve_process):
    # Finding 5: streams stopped with no error event and no [DONE]; the process exited 31-35 s later.
    url, _, process = serve_process
    bodies, code, exited = signal_with_streams_in_flight(url, process, signal.SIGTERM, timeout=60)
    assert exited < 2 + 5, "not within the drain timeout + 5 s"
    assert code in (0, -signal.SIGTERM), process.stderr.read()[-2000:]
    assert_drained(bodies)


@pytest.mark.parametrize("size", [10, 200_000])  # FastAPI's path, and the one validating off the loop
def test_large_bodies_are_validated_like_small_ones(server, size):
    url, _ = server
    text = "a " * (size // 2)
    bad = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": text, "n": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n", bad.text
    extra = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": text, "bogus": 1})
    assert extra.status_code == 400 and extra.json()["error"]["message"] == \
        "Unrecognized request argument supplied: bogus", extra.text
    broken = httpx.post(url + "/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                        content=b'{"model": "tiny", "prompt": "' + text.encode() + b'"')
    assert broken.status_code == 400 and broken.json()["error"]["message"] == "The request body is not valid JSON."
    ok = httpx.post(url + "/v1/completions", headers=AUTH, timeout=120, json={
        "model": "tiny", "prompt": text[:2000], "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length", ok.text


@pytest.mark.parametrize("count", [3, 3_001])  # FastAPI's own validation, and the one in pieces off the loop
def test_long_message_lists_are_validated_like_short_ones(server, count):
    # Finding 9: a long list of messages is validated in a worker thread, 256 at a time; its errors name
    # the same field as FastAPI's, at the right index.
    url, _ = server
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(count - 1)]
    last = count - 1
    for broken, message in [({"content": "x"}, f"messages.{last}.role: Field required"),
                            ({"role": "user", "content": "x", "bogus": 1},
                             f"Unrecognized request argument supplied: messages.{last}.bogus")]:
        reply = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=60,
                           json={"model": "tiny", "messages": [*history, broken]})
        assert reply.status_code == 400 and reply.json()["error"]["message"] == message, reply.text
        assert reply.json()["error"]["param"] == message.split(": ")[-1 if "bogus" in message else 0]
    ok = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": "tiny", "messages": [*history, {"role": "user", "content": "Hello"}], "truncation": "auto",
        "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length", ok.text


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_either_http_parser_closes_connections_whose_headers_stall_and_serves_the_rest(parser):
    # serve picks httptools where it is installed and h11 otherwise: the header deadline holds on both.
    import uvicorn

    from modelscope_llama2.serving.process import free_port
    from modelscope_llama2.serving.server import header_deadline_http

    async def hello(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    protocol = header_deadline_http(1, parser)
    assert any(base.__module__ == f"uvicorn.protocols.http.{parser}_impl" for base in protocol.__mro__)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(hello, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           http=protocol, timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        kept = socket.create_connection(("127.0.0.1", port))
        kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        answer = read_until_closed(kept, 10)  # answered, then idle: closed at the header deadline, not in 30 s
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nok"), answer
        assert closed_within(stalled, 10)
        assert time.monotonic() - started < 5
        for sock in (stalled, kept):
            sock.close()
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_dead_engine_process_fails_its_streams_and_health_says_so(serve_process):
    # serve's engine runs in a child process: if it dies (OOM killer, a segfault), requests must not hang.
    url, _, process = serve_process
    engines = engine_processes(process.pid)
    assert len(engines) == 1, engines
    ask = {"model": "tiny", "prompt": "Hello", "max_tokens": 4000, "temperature": 0, "ignore_eos": True,
           "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=ask, timeout=60) as streamed:
        lines = streamed.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith('data: {"id"')
        os.kill(engines[0], signal.SIGKILL)
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
    health = httpx.get(url + "/health", timeout=30)
    assert (health.status_code, health.json()) == (503, {"status": "engine stopped"})
    refused = httpx.post(url + "/v1/completions", json={**ask, "stream": False}, timeout=30)
    assert refused.status_code == 503 and "engine has stopped" in refused.json()["error"]["message"]
