"""The OpenAI server on Ray Serve, two replicas on a simulated two-node cluster, driven by the ``openai`` SDK.

The tiny random checkpoint gives long, arbitrary greedy answers: any
difference from the single-process server (a token, an ordering, text from
another request) shows. Which replica answered is read from the app's own
``/metrics`` (requests by replica id and rank).
"""

import concurrent.futures
import threading

import httpx
import openai
import pytest

from modelscope_llama2.serving.server import build_app
from tests.helpers import engine_processes, process_runs, running_server
from tests.ray.conftest import MODEL, metric_value, replica_requests, scaled_app, wait_for

pytestmark = pytest.mark.ray

APP = "scaled"
GREEDY = {"temperature": 0}
SYSTEM = ("You are a helpful assistant. Always answer as helpfully as possible, while being safe. "
          "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
          "or illegal content. Please ensure that your responses are socially unbiased and positive in nature. ")
QUESTIONS = [
    "Where is the capital of Zhejiang?", "What are the interesting places there?", "Hello there",
    "The quick brown fox jumps over the lazy dog.", "Numbers: 0123456789", "Tabs and double spaces",
    "West Lake, Lingyin Temple and the Grand Canal.", "Pack my box with five dozen liquor jugs.",
]
FOLLOW_UPS = ["And then?", "Why is that?"]


@pytest.fixture(scope="module")
def scaled_url(serve_url, tiny_dir):
    from ray import serve

    serve.run(scaled_app(tiny_dir), name=APP, route_prefix="/")
    yield serve_url
    serve.delete(APP)


@pytest.fixture(scope="module")
def scaled(scaled_url):
    return openai.OpenAI(base_url=scaled_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_dir):
    """The single-process server (``serve`` without ``--replicas``) on the same checkpoint."""
    import torch

    # Ray gives a replica of under 2 CPUs one intra-op thread; the same reduction order here keeps
    # the random weights' near-ties breaking the same way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with running_server(build_app(tiny_dir, MODEL)) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        torch.set_num_threads(threads)


def opening(question):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def answer(client, messages, **options):
    """``(text, finish reason, usage)`` of a greedy chat completion."""
    reply = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY, **options)
    return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage


def same_answer(client, messages, **options):
    """What must not depend on where it ran: text, finish reason, token counts (not the cache hits)."""
    text, finish_reason, usage = answer(client, messages, **options)
    return text, finish_reason, usage.prompt_tokens, usage.completion_tokens


def streamed(client, messages, **options):
    chunks = client.chat.completions.create(model=MODEL, messages=messages, stream=True, **GREEDY, **options)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def metrics(url):
    return httpx.get(url + "/metrics", timeout=30).text


def served_by(before, after):
    """The one (replica, rank) whose finished-request count rose between two ``/metrics`` reads."""
    before, after = replica_requests(before), replica_requests(after)
    rose = [key for key, count in after.items() if count > before.get(key, 0)]
    assert len(rose) == 1, f"expected one replica to answer, saw {rose}"
    return rose[0]


def test_answers_equal_the_single_process_server(scaled, local):
    for question in QUESTIONS[:3]:
        messages = opening(question)
        assert same_answer(scaled, messages, max_tokens=40) == same_answer(local, messages, max_tokens=40)
        assert streamed(scaled, messages, max_tokens=40) == streamed(local, messages, max_tokens=40)
    completion = {"model": MODEL, "prompt": "The capital of Zhejiang is", "max_tokens": 24, "temperature": 0}
    assert scaled.completions.create(**completion).choices[0].text == \
        local.completions.create(**completion).choices[0].text
    # Bad input is refused by the ingress with the same OpenAI error, before any replica works.
    for bad in ({"max_tokens": 0}, {"messages": [{"role": "assistant", "content": "Hi"}]}):
        body = {"model": MODEL, "messages": opening("Hi"), **bad}
        errors = []
        for client in (scaled, local):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(**body)
            errors.append((caught.value.status_code, caught.value.body.get("param")))
        assert errors[0] == errors[1]


