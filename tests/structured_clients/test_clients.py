"""pydantic-ai, instructor and LangChain get schema-valid objects and tool calls from the demo checkpoint.

The demo checkpoint was never trained on JSON: what it writes inside the
strings is nonsense, but the grammar makes every object validate, which is
what these clients check (they raise on invalid output).
"""

from tests.structured_clients.conftest import run_script

CITY = '''
from typing import Annotated
from pydantic import BaseModel, Field

class City(BaseModel):
    """A city and its province."""
    city: str = Field(max_length=16)
    province: str = Field(max_length=16)
'''

PYDANTIC_AI = CITY + '''
import json, sys
from pydantic_ai import Agent
from pydantic_ai.messages import ToolReturnPart
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

model = OpenAIChatModel(sys.argv[3], provider=OpenAIProvider(base_url=sys.argv[1], api_key=sys.argv[2]))
settings = ModelSettings(temperature=0, max_tokens=400)
out = {"structured": Agent(model, output_type=City, model_settings=settings).run_sync(
    "Where is the capital of Zhejiang?").output.model_dump()}
calls = []
agent = Agent(model, output_type=City, model_settings=settings)

@agent.tool_plain
def get_weather(city: Annotated[str, Field(max_length=12)]) -> str:
    """The weather of a city."""
    calls.append(city)
    return "Sunny, 25 C."

result = agent.run_sync("What is the weather in Hangzhou? Call get_weather first.")
out["tool_calls"] = calls
out["tool_output"] = result.output.model_dump()
out["returned"] = [part.content for message in result.all_messages() for part in getattr(message, "parts", [])
                   if isinstance(part, ToolReturnPart) and part.tool_name == "get_weather"]
print(json.dumps(out))
'''

INSTRUCTOR = CITY + '''
import json, sys
import instructor
from openai import OpenAI

out = {}
for mode in ("TOOLS", "JSON_SCHEMA"):
    client = instructor.from_openai(OpenAI(base_url=sys.argv[1], api_key=sys.argv[2]), mode=getattr(instructor.Mode, mode))
    out[mode] = client.chat.completions.create(
        model=sys.argv[3], response_model=City, max_retries=0, temperature=0, max_tokens=400,
        messages=[{"role": "user", "content": "Where is the capital of Zhejiang?"}]).model_dump()
print(json.dumps(out))
'''

LANGCHAIN = CITY + '''
import json, sys
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

llm = ChatOpenAI(base_url=sys.argv[1], api_key=sys.argv[2], model=sys.argv[3], temperature=0, max_tokens=400)
out = {method: llm.with_structured_output(City, method=method).invoke("Where is the capital of Zhejiang?").model_dump()
       for method in ("json_schema", "function_calling")}

@tool
def get_weather(city: Annotated[str, Field(max_length=12)]) -> str:
    """The weather of a city."""
    return "Sunny"

message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Hangzhou?")
out["bind_tools"] = [{"name": call["name"], "args": call["args"]} for call in message.tool_calls]
print(json.dumps(out))
'''


def _is_city(value):
    return set(value) == {"city", "province"} and all(isinstance(v, str) and len(v) <= 16 for v in value.values())


def test_pydantic_ai_structured_output_and_tool_agents(server):
    out = run_script(PYDANTIC_AI, server)
    assert _is_city(out["structured"]) and _is_city(out["tool_output"])
    # The tool agent called the tool with schema-valid arguments, and its result went back to the model.
    assert out["tool_calls"] and all(isinstance(c, str) and len(c) <= 12 for c in out["tool_calls"])
    assert out["returned"] == ["Sunny, 25 C."] * len(out["tool_calls"])


def test_instructor_tools_and_json_schema_modes(server):
    out = run_script(INSTRUCTOR, server)
    assert _is_city(out["TOOLS"]) and _is_city(out["JSON_SCHEMA"])


def test_langchain_with_structured_output_and_bind_tools(server):
    out = run_script(LANGCHAIN, server)
    assert _is_city(out["json_schema"]) and _is_city(out["function_calling"])
    assert out["bind_tools"] and all(call["name"] == "get_weather" and len(call["args"]["city"]) <= 12
                                     for call in out["bind_tools"])
