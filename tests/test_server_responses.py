"""`/v1/responses` through a live server, the real scheduler and a tiny real model, driven by the
official `openai` client: the event order its `responses.stream()` checks, function calls, the
tool loop through `previous_response_id` and statelessly (Codex's way: `store: false` and
`reasoning.encrypted_content`), stored responses, incomplete and failed responses.

As in test_server_chat.py, `ScriptedModel` makes the model answer in harmony, and the prompt it
saw is compared with openai-harmony's rendering of the same conversation.
"""

from __future__ import annotations

import json
import logging

import jsonschema
import pytest

from conftest import make_tiny_config
from scripted_chat import WEATHER_TOOL, final_answer, ids, tool_call
from server_support import (
    ScriptedModel,
    harmony_prompt,
    last_prompt_with,
    serving,
    sse_payloads,
)
from vocabs import needs_real_vocab

openai = pytest.importorskip("openai")
pytestmark = needs_real_vocab("the server renders and parses harmony with the real tokens")

MODEL = "gpt-oss-20b"
CONTEXT = 1024
WEATHER = {  # the Responses API's flat function tool
    "type": "function",
    "name": "get_weather",
    "description": WEATHER_TOOL["function"]["description"],
    "parameters": WEATHER_TOOL["function"]["parameters"],
}
SHELL_TOOL = {
    "type": "function",
    "function": {
        "name": "shell",
        "description": "Run a shell command.",
        "parameters": {
            "type": "object",
            "properties": {"cmd": {"type": "string"}},
            "required": ["cmd"],
        },
    },
}
SHELL = {"type": "function", **SHELL_TOOL["function"]}


def preamble_then_call(tok):
    """Analysis, a commentary preamble to the user, then a call (what Codex sees gpt-oss do)."""
    return ids(
        tok,
        "<|channel|>", "analysis", "<|message|>", "Look at the file.", "<|end|>",
        "<|start|>", "assistant", "<|channel|>", "commentary", "<|message|>",
        "Let me read the file.", "<|end|>",
        "<|start|>", "assistant", " to=functions.shell", "<|channel|>", "commentary ",
        "<|constrain|>", "json", "<|message|>", '{"cmd":"cat a.py"}', "<|call|>",
    )  # fmt: skip


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
    m.add("Fix the bug in a.py", preamble_then_call(tok))
    m.add("print(1)", final_answer(tok, "It prints 1.", "Done."))
    m.add("Answer in JSON", ids(tok, "<|channel|>", "final", "<|message|>"))
    return m


@pytest.fixture(scope="module")
def server(model, tok):
    with serving(model, tok, max_context=CONTEXT, max_concurrency=2) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hx():
    return pytest.importorskip("openai_harmony")


def squeeze(types: list[str]) -> list[str]:
    """Event types with runs of the same delta event collapsed to one."""
    out: list[str] = []
    for t in types:
        if not (t.endswith(".delta") and out and out[-1] == t):
            out.append(t)
    return out


ITEM = ["response.output_item.added", "response.content_part.added"]
ITEM_END = ["response.content_part.done", "response.output_item.done"]


# --------------------------------------------------------------------------- streaming


def test_stream_events_come_in_the_order_openai_checks(client):
    with client.responses.stream(model=MODEL, input="Say hi", temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert squeeze([e.type for e in events]) == [
        "response.created",
        "response.in_progress",
        *ITEM,
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        *ITEM_END,
        *ITEM,
        "response.output_text.delta",
        "response.output_text.done",
        *ITEM_END,
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "Hello there!"
    reasoning, message = final.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert [c.text for c in reasoning.content] == ["The user greets."]
    assert message.type == "message" and message.status == "completed"
    assert final.status == "completed" and final.id.startswith("resp_")
    u = final.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.output_tokens_details.reasoning_tokens > 0
    assert u.input_tokens_details.cached_tokens >= 0
    # Every output_index is the item's position in `output`.
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.output_index for e in added] == [0, 1]
    assert [e.item.id for e in added] == [item.id for item in final.output]


def test_not_streamed_equals_streamed(client):
    r = client.responses.create(model=MODEL, input="Say hi", temperature=0)
    assert r.output_text == "Hello there!"
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "The user greets."
    assert r.output[0].encrypted_content is None  # only when included


def test_function_call_events_and_item(client, server):
    body = {
        "model": MODEL,
        "input": "Weather in Paris?",
        "tools": [WEATHER],
        "temperature": 0,
        "stream": True,
    }
    events = sse_payloads(server[0], "/v1/responses", body)
    types = squeeze([e["type"] for e in events])
    assert types[-1] == "response.completed"
    call_events = types[types.index("response.function_call_arguments.delta") - 1 :]
    assert call_events == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = [e for e in events if e["type"] == "response.output_item.done"][-1]["item"]
    assert done["type"] == "function_call" and done["status"] == "completed"
    assert (done["name"], done["arguments"]) == ("get_weather", '{"city":"Paris"}')
    assert done["call_id"].startswith("call_") and done["id"].startswith("fc_")
    completed = events[-1]["response"]
    assert completed["output"][-1] == done


# --------------------------------------------------------------------------- tool loops


def test_previous_response_id_continues_the_tool_loop(client, model, tok, hx):
    r1 = client.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input="Weather in Paris?",
        tools=[WEATHER],
        temperature=0,
    )
    (call,) = [i for i in r1.output if i.type == "function_call"]
    r2 = client.responses.create(
        model=MODEL,
        previous_response_id=r1.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}],
        tools=[WEATHER],
        temperature=0,
    )
    assert r2.output_text == "It is sunny and 21C in Paris."
    assert r2.previous_response_id == r1.id
    # The stored turn kept its reasoning (the loop is open); instructions are not inherited.
    loop = [
        ("user", "Weather in Paris?", None),
        ("analysis", "Need the weather.", None),
        ("call", '{"city":"Paris"}', "get_weather"),
        ("tool", "sunny, 21C", "get_weather"),
    ]
    assert last_prompt_with(model, tok, "sunny, 21C") == harmony_prompt(
        hx, loop, tools=[WEATHER_TOOL]
    )
    # Stored responses: retrieve, delete, then they are unknown.
    assert client.responses.retrieve(r2.id).output_text == r2.output_text
    client.responses.delete(r2.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r2.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, previous_response_id=r2.id, input="Thanks")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r2.id)


