"""`/v1/chat/completions` through a live server, the real scheduler and a tiny real model, driven by
the official `openai` client (and raw SSE where the wire rules are the point).

The model is a random 2-layer gpt-oss with the real o200k_harmony vocabulary; where a test needs
the model to answer in harmony (reasoning, tool calls), `ScriptedModel` makes its greedy output
follow a script (tests/server_support.py). The prompt the model saw is compared with what
openai-harmony renders for the same conversation, an independent implementation of the format.
"""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from conftest import make_tiny_config
from gptoss_mlx.harmony.calls import refusal_text
from scripted_chat import WEATHER_TOOL, final_answer, ids, tool_call
from server_support import (
    ScriptedModel,
    harmony_prompt,
    last_prompt_with,
    request,
    serving,
    sse_payloads,
    sse_stream,
    wait_until,
)
from vocabs import needs_real_vocab

openai = pytest.importorskip("openai")
pytestmark = needs_real_vocab("the server renders and parses harmony with the real tokens")

MODEL = "gpt-oss-20b"
CONTEXT = 1024


@pytest.fixture(scope="module")
def tok():
    from gptoss_mlx.harmony.tokenizer import load_default_tokenizer

    return load_default_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from gptoss_mlx.convert.synthetic import random_model

    inner = random_model(make_tiny_config(num_hidden_layers=2, vocab_size=201088), seed=0)
    m = ScriptedModel(inner, tok)
    m.add("Say hi", final_answer(tok, "The user greets.", "Hello there!"))
    m.add(
        "Weather in Paris?", tool_call(tok, "Need the weather.", "get_weather", '{"city":"Paris"}')
    )
    m.add("sunny, 21C", final_answer(tok, "Report it.", "It is sunny and 21C in Paris."))
    m.add("Thanks!", final_answer(tok, "Polite.", "You are welcome."))
    m.add("Search the web", browser_call(tok))
    m.add("Answer in JSON", analysis_then(tok, "final"))
    m.add("Call a tool", analysis_then(tok, None))
    for tool in ("browser.search", "functions.get_weather"):  # the refusals the server sends
        m.add(refusal_text(tool, ()), final_answer(tok, "No tool.", "I cannot browse."))
    return m


def analysis_then(tok, channel):
    """Analysis, then the header of a message on `channel` (None: nothing more); the rest is left
    to the model, held to its grammar."""
    out = ids(tok, "<|channel|>", "analysis", "<|message|>", "Think.", "<|end|>")
    if channel is not None:
        out += ids(tok, "<|start|>", "assistant", "<|channel|>", channel, "<|message|>")
    return out


def browser_call(tok):
    return ids(
        tok,
        "<|channel|>", "analysis", "<|message|>", "Search.", "<|end|>",
        "<|start|>", "assistant", "<|channel|>", "analysis", " to=browser.search",
        "<|message|>", '{"query":"x"}', "<|call|>",
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(model, tok):
    with serving(model, tok, max_context=CONTEXT, max_concurrency=4) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hx():
    return pytest.importorskip("openai_harmony")


def sse_chunks(url: str, body: dict) -> list:
    """The `data:` payloads of a streamed chat completion ("[DONE]" kept as a string)."""
    return sse_payloads(url, "/v1/chat/completions", body)


# --------------------------------------------------------------------------- basics


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = request(server[0], "GET", "/health")[2]
    assert health["status"] == "ok" and health["active"] == 0 and health["queued"] == 0


def test_final_answer(client, model, tok, hx):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], temperature=0
    )
    msg = r.choices[0].message
    assert msg.content == "Hello there!"
    assert msg.reasoning == msg.reasoning_content == "The user greets."  # extra fields
    assert msg.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    assert r.model == MODEL and r.id.startswith("chatcmpl-")
    # The prompt is what openai-harmony renders; usage counts it and the script.
    expected = harmony_prompt(hx, [("user", "Say hi", None)])
    assert last_prompt_with(model, tok, "Say hi") == expected
    script = final_answer(tok, "The user greets.", "Hello there!")
    analysis = ids(tok, "<|channel|>", "analysis", "<|message|>", "The user greets.", "<|end|>")
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens) == (len(expected), len(script))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens_details.reasoning_tokens == len(analysis)
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_system_and_developer_messages_become_the_instructions(client, model, tok, hx):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be kind."},
            {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
            {"role": "user", "content": "Say hi"},
        ],
        temperature=0,
        max_completion_tokens=5,
    )
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    expected = harmony_prompt(
        hx, [("user", "Say hi", None)], instructions="Be kind.\n\nUse French."
    )
    assert last_prompt_with(model, tok, "Use French.") == expected


