"""``litellm.completion`` with the ``openai/`` and ``hosted_vllm/`` prefixes, streamed and not, for two turns."""

import json

import pytest

from tests.clients.conftest import KEY, run_client
from tests.helpers import HANGZHOU, PLACES, SIGHTS, ZHEJIANG

SCRIPT = """
import json, sys
import litellm

model, api_base, key, stream = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "stream"
messages = [{"role": "user", "content": sys.argv[5]}]
answers = []
for question in sys.argv[5:]:
    if answers:
        messages += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": question}]
    reply = litellm.completion(model=model, api_base=api_base, api_key=key, messages=messages, temperature=0,
                               max_tokens=64, stream=stream)
    if stream:
        answers.append("".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices))
    else:
        answers.append(reply.choices[0].message.content)
print(json.dumps(answers))
"""


@pytest.mark.parametrize("prefix", ["openai", "hosted_vllm"])
@pytest.mark.parametrize("stream", ["stream", "whole"])
def test_litellm_two_turns(server, prefix, stream):
    out = run_client(["python", "-c", SCRIPT, f"{prefix}/demo", server, KEY, stream, ZHEJIANG, PLACES])
    assert json.loads(out.strip().splitlines()[-1]) == [HANGZHOU, SIGHTS]