def test_codex_like_stateless_round_trip_keeps_the_chain_of_thought(
    server, client, model, tok, hx, caplog
):
    """Codex sends the whole history every turn with `store: false`, builds it from the
    `output_item.done` items, and echoes reasoning items back (here without their `content`, so
    `encrypted_content` alone must carry the chain of thought)."""
    instructions = "You are a coding agent."
    tools = [SHELL, {"type": "web_search"}, {"type": "custom", "name": "apply_patch"}]
    history = [
        {"type": "message", "role": "developer", "content": "Work in /repo."},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Fix the bug in a.py"}],
        },
    ]
    body = {
        "model": MODEL,
        "instructions": instructions,
        "input": history,
        "tools": tools,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "low", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "conversation-1",
        "temperature": 0,
    }
    with caplog.at_level(logging.WARNING, logger="gptoss_mlx.server"):
        events = sse_payloads(server[0], "/v1/responses", body)
    assert "custom, web_search" in caplog.text  # skipped tools are logged, not refused
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    items = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call"]
    reasoning, preamble, call = items
    assert reasoning["encrypted_content"].startswith("gptoss-mlx:v1:")
    assert (
        preamble["phase"] == "commentary"
        and preamble["content"][0]["text"] == "Let me read the file."
    )
    assert call["name"] == "shell"
    # Not stored.
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(events[-1]["response"]["id"])
    echoed = {k: v for k, v in reasoning.items() if k != "content"}
    history += [echoed, preamble, call]
    history.append(
        {"type": "function_call_output", "call_id": call["call_id"], "output": "print(1)"}
    )
    events = sse_payloads(server[0], "/v1/responses", {**body, "input": history})
    assert events[-1]["response"]["output"][-1]["content"][0]["text"] == "Done."
    loop = [
        ("user", "Fix the bug in a.py", None),
        ("analysis", "Look at the file.", None),
        ("commentary", "Let me read the file.", None),
        ("call", '{"cmd":"cat a.py"}', "shell"),
        ("tool", "print(1)", "shell"),
    ]
    expected = harmony_prompt(
        hx, loop, effort="low", tools=[SHELL_TOOL], instructions=f"{instructions}\n\nWork in /repo."
    )
    assert last_prompt_with(model, tok, "print(1)") == expected


def test_text_format_holds_the_answer_to_its_schema(client):
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}
    r = client.responses.create(
        model=MODEL,
        input="Answer in JSON",
        text={"format": fmt},
        temperature=0,
        max_output_tokens=40,
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)


# --------------------------------------------------------------------------- endings


def test_max_output_tokens_makes_an_incomplete_response(client, server):
    r = client.responses.create(model=MODEL, input="Say hi", temperature=0, max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5
    body = {"model": MODEL, "input": "Say hi", "max_output_tokens": 5, "stream": True}
    events = sse_payloads(server[0], "/v1/responses", body)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_prompt_longer_than_the_context(client, server):
    text = "word " * 2000
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=text)
    assert e.value.body["code"] == "context_length_exceeded"
    # Streamed, it is a response.failed after response.created: Codex compacts on this code.
    events = sse_payloads(
        server[0], "/v1/responses", {"model": MODEL, "input": text, "stream": True}
    )
    assert [e["type"] for e in events] == ["response.created", "response.failed"]
    assert events[-1]["response"]["error"]["code"] == "context_length_exceeded"
    assert events[-1]["response"]["status"] == "failed"


def test_effort_and_developer_items_reach_the_prompt(client, model, tok, hx):
    client.responses.create(
        model=MODEL,
        input=[
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Say hi"},
        ],
        reasoning={"effort": "high"},
        temperature=0,
        max_output_tokens=3,
    )
    expected = harmony_prompt(
        hx, [("user", "Say hi", None)], effort="high", instructions="Answer in French."
    )
    assert last_prompt_with(model, tok, "Answer in French.") == expected