def test_stream_follows_the_delta_rules_and_equals_the_plain_answer(server, client):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi"}],
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = sse_chunks(server[0], body)
    assert chunks[-1] == "[DONE]"
    data = chunks[:-1]
    assert len({c["id"] for c in data}) == 1 and all(
        c["object"] == "chat.completion.chunk" for c in data
    )
    deltas = [c["choices"][0]["delta"] for c in data if c["choices"]]
    assert deltas[0]["role"] == "assistant"
    assert all("role" not in d for d in deltas[1:]), "role only in the first delta"
    assert all(d.get("tool_calls") != [] for d in deltas), "no empty tool_calls"
    finishes = [c["choices"][0]["finish_reason"] for c in data if c["choices"]]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    usage = data[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    reasoning = "".join(d.get("reasoning", "") for d in deltas)
    assert reasoning == "".join(d.get("reasoning_content", "") for d in deltas)
    plain = client.chat.completions.create(model=MODEL, messages=body["messages"], temperature=0)
    assert "".join(d.get("content") or "" for d in deltas) == plain.choices[0].message.content
    assert reasoning == plain.choices[0].message.reasoning
    assert usage["usage"] == plain.usage.model_dump(exclude_none=True)


def test_openai_stream_helper_accumulates_the_same_answer(client):
    with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], temperature=0
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    assert "content.done" in events
    assert final.choices[0].message.content == "Hello there!"


# --------------------------------------------------------------------------- tools


def test_tool_loop_keeps_the_chain_of_thought_until_the_answer(client, model, tok, hx):
    first = [{"role": "user", "content": "Weather in Paris?"}]
    r1 = client.chat.completions.create(
        model=MODEL, messages=first, tools=[WEATHER_TOOL], temperature=0
    )
    msg = r1.choices[0].message
    assert r1.choices[0].finish_reason == "tool_calls"
    assert msg.content is None
    (call,) = msg.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city":"Paris"}')
    # The client appends the message as it got it (reasoning included) and the tool's result.
    second = first + [
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    r2 = client.chat.completions.create(
        model=MODEL, messages=second, tools=[WEATHER_TOOL], temperature=0
    )
    assert r2.choices[0].message.content == "It is sunny and 21C in Paris."
    assert r2.choices[0].finish_reason == "stop"
    loop = [
        ("user", "Weather in Paris?", None),
        ("analysis", "Need the weather.", None),
        ("call", '{"city":"Paris"}', "get_weather"),
        ("tool", "sunny, 21C", "get_weather"),
    ]
    assert last_prompt_with(model, tok, "sunny, 21C") == harmony_prompt(
        hx, loop, tools=[WEATHER_TOOL]
    ), "the open tool loop keeps its analysis"
    # After the final answer the next turn drops that analysis, as harmony does.
    third = second + [
        r2.choices[0].message.model_dump(exclude_none=True),
        {"role": "user", "content": "Thanks!"},
    ]
    r3 = client.chat.completions.create(
        model=MODEL, messages=third, tools=[WEATHER_TOOL], temperature=0
    )
    assert r3.choices[0].message.content == "You are welcome."
    done = [loop[0], *loop[2:], ("final", "It is sunny and 21C in Paris.", None)]
    done.append(("user", "Thanks!", None))
    assert last_prompt_with(model, tok, "Thanks!") == harmony_prompt(hx, done, tools=[WEATHER_TOOL])


def test_streamed_tool_call_is_one_chunk_with_index_id_and_name(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "temperature": 0,
        "stream": True,
    }
    data = sse_chunks(server[0], body)[:-1]
    calls = [
        c["choices"][0]["delta"]["tool_calls"]
        for c in data
        if "tool_calls" in c["choices"][0]["delta"]
    ]
    assert len(calls) == 1
    (call,) = calls[0]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert data[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("key", ["reasoning", "reasoning_content", "thinking"])
def test_reasoning_comes_back_under_each_spelling(client, model, tok, hx, key):
    question = f"Weather in Paris ({key})?"  # a prompt of its own: no exact cache hit
    messages = [
        {"role": "user", "content": question},
        {
            "role": "assistant",
            "content": None,
            key: "Need the weather.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=4
    )
    loop = [
        ("user", question, None),
        ("analysis", "Need the weather.", None),
        ("call", '{"city":"Paris"}', "get_weather"),
        ("tool", "sunny, 21C", "get_weather"),
    ]
    assert last_prompt_with(model, tok, "sunny, 21C") == harmony_prompt(
        hx, loop, tools=[WEATHER_TOOL]
    )


def test_a_call_to_a_tool_we_do_not_run_is_refused_inside_the_turn(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Search the web"}],
        temperature=0,
        max_tokens=60,
    )
    assert r.choices[0].message.content == "I cannot browse."
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"


def test_a_call_cut_off_by_max_tokens_is_not_a_call(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        temperature=0,
        max_tokens=20,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.tool_calls is None
    assert r.usage.completion_tokens == 20


def test_tool_choice_none_keeps_the_tools_and_forbids_calls(client, model, tok, hx):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        temperature=0,
        max_tokens=40,
    )
    # The script tries to call get_weather; the grammar allows only an answer.
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")
    expected = harmony_prompt(hx, [("user", "Weather in Paris?", None)], tools=[WEATHER_TOOL])
    assert last_prompt_with(model, tok, "Weather in Paris?")[: len(expected)] == expected


# --------------------------------------------------------------------------- structured outputs

ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
CITY = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
STRICT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "parameters": CITY, "strict": True}},
]


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_schema_answer_validates(client, stream):
    """The script writes the analysis and the final header; the random model's JSON is what the
    grammar lets through, and jsonschema (the oracle) must accept it."""
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Answer in JSON"}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}},
        temperature=0,
        max_tokens=60,
    )
    if stream:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**kw, stream=True)
            if c.choices
        )
    else:
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), ANSWER)


