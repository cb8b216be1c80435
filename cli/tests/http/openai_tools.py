"""The official `openai` client on reasoning and tool calls (driven by cli/tests/http.rs).

The front end at BASE_URL serves MODEL from a scripted coordinator whose every answer is
A13B slow thinking followed by an answer with a nested tool call (moe_tests::scripted).
"""

import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"], max_retries=0, timeout=60)
MODEL = os.environ["MODEL"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
ARGUMENTS = '{"city": "巴黎", "opts": {"unit": "c", "days": [1, 2]}}'

whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=1000)
choice = whole.choices[0]
assert choice.finish_reason == "tool_calls", choice
message = choice.message
assert message.model_extra["reasoning_content"] == "The user wants the weather; 巴黎 is Paris.", message
assert message.content == "Checking 😀 ", message
[call] = message.tool_calls
assert call.type == "function" and call.function.name == "get_weather", call
assert call.function.arguments == ARGUMENTS, call.function.arguments
assert json.loads(call.function.arguments)["opts"]["days"] == [1, 2]
assert whole.usage.completion_tokens > 0
print("ok whole: reasoning_content, content, tool_calls, finish_reason tool_calls")

reasoning, content, calls, finish = "", "", {}, []
for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=1000,
                                            stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
        assert chunk.usage.model_dump() == whole.usage.model_dump(), (chunk.usage, whole.usage)
    for c in chunk.choices:
        reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
        content += c.delta.content or ""
        for tc in c.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        if c.finish_reason:
            finish.append(c.finish_reason)
assert reasoning == message.model_extra["reasoning_content"], reasoning
assert content == message.content, content
assert calls == {0: {"name": "get_weather", "arguments": ARGUMENTS}}, calls
assert finish == ["tool_calls"], finish
print("ok streamed: the same split, tool call deltas, usage")

no_tools = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1000)
assert no_tools.choices[0].message.tool_calls is None and "<tool_calls>" in no_tools.choices[0].message.content
assert no_tools.choices[0].finish_reason == "stop"
print("ok without tools the block is text")
print("ALL PASSED")
