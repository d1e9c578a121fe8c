"""Structured outputs through the live server, driven by the official `openai` client.

A tiny random-weight model with the real vocabulary writes noise; the grammar alone must make
every answer parse and validate (the oracle is `jsonschema`). The table of schemas, the strict
tools, the Responses API's `text.format`, `--strict-tools`, and `max_reasoning_tokens` (our
extension of both APIs, sent as `extra_body`), streamed and not.
"""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_config
from server_support import serving
from structured_cases import PARAMETERS, SCHEMAS, TOOLS, WEATHER, response_format, validate
from vocabs import needs_real_vocab

openai = pytest.importorskip("openai")
pytestmark = needs_real_vocab("the server renders and parses harmony with the real tokens")

MODEL = "gpt-oss-20b"
FAST = {"max_reasoning_tokens": 2}  # a short reasoning, then the answer


@pytest.fixture(scope="module")
def tok():
    from gptoss_mlx.harmony.tokenizer import load_default_tokenizer

    return load_default_tokenizer()


@pytest.fixture(scope="module")
def model():
    from gptoss_mlx.convert.synthetic import random_model

    return random_model(make_tiny_config(num_hidden_layers=2, vocab_size=201088), seed=0)


@pytest.fixture(scope="module")
def client(model, tok):
    with serving(model, tok, max_context=1024, max_concurrency=4) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def chat(client, name: str, **kw):
    kw = {"temperature": 1.0, "seed": 5, "max_tokens": 160, "extra_body": FAST, **kw}
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Answer as {name}."}],
        response_format=response_format(name),
        **kw,
    )


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_chat_completion_validates(client, name):
    r = chat(client, name)
    assert r.choices[0].finish_reason == "stop"
    validate(r.choices[0].message.content, SCHEMAS[name])
    assert not r.choices[0].message.tool_calls


@pytest.mark.parametrize("name", ["nested", "anyOf", "format"])
def test_streamed_answers_validate_once_joined(client, name):
    chunks = list(chat(client, name, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    validate(text, SCHEMAS[name])


@pytest.mark.parametrize("name", ["enum", "numbers"])
def test_responses_text_format_validates(client, name):
    fmt = {"type": "json_schema", "name": name, "schema": SCHEMAS[name], "strict": True}
    r = client.responses.create(
        model=MODEL,
        input=f"Answer as {name}.",
        text={"format": fmt},
        temperature=0,
        max_output_tokens=160,
        extra_body=FAST,
    )
    assert r.status == "completed"
    validate(r.output_text, SCHEMAS[name])


@pytest.mark.parametrize("seed", [1, 2])
def test_required_tool_calls_validate_against_their_tool(client, seed):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather and time in Oslo?"}],
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=seed,
        max_tokens=160,
        extra_body=FAST,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    validate(call.function.arguments, PARAMETERS[call.function.name])


def test_strict_tools_server_holds_tools_that_did_not_ask(model, tok):
    loose = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    with serving(model, tok, max_context=1024, strict_tools=True) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=loose,
            tool_choice="required",
            temperature=0,
            max_tokens=160,
            extra_body={"max_reasoning_tokens": 0},
        )
    (call,) = r.choices[0].message.tool_calls
    validate(call.function.arguments, WEATHER)


def test_max_reasoning_tokens_zero_answers_at_once(client):
    r = chat(client, "enum", extra_body={"max_reasoning_tokens": 0})
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    assert not getattr(r.choices[0].message, "reasoning_content", None)
    validate(r.choices[0].message.content, SCHEMAS["enum"])


def test_a_cut_off_answer_is_length_and_partial(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A user"}],
        response_format=response_format("nested"),
        temperature=0,
        max_tokens=8,
        extra_body={"max_reasoning_tokens": 0},
    )
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)


@pytest.mark.parametrize("value", [-1, "many"])
def test_a_bad_reasoning_budget_is_a_400_naming_it(client, value):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "enum", extra_body={"max_reasoning_tokens": value})
    assert "max_reasoning_tokens" in str(e.value)