@pytest.mark.parametrize(
    "choice,names",
    [
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ],
)
def test_tool_choice_forces_a_valid_call(client, choice, names):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Call a tool"}],
        tools=STRICT_TOOLS,
        tool_choice=choice,
        temperature=0,
        max_tokens=60,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), CITY)


# --------------------------------------------------------------------------- other fields


def test_stop_sequences_cut_the_answer_streamed_and_not(client, server):
    messages = [{"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, stop=["there"]
    )
    assert r.choices[0].message.content == "Hello "
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.reasoning == "The user greets."  # stops match the answer only
    body = {"model": MODEL, "messages": messages, "temperature": 0, "stop": "there", "stream": True}
    data = sse_chunks(server[0], body)[:-1]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in data if c["choices"])
    assert text == "Hello "


def test_reasoning_exclude_and_effort(client, model, tok):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi"}],
        temperature=0,
        reasoning_effort="high",
        extra_body={"reasoning": {"exclude": True}},
    )
    msg = r.choices[0].message
    assert msg.content == "Hello there!"
    assert (
        getattr(msg, "reasoning", None) is None and getattr(msg, "reasoning_content", None) is None
    )
    assert tok.encode("Reasoning: high") and last_prompt_with(model, tok, "Reasoning: high")


def test_seeded_sampling_is_reproducible(client):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        max_tokens=6,
    )
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b and a


# --------------------------------------------------------------------------- concurrency


PROMPTS = [f"Question number {i}: {'why ' * 3 * i}is the sky blue?" for i in range(4)]


def test_concurrent_streams_equal_serial_greedy_runs(client):
    def run(prompt: str) -> tuple[str, int]:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return text, usage

    serial = [run(p) for p in PROMPTS]
    results: dict[int, tuple[str, int]] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, run(PROMPTS[i])))
        for i in range(len(PROMPTS))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(PROMPTS))] == serial
    assert all(n == 12 for _, n in serial)


def test_a_disconnect_frees_its_slot(server):
    url, state = server
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long essay"}],
        "temperature": 0,
        "max_tokens": 900,
        "stream": True,
    }
    with sse_stream(url, "/v1/chat/completions", body) as lines:
        seen = [line for _, line in zip(range(8), lines, strict=False) if line]
        assert len(seen) == 4  # the role chunk, then tokens
        assert state.scheduler.stats["active"] == 1
    # Closed mid-stream: the sequence leaves the batch within a step, long before 900 tokens.
    assert wait_until(lambda: state.scheduler.stats["active"] == 0, timeout=5)
    # A non-streamed request whose client gives up is cancelled too.
    with pytest.raises(TimeoutError):
        request(url, "POST", "/v1/chat/completions", {**body, "stream": False}, timeout=0.5)
    assert wait_until(lambda: state.scheduler.stats["active"] == 0, timeout=5)
    assert request(url, "GET", "/health")[2]["queued"] == 0


def test_a_multi_turn_chat_prefills_only_its_new_tokens(client):
    """Clients resend the whole conversation each turn; the prompt cache restores the previous
    turn's prompt, so turn N+1 reports all of turn N's prompt as cached."""
    messages = []
    previous = None
    for turn in range(4):
        messages.append({"role": "user", "content": f"Turn {turn}: tell me more about tides."})
        r = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=6
        )
        u = r.usage
        if previous is not None:
            assert u.prompt_tokens_details.cached_tokens == previous, (turn, u)
            assert u.prompt_tokens - u.prompt_tokens_details.cached_tokens < 40
        previous = u.prompt_tokens
        messages.append(r.choices[0].message.model_dump(exclude_none=True))
