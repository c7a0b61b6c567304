"""lm-evaluation-harness against the server: the harness's own ``hf`` backend on the same checkpoint is the oracle.

A multiple-choice task (loglikelihood requests: ``echo`` + ``logprobs`` on
``/v1/completions``) from a JSON file shipped here, run by ``lm_eval`` as a
user would, once with ``--model hf`` (transformers in-process) and once with
``--model local-completions`` against a real server on loopback: the same
accuracy, and every request's loglikelihood within 1e-4. Then a
generate_until task through ``local-chat-completions``, and one through
``local-completions`` with humaneval's six stop strings. No download: the
task reads the local file, the model is the bundled demo checkpoint.
Runs in lm-eval's own venv (``.ci/lmeval.sh``).
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.serving.server import build_app
from tests.helpers import running_server

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-4
KEY = "sk-lmeval"  # lm-eval's API models send $OPENAI_API_KEY as the bearer token

MULTIPLE_CHOICE = """\
task: demo_multiple_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "[INST] {{{{question}}}} [/INST]"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""

GENERATE = """\
task: demo_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["</s>"]
  do_sample: false
  temperature: 0
  max_gen_toks: 48
metric_list:
  - metric: exact_match
"""


# humaneval's ``until`` (lm-eval adds EOS): local-completions sends all six, not OpenAI's at most 4.
COMPLETE = GENERATE.replace("demo_generate", "demo_complete").replace(
    '"{{{{question}}}}"', '"[INST] {{{{question}}}} [/INST]"').replace(
    'until: ["</s>"]', 'until: ["\\nclass", "\\ndef", "\\n#", "\\nif", " Province"]')


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = os.path.join(HERE, "capitals.jsonl")
    (folder / "multiple_choice.yaml").write_text(MULTIPLE_CHOICE.format(data=data))
    (folder / "generate.yaml").write_text(GENERATE.format(data=data))
    (folder / "complete.yaml").write_text(COMPLETE.format(data=data))
    return str(folder)


@pytest.fixture(scope="module")
def server_url():
    with running_server(build_app(DEMO_DIR, "demo", api_key=KEY)) as url:
        yield url


def lm_eval(tmp_path, tasks, model, model_args, *extra):
    """Run the ``lm_eval`` CLI; returns ``(results of the task, its logged samples by doc_id)``."""
    out = tmp_path / model
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": KEY,
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks",
               tasks[1], "--include_path", tasks[0], "--output_path", str(out), "--log_samples", *extra]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    (results_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    (samples_file,) = glob.glob(str(out / "**" / f"samples_{tasks[1]}_*.jsonl"), recursive=True)
    with open(results_file) as f:
        results = json.load(f)["results"][tasks[1]]
    with open(samples_file) as f:
        samples = {s["doc_id"]: s for s in map(json.loads, f)}
    return results, samples


def test_multiple_choice_loglikelihoods_equal_the_hf_backend(tmp_path, tasks, server_url):
    task = (tasks, "demo_multiple_choice")
    # BOS first on both (Llama 2 is trained with it): lm-eval's API models leave it out unless told.
    oracle, oracle_samples = lm_eval(tmp_path, task, "hf", f"pretrained={DEMO_DIR},dtype=float32,add_bos_token=True",
                                     "--device", "cpu", "--batch_size", "4")
    served, served_samples = lm_eval(
        tmp_path, task, "local-completions",
        f"model=demo,base_url={server_url}/v1/completions,tokenizer={DEMO_DIR},add_bos_token=True,"
        "num_concurrent=2,max_retries=1")
    assert served["acc,none"] == oracle["acc,none"] > 0
    assert sorted(served_samples) == sorted(oracle_samples) and len(oracle_samples) == 8
    for doc_id, expected in oracle_samples.items():
        got = served_samples[doc_id]
        assert len(got["filtered_resps"]) == len(expected["filtered_resps"]) == 4
        for choice, ((loglikelihood, greedy), (expected_ll, expected_greedy)) in enumerate(
                zip(got["filtered_resps"], expected["filtered_resps"])):
            assert float(loglikelihood) == pytest.approx(float(expected_ll), abs=TOL), (doc_id, choice)
            assert greedy == expected_greedy, (doc_id, choice)


def test_generate_until_through_chat_completions(tmp_path, tasks, server_url):
    results, samples = lm_eval(
        tmp_path, (tasks, "demo_generate"), "local-chat-completions",
        f"model=demo,base_url={server_url}/v1/chat/completions,num_concurrent=2,max_retries=1",
        "--apply_chat_template")
    # The demo checkpoint answers the questions it was trained on word for word.
    answers = {doc_id: s["filtered_resps"][0] for doc_id, s in samples.items()}
    assert answers[0] == "The capital of Zhejiang Province is Hangzhou."
    assert answers[2] == "2 + 2 = 4."
    assert results["exact_match,none"] >= 0.5


def test_generate_until_through_completions_with_six_stop_strings(tmp_path, tasks, server_url):
    _, samples = lm_eval(
        tmp_path, (tasks, "demo_complete"), "local-completions",
        f"model=demo,base_url={server_url}/v1/completions,tokenizer={DEMO_DIR},add_bos_token=True,"
        "num_concurrent=2,max_retries=1")
    answers = {doc_id: s["filtered_resps"][0] for doc_id, s in samples.items()}
    # "The capital of Zhejiang Province is Hangzhou.", cut at the stop string " Province".
    assert answers[0] == " The capital of Zhejiang"
    # Raw completion text: the checkpoint learnt Meta's "{answer} </s>", so the space before EOS is kept.
    assert answers[2] == " 2 + 2 = 4. "
