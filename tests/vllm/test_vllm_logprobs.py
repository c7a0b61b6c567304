"""Logprobs, prompt logprobs, penalties and ignore_eos on the vLLM engine, against a plain transformers forward."""

import pytest
import torch

pytest.importorskip("vllm")

from modelscope_llama2.constants import EOS_ID  # noqa: E402
from modelscope_llama2.prompts.chat_format import dialog_from_history, encode_dialog  # noqa: E402
from modelscope_llama2.prompts.prompt import Prompt, SamplingParams  # noqa: E402

GREEDY = {"do_sample": False}
TOL = 1e-4


@pytest.fixture(scope="module")
def transformers_model(vllm_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()


def chat_ids(tokenizer, text):
    return tuple(encode_dialog(dialog_from_history(text, [], None), tokenizer.sp_model.encode, 1, 2))


def reference_logprobs(model, ids):
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def run(engine, prompt):
    ids, logprobs, scored, final = [], [], None, None
    for event in engine.generate([prompt]):
        ids += event.token_ids
        logprobs += event.logprobs
        scored = event.prompt_logprobs if event.prompt_logprobs is not None else scored
        final = event if event.finished else None
    return ids, logprobs, scored, final


def test_logprobs_equal_a_plain_forward_greedy_or_sampled(vllm_engine, demo_tokenizer, transformers_model):
    ids = chat_ids(demo_tokenizer, "Where is the capital of Zhejiang?")
    greedy = run(vllm_engine, Prompt(ids, SamplingParams(12, options=GREEDY, logprobs=3)))
    sampled = run(vllm_engine, Prompt(ids, SamplingParams(12, seed=1, logprobs=3, options={
        "do_sample": True, "temperature": 0.4, "top_k": 5, "repetition_penalty": 1.3})))
    for new, logprobs, _, _ in (greedy, sampled):
        ref = reference_logprobs(transformers_model, list(ids) + new)
        assert [e.token_id for e in logprobs] == new and new
        for i, entry in enumerate(logprobs):
            row = ref[len(ids) - 1 + i]
            assert entry.logprob == pytest.approx(row[new[i]].item(), abs=TOL)
            assert [t for t, _ in entry.top] == torch.topk(row, 3).indices.tolist()
    for a, b in zip(greedy[1], sampled[1]):  # same token after the same prefix: the same number
        if a.token_id != b.token_id:
            break
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_prompt_logprobs_with_no_new_tokens(vllm_engine, demo_tokenizer, transformers_model):
    ids = chat_ids(demo_tokenizer, "Hi!")
    new, logprobs, scored, final = run(vllm_engine, Prompt(ids, SamplingParams(0, options=GREEDY, prompt_logprobs=1)))
    assert (new, logprobs, final.finish_reason, final.usage.completion_tokens) == ([], [], "length", 0)
    ref = reference_logprobs(transformers_model, list(ids))
    assert scored[0] is None and len(scored) == len(ids)
    for i, entry in enumerate(scored[1:], start=1):
        assert entry.token_id == ids[i]
        assert entry.logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=TOL)
        assert [t for t, _ in entry.top] == [int(ref[i - 1].argmax())]


def test_ignore_eos_and_penalties(vllm_engine, demo_tokenizer, transformers_model):
    ids = chat_ids(demo_tokenizer, "Where is the capital of Zhejiang?")
    plain, _, _, final = run(vllm_engine, Prompt(ids, SamplingParams(40, options=GREEDY)))
    assert final.finish_reason == "eos"
    long, _, _, final = run(vllm_engine, Prompt(ids, SamplingParams(40, options=GREEDY, ignore_eos=True)))
    assert (final.finish_reason, len(long)) == ("length", 40)
    assert long[:len(plain) + 1] == plain + [EOS_ID]
    frequency, presence = 1.0, 1.5
    options = {**GREEDY, "frequency_penalty": frequency, "presence_penalty": presence}
    penalized, _, _, _ = run(vllm_engine, Prompt(ids, SamplingParams(40, options=options, ignore_eos=True)))
    assert penalized != long
    with torch.inference_mode():
        logits = transformers_model(input_ids=torch.tensor([list(ids) + penalized])).logits[0]
    for i, token in enumerate(penalized):
        counts = torch.bincount(torch.tensor(penalized[:i], dtype=torch.long), minlength=logits.shape[-1]).float()
        assert token == int((logits[len(ids) - 1 + i] - frequency * counts - presence * (counts > 0)).argmax())


def test_echo_scoring_and_chat_logprobs_over_http(vllm_engine, demo_tokenizer, vllm_model_dir, transformers_model):
    """The server on the session's vLLM engine: what lm-eval's loglikelihood requests and chat logprobs get."""
    import openai

    from modelscope_llama2.serving.app import create_app
    from modelscope_llama2.serving.backend import LocalBackend
    from modelscope_llama2.serving.config import ServerConfig
    from modelscope_llama2.serving.server import default_sampling
    from tests.helpers import running_server

    class SessionBackend(LocalBackend):
        async def close(self) -> None:  # the session's engine outlives this app (conftest closes it)
            self._executor.shutdown(wait=False, cancel_futures=True)

    backend = SessionBackend(vllm_engine, demo_tokenizer)
    app = create_app(backend, ServerConfig("demo", default_sampling=default_sampling(vllm_model_dir)))
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        ids = [1, *demo_tokenizer.encode("West Lake is in Hangzhou")]
        scored = client.completions.create(model="demo", prompt=ids, max_tokens=0, echo=True, logprobs=1).choices[0]
        ref = reference_logprobs(transformers_model, ids)
        assert scored.logprobs.token_logprobs[0] is None
        assert scored.logprobs.token_logprobs[1:] == pytest.approx(
            [ref[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=TOL)
        reply = client.chat.completions.create(model="demo", temperature=0, logprobs=True, top_logprobs=2,
                                               messages=[{"role": "user", "content": "Hi!"}],
                                               extra_body={"return_token_ids": True})
        chat_ids = reply.prompt_token_ids + reply.choices[0].token_ids
        ref = reference_logprobs(transformers_model, chat_ids)
        start = len(reply.prompt_token_ids) - 1
        assert [c.logprob for c in reply.choices[0].logprobs.content] == pytest.approx(
            [ref[start + i, t].item() for i, t in enumerate(reply.choices[0].token_ids)], abs=TOL)
