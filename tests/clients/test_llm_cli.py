"""Simon Willison's ``llm`` CLI with an ``extra-openai-models.yaml`` entry for the server: two turns (``-c``)."""

import json

from modelscope_llama2 import Llama2Tokenizer
from modelscope_llama2.constants import DEMO_DIR
from tests.clients.conftest import KEY, run_client
from tests.helpers import HANGZHOU, PLACES, SIGHTS, ZHEJIANG, meta_prompt


def test_llm_cli_holds_a_conversation(server, tmp_path):
    # The entry as llm's docs give it, in the folder `llm logs path` lives in (LLM_USER_PATH).
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: demo\n  model_name: demo\n  api_base: \"{server}\"\n  api_key_name: demo-server\n")
    (tmp_path / "keys.json").write_text(json.dumps({"demo-server": KEY}))
    env = {"LLM_USER_PATH": str(tmp_path)}
    first = run_client(["llm", "-m", "demo", "-o", "temperature", "0", ZHEJIANG], env)
    second = run_client(["llm", "-c", "-o", "temperature", "0", PLACES], env)
    assert (first.strip(), second.strip()) == (HANGZHOU, SIGHTS)
    # The second request carried the first round: its prompt is Meta's prompt of the whole conversation.
    logged = json.loads(run_client(["llm", "logs", "list", "--json", "-n", "2"], env))
    tokenizer = Llama2Tokenizer.from_pretrained(DEMO_DIR)
    assert [(entry["prompt"], entry["response"], entry["input_tokens"]) for entry in logged] == \
        [(ZHEJIANG, HANGZHOU, meta_prompt(tokenizer, None, (), ZHEJIANG, 1)[0]),
         (PLACES, SIGHTS, meta_prompt(tokenizer, None, ((ZHEJIANG, HANGZHOU),), PLACES, 1)[0])]
    assert logged[0]["conversation_id"] == logged[1]["conversation_id"]
