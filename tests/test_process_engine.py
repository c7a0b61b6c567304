"""The engine in a child process (engines/process.py): the same tokens as in this one, checks before any
model work, and a child that dies, is closed, is signalled or outlives its parent."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.engines.factory import load_engine
from modelscope_llama2.engines.process import ProcessEngine
from modelscope_llama2.prompts.prompt import Prompt, SamplingParams, StructuredOutput
from tests.helpers import engine_processes, process_runs


def sampled(seed, max_new_tokens=12):
    return Prompt(token_ids=(1, 7, 30, 41, 3, 4, 5), sampling=SamplingParams(
        max_new_tokens=max_new_tokens, seed=seed, ignore_eos=True,
        options={"do_sample": True, "temperature": 0.8, "top_p": 0.95}))


def tokens_by_request(events):
    out = {}
    for event in events:
        out.setdefault(event.request_id, []).extend(event.token_ids)
    return out


@pytest.fixture(scope="module")
def engine():
    engine = ProcessEngine(load_engine, DEMO_DIR, max_batch_size=4)
    yield engine
    engine.close()


def test_seeded_requests_give_the_same_tokens_as_the_engine_in_this_process(engine):
    prompts = [sampled(seed) for seed in (1, 2, 3)]
    across = tokens_by_request(engine.generate(prompts))
    here = load_engine(DEMO_DIR, max_batch_size=4)
    try:
        local = tokens_by_request(here.generate([sampled(seed) for seed in (1, 2, 3)]))
    finally:
        here.close()
    assert [across[p.request_id] for p in prompts] == list(local.values())
    assert all(len(tokens) == 12 for tokens in across.values())


def test_bad_input_is_refused_in_the_caller_before_any_model_work(engine):
    with pytest.raises(ValueError, match=r"token_ids: expected a non-empty sequence of ids in \[0, 512\)"):
        engine.submit(Prompt(token_ids=(1, 99999), sampling=SamplingParams(max_new_tokens=2)), print)
    with pytest.raises(ValueError, match=r"inputs\['logit_bias'\]: not supported"):
        engine.check_sampling(SamplingParams(max_new_tokens=2, options={"logit_bias": {}}))
    # A schema is compiled in the child; its error comes back as the caller's ValueError.
    bad = StructuredOutput(kind="grammar", spec='root ::= "a" (')
    with pytest.raises(ValueError, match="response_format"):
        engine.check_sampling(SamplingParams(max_new_tokens=2, structured=bad), "body")
    assert engine.running == 0 and engine.alive


def test_an_aborted_request_ends_with_abort_and_others_go_on(engine):
    long, short = sampled(5, max_new_tokens=400), sampled(6)
    events = engine.generate([long, short])
    first = next(events)
    engine.abort(long.request_id)
    finals = {e.request_id: e.finish_reason for e in [first, *events] if e.finished}
    assert finals == {long.request_id: "abort", short.request_id: "length"}
    assert engine.running == 0


def test_a_consumer_that_raises_costs_only_its_own_events(engine):
    def broken(event):
        raise RuntimeError("a consumer's bug")

    engine.submit(sampled(11, max_new_tokens=30), broken)
    assert [e.finish_reason for e in engine.generate([sampled(12, max_new_tokens=30)])][-1] == "length"


def test_sigint_and_sigterm_leave_the_child_serving(engine):
    # Ctrl-C and service managers signal the whole process group: the parent drains first, then closes it.
    os.kill(engine._process.pid, signal.SIGINT)
    os.kill(engine._process.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert [e.finish_reason for e in engine.generate([sampled(7)])][-1] == "length"


def test_a_child_that_dies_fails_its_requests_and_refuses_new_ones():
    engine = ProcessEngine(load_engine, DEMO_DIR, max_batch_size=2)
    try:
        prompt = sampled(8, max_new_tokens=4000)
        events = engine.generate([prompt])
        next(events)
        os.kill(engine._process.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=f"failed request {prompt.request_id}"):
            list(events)
        assert not engine.alive and engine.running == 0
        with pytest.raises(RuntimeError, match=r"the engine process exited \(code -9\)"):
            engine.submit(sampled(9), print)
    finally:
        engine.close()


def test_closing_ends_running_requests_with_abort():
    engine = ProcessEngine(load_engine, DEMO_DIR, max_batch_size=2)
    prompt = sampled(10, max_new_tokens=4000)
    events = engine.generate([prompt])
    next(events)
    engine.close()
    assert [e.finish_reason for e in events if e.finished] == ["abort"]
    assert engine._process.exitcode == 0 and not engine.alive


def test_a_child_whose_parent_is_killed_exits():
    script = textwrap.dedent(f"""
        from modelscope_llama2.engines.factory import load_engine
        from modelscope_llama2.engines.process import ProcessEngine
        engine = ProcessEngine(load_engine, {DEMO_DIR!r}, max_batch_size=2)
        print(engine._process.pid, flush=True)
        import time; time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(30)
        deadline = time.monotonic() + 30
        while process_runs(child):
            assert time.monotonic() < deadline, "the engine process outlived its parent"
            time.sleep(0.1)
    finally:
        parent.kill()


def test_a_checkpoint_that_fails_to_load_raises_its_error(tmp_path):
    with pytest.raises(RuntimeError, match="the engine process failed to load the engine: ValueError: Unrecognized model"):
        ProcessEngine(load_engine, str(tmp_path))


def test_serve_engine_in_process_runs_no_child_and_answers():
    import httpx

    from modelscope_llama2.serving.process import start_serve

    served = start_serve(["--engine-in-process", "--served-model-name", "demo"],
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert engine_processes(served.process.pid) == []
        ask = {"model": "demo", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        assert httpx.post(served.url + "/v1/completions", json=ask, timeout=60).json()["usage"]["completion_tokens"] \
            > 0
    finally:
        served.process.terminate()
        served.process.wait(60)


def test_serve_refuses_engine_in_process_where_it_means_nothing():
    refused = subprocess.run([sys.executable, "-m", "modelscope_llama2", "serve", "--engine", "vllm",
                              "--engine-in-process"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --engine-in-process: only applies")