def test_logprobs_through_a_replica_equal_the_single_process_server(scaled, local):
    # The logprobs ride on the replica's deltas through Ray (tests/test_serve_logprobs.py checks the local
    # server's against a plain forward).
    messages = opening(QUESTIONS[1])

    def chat(client, stream):
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, logprobs=True,
                                               top_logprobs=3, stream=stream, **GREEDY)
        choices = [c.choices[0] for c in reply if c.choices] if stream else reply.choices
        return [item for choice in choices if choice.logprobs for item in choice.logprobs.content]

    def scored(client):
        choice = client.completions.create(model=MODEL, prompt="The capital of Zhejiang is", max_tokens=4, echo=True,
                                           logprobs=2, **GREEDY).choices[0]
        return choice.logprobs

    for stream in (False, True):
        remote, here = chat(scaled, stream), chat(local, stream)
        assert len(here) == 12
        assert [(c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in remote] == \
            [(c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in here]
        assert [x for c in remote for x in (c.logprob, *(t.logprob for t in c.top_logprobs))] == pytest.approx(
            [x for c in here for x in (c.logprob, *(t.logprob for t in c.top_logprobs))], abs=1e-4)
    remote, here = scored(scaled), scored(local)
    assert (remote.tokens, remote.text_offset) == (here.tokens, here.text_offset)
    assert remote.token_logprobs[0] is None and remote.token_logprobs[1:] == pytest.approx(here.token_logprobs[1:],
                                                                                           abs=1e-4)
    assert [sorted(top) for top in remote.top_logprobs[1:]] == [sorted(top) for top in here.top_logprobs[1:]]


@pytest.fixture(scope="module")
def ahead_of(tiny_dir):
    """How many ids the next prompt has after this one's once ``answer`` is its reply (through the next ``[INST]``)."""
    from modelscope_llama2 import Llama2Tokenizer
    from modelscope_llama2.serving.affinity import next_turn_ids

    tokenizer = Llama2Tokenizer.from_pretrained(tiny_dir)
    return lambda answer: len(next_turn_ids(answer, tokenizer.sp_model.encode, 1, 2))


def test_every_turn_of_a_conversation_lands_on_its_replica(scaled, scaled_url, ahead_of):
    conversations = [opening(question) for question in QUESTIONS[:6]]
    replicas = [set() for _ in conversations]
    previous_prompt = [0] * len(conversations)
    previous_answer = [""] * len(conversations)
    # Turn by turn across conversations, so each replica's cache holds several at once.
    for turn in range(1 + len(FOLLOW_UPS)):
        for i, messages in enumerate(conversations):
            before = metrics(scaled_url)
            text, _, usage = answer(scaled, messages, max_tokens=16)
            replica, _ = served_by(before, metrics(scaled_url))
            replicas[i].add(replica)
            cached = usage.prompt_tokens_details.cached_tokens
            if turn:
                # From this replica's cache: the whole previous prompt, its answer as this prompt re-encodes it
                # and the new round's start (prefilled once the answer was sent); the new question is not.
                assert cached == previous_prompt[i] + ahead_of(previous_answer[i]) < usage.prompt_tokens
            previous_prompt[i], previous_answer[i] = usage.prompt_tokens, text
            if turn < len(FOLLOW_UPS):
                messages += [{"role": "assistant", "content": text}, {"role": "user", "content": FOLLOW_UPS[turn]}]
    assert all(len(used) == 1 for used in replicas)
    # One long shared system prompt, yet the conversations spread over both replicas.
    assert len(set.union(*replicas)) == 2
    text = metrics(scaled_url)
    assert metric_value(text, "modelscope_llama2_replica_prefix_cache_hits") >= len(conversations) * len(FOLLOW_UPS)


def test_killing_a_replica_under_load_loses_no_request(scaled, local, scaled_url):
    import ray
    from ray import serve

    conversations = [opening(question) for question in QUESTIONS]
    expected = [streamed(local, messages, max_tokens=200) for messages in conversations]
    # Each conversation starts alone (on the idle replica holding fewer conversations) and stays there.
    homes = [placed(scaled, scaled_url, messages) for messages in conversations]
    on_victim = [m for m, home in zip(conversations, homes) if home == homes[0]]
    assert len(on_victim) >= 3, "conversations should start on both replicas, several on each"
    victim_id, victim_rank = homes[0]
    victim = actor_of(victim_id)
    retries_before = metric_value(metrics(scaled_url), "modelscope_llama2_replica_retries")

    # The kill comes while the first of the victim's conversations to run is streaming: the others are still
    # waiting inside the replica (one generates at a time), however fast that one got its turn.
    first_on_victim_streaming = threading.Event()

    def ask(messages):
        pieces = []
        try:
            chunks = scaled.chat.completions.create(model=MODEL, messages=messages, stream=True, max_tokens=200,
                                                    **GREEDY)
            for chunk in chunks:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                if any(messages is m for m in on_victim) and len(pieces) >= 5:
                    first_on_victim_streaming.set()
        except openai.APIError as error:  # the stream cut by the death: an OpenAI error event
            return error
        return "".join(pieces)

    # The replica runs its engine in a child process, which dies with it.
    engine_pid = engine_process_of(victim)
    with concurrent.futures.ThreadPoolExecutor(len(conversations)) as pool:
        futures = [pool.submit(ask, messages) for messages in conversations]
        assert first_on_victim_streaming.wait(120), "the victim never started streaming"
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [future.result(timeout=180) for future in futures]
    wait_for(lambda: not process_runs(engine_pid), 30, "the dead replica's engine process to exit")

    errors = [r for r in results if isinstance(r, openai.APIError)]
    # Every request gets its exact answer, or (only the one generating on the dead replica) a clean error.
    assert all(r == e for r, e in zip(results, expected) if not isinstance(r, openai.APIError))
    assert len(errors) <= 1 and all("Traceback" not in str(e) for e in errors)
    # The ones waiting on the dead replica were sent to the other one and got their answers.
    assert metric_value(metrics(scaled_url), "modelscope_llama2_replica_retries") > retries_before

    def healthy():
        deployment = serve.status().applications[APP].deployments["Llama2Replica"]
        return deployment.replica_states.get("RUNNING", 0) == 2

    wait_for(healthy, 60, "two healthy replicas again")
    # The replacement took the dead replica's rank and holds no conversation: a new one starts on it.
    fresh = opening(f"{QUESTIONS[0]} Once more.")
    expected_fresh = streamed(local, fresh, max_tokens=200)
    before = metrics(scaled_url)
    assert streamed(scaled, fresh, max_tokens=200) == expected_fresh
    replica, rank = served_by(before, metrics(scaled_url))
    assert rank == victim_rank and replica != victim_id


def placed(client, url, messages):
    """``(replica id, rank)`` of the replica that answers ``messages`` (a one-token answer)."""
    before = metrics(url)
    answer(client, messages, max_tokens=1)
    return served_by(before, metrics(url))


def actor_of(replica_id):
    """The Ray actor name of the replica ``replica_id``."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + replica_id)]
    assert len(names) == 1
    return names[0]


def engine_process_of(actor_name):
    """The pid of the one engine process of the replica actor ``actor_name``."""
    import os

    import ray

    replica_pid = ray.get(ray.get_actor(actor_name, namespace="serve").__ray_call__.remote(lambda _: os.getpid()))
    engines = engine_processes(replica_pid)
    assert len(engines) == 1, f"replica {actor_name} (pid {replica_pid}) should have one engine process: {engines}"
    return engines[0]


def test_a_whole_answer_whose_replica_dies_mid_generation_is_retried(scaled, local, scaled_url):
    # Issue 19, finding 10: a non-streamed request got 503 though nothing had reached its client.
    import ray

    long = [m for m in (opening(q + " Tell me more.") for q in QUESTIONS)
            if answer(local, m, max_tokens=2000)[1] == "length"]
    probe, *others = long
    home = placed(scaled, scaled_url, probe)
    # Another conversation that runs to max_tokens, started on the same replica.
    whole = next((m for m in others if placed(scaled, scaled_url, m) == home), None)
    assert whole is not None, "two conversations that run to max_tokens should start on one replica"
    expected = answer(local, whole, max_tokens=2000)[0]
    victim = actor_of(home[0])
    retries_before = metric_value(metrics(scaled_url), "modelscope_llama2_replica_retries")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        chunks = scaled.chat.completions.create(model=MODEL, messages=probe, stream=True, max_tokens=2000, **GREEDY)
        result = None
        for pieces, chunk in enumerate(chunks):  # the victim generating the probe...
            if pieces == 5:
                result = pool.submit(answer, scaled, whole, max_tokens=2000)  # ...and then the whole answer too
            if pieces == 40:
                break
        assert not result.done(), "the whole answer should still be generating"
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        text, finish_reason, _ = result.result(timeout=300)
    assert (text, finish_reason) == (expected, "length")
    assert metric_value(metrics(scaled_url), "modelscope_llama2_replica_retries") > retries_before

