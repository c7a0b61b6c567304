"""The openai SDK's ``chat.completions.parse`` gets a pydantic object from the demo checkpoint, on each engine.

It needs only ``openai`` (a test dependency), so it runs in the core step too.
"""

from typing import List

import openai
import pydantic

from tests.structured_clients.conftest import KEY, MODEL


class City(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=16)
    sights: List[str] = pydantic.Field(max_length=2)


def test_the_sdk_parse_gets_a_pydantic_object(server):
    client = openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)
    out = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Where is the capital of "
                                                                "Zhejiang?"}], response_format=City,
                                        temperature=0, max_tokens=200)
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(out.choices[0].message.parsed, City)
