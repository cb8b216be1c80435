"""The official `openai` client against `moectl up --http` (driven by cli/tests/http.rs).

Environment: BASE_URL (the front end, .../v1), API_KEY, MODEL, DEAD_URL (a front end whose
coordinator does not exist). The cluster runs with --max-in-flight 2, which the 429 check uses.
Prints one line per check; any failure raises (non-zero exit).
"""

import os
import threading

import json
import urllib.error
import urllib.request

import openai
from openai import OpenAI

BASE_URL = os.environ["BASE_URL"]
MODEL = os.environ["MODEL"]
client = OpenAI(base_url=BASE_URL, api_key=os.environ["API_KEY"], max_retries=0, timeout=120)
GREEDY = dict(temperature=0)
HELLO = [{"role": "user", "content": "Hello! What is 2 + 2?"}]


def check(name):
    print("ok", name, flush=True)


def expect_error(cls, call, param=None):
    try:
        call()
    except cls as e:
        assert isinstance(e, openai.APIStatusError), type(e)
        if param is not None:
            assert e.body is not None and e.body.get("param") == param, (param, e.body)
        return e
    raise AssertionError(f"expected {cls.__name__}")


def stream_chat(**kw):
    """Streams a chat completion; returns (content, reasoning, finish_reasons, usage, chunks)."""
    content, reasoning, finish, usage, n = "", "", [], None, 0
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
        n += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            if c.finish_reason:
                finish.append(c.finish_reason)
    return content, reasoning, finish, usage, n


# Models.
models = client.models.list()
assert [m.id for m in models.data] == [MODEL], models
check("models")

# Chat, whole and streamed: the same greedy answer, usage in both.
whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, **GREEDY)
choice = whole.choices[0]
assert choice.finish_reason in ("length", "stop"), choice.finish_reason
assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0
assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
assert whole.usage.completion_tokens <= 12
content, reasoning, finish, usage, _ = stream_chat(
    messages=HELLO, max_tokens=12, stream_options={"include_usage": True}, **GREEDY
)
assert content == (choice.message.content or ""), (content, choice.message.content)
assert finish == [choice.finish_reason], finish
assert usage is not None and usage.model_dump() == whole.usage.model_dump(), (usage, whole.usage)
check("chat whole and streamed agree, with usage")

# Completions, whole and streamed.
comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, **GREEDY)
assert comp.usage.completion_tokens == 10 or comp.choices[0].finish_reason == "stop"
text = "".join(
    c.choices[0].text
    for c in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, stream=True, **GREEDY)
    if c.choices
)
assert text == comp.choices[0].text, (text, comp.choices[0].text)
check("completions whole and streamed agree")

# Stop strings: the answer ends before the first occurrence, streamed or not.
reference = comp.choices[0].text
stop = next((reference[i : i + 2] for i in range(2, len(reference) - 1) if reference[i : i + 2].strip()), None)
assert stop is not None, f"no stop string to pick from {reference!r}"
cut = reference[: reference.index(stop)]
stopped = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, stop=[stop], **GREEDY)
assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (cut, "stop"), (stopped, stop)
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, stop=[stop], stream=True, **GREEDY
    )
    if c.choices
)
assert streamed == cut, (streamed, cut)
check(f"stop string {stop!r} cuts at {len(cut)} characters, streamed too")

# n choices: greedy gives the same answer twice; usage counts both.
two = client.chat.completions.create(
    model=MODEL, messages=HELLO, max_tokens=6, n=2, extra_body={"return_token_ids": True}, **GREEDY
)
assert [c.index for c in two.choices] == [0, 1]
assert two.choices[0].message.content == two.choices[1].message.content
ids = [c.model_extra["token_ids"] for c in two.choices]
assert ids[0] == ids[1] and two.usage.completion_tokens == 2 * len(ids[0]), (ids, two.usage)
check("n=2")

# Tools render through the template and a history with a call and its result is accepted.
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
history = HELLO + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "opts": {"unit": "c"}})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
]
with_tools = client.chat.completions.create(model=MODEL, messages=history, tools=tools, max_tokens=4, **GREEDY)
assert with_tools.usage.prompt_tokens > whole.usage.prompt_tokens
assert with_tools.choices[0].finish_reason in ("length", "stop", "tool_calls")
check("tools and tool results accepted")

# Logprobs are asked for and returned per token.
lp = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, logprobs=True, top_logprobs=2, **GREEDY)
entries = lp.choices[0].logprobs.content
assert len(entries) == lp.usage.completion_tokens, entries
for e in entries:
    # Greedy: the chosen token is the most likely alternative, and alternatives are ordered.
    assert len(e.top_logprobs) == 2 and e.logprob <= 0, e
    assert e.top_logprobs[0].logprob == e.logprob and e.top_logprobs[0].token == e.token, e
    assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob, e
comp_lp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, logprobs=2, **GREEDY)
assert len(comp_lp.choices[0].logprobs.token_logprobs) == 3 and len(comp_lp.choices[0].logprobs.top_logprobs[0]) <= 2
check("logprobs: greedy tokens are their own top alternative")

# A concurrent request completes unchanged while bad requests are refused.
long = dict(messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=300, **GREEDY)
undisturbed = client.chat.completions.create(model=MODEL, **long).choices[0].message.content
started, result = threading.Event(), {}


def concurrent():
    text = ""
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **long):
        started.set()
        for c in chunk.choices:
            text += c.delta.content or ""
    result["text"] = text


worker = threading.Thread(target=concurrent)
worker.start()
assert started.wait(60), "the concurrent stream did not start"
# The cluster admits 2 requests; the stream holds one and n=2 needs two: RESOURCE_EXHAUSTED.
# First, so that the 429 also proves the stream was still running.
busy = expect_error(openai.RateLimitError, lambda: client.chat.completions.create(model=MODEL, messages=HELLO, n=2, max_tokens=2))
assert busy.status_code == 429
expect_error(openai.BadRequestError, lambda: client.chat.completions.create(model="nope", messages=HELLO), "model")
expect_error(openai.BadRequestError, lambda: client.chat.completions.create(model=MODEL, messages=HELLO, temperature=5), "temperature")
expect_error(openai.BadRequestError, lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user"}]), "messages[0].content")
expect_error(openai.BadRequestError, lambda: client.chat.completions.create(model=MODEL, messages=[]), "messages")
expect_error(openai.BadRequestError, lambda: client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10**9), "max_tokens")
# 20000 two-byte letters the generated tokenizer has no merges for: 40000 tokens, past the context.
expect_error(openai.BadRequestError, lambda: client.completions.create(model=MODEL, prompt="é" * 20000, max_tokens=1), "prompt")
expect_error(openai.BadRequestError, lambda: client.completions.create(model=MODEL, prompt=[10**7]), "prompt[0]")
try:
    urllib.request.urlopen(urllib.request.Request(BASE_URL + "/chat/completions", data=b"{not json",
                           headers={"Authorization": "Bearer " + os.environ["API_KEY"]}))
    raise AssertionError("malformed JSON accepted")
except urllib.error.HTTPError as e:
    body = json.loads(e.read())
    assert e.code == 400 and "not a JSON object" in body["error"]["message"], body
wrong_key = OpenAI(base_url=BASE_URL, api_key="wrong", max_retries=0)
expect_error(openai.AuthenticationError, lambda: wrong_key.models.list())
worker.join(120)
assert result.get("text") == undisturbed, (result, undisturbed)
check("bad requests refused (400 with param, 401, 429) while a concurrent stream completed unchanged")

dead = OpenAI(base_url=os.environ["DEAD_URL"], api_key=os.environ["API_KEY"], max_retries=0)
e = expect_error(openai.InternalServerError, lambda: dead.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2))
assert e.status_code == 503, e.status_code
check("503 without a coordinator")
print("ALL PASSED")
