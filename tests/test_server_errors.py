"""Bad input and failures through a live server: every error is OpenAI's envelope with the right
status and the field named, no traceback ever reaches a client, and the server keeps serving.

The server here has an API key, one decoding slot and one queue place (so 503 is reachable), a
256-token context and a 64 KiB body limit. Its model fails on cue: a script entry NAN gives NaN
logits at that step (tests/server_support.py).
"""

from __future__ import annotations

import json
import logging
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_config
from scripted_chat import final_answer, ids
from server_support import (
    NAN,
    ScriptedModel,
    live_server,
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
KEY = "sk-test-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 64 * 1024
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"


@pytest.fixture(scope="module")
def tok():
    from gptoss_mlx.harmony.tokenizer import load_default_tokenizer

    return load_default_tokenizer()


@pytest.fixture(scope="module")
def server(tok):
    from gptoss_mlx.convert.synthetic import random_model

    inner = random_model(make_tiny_config(num_hidden_layers=2, vocab_size=201088), seed=0)
    model = ScriptedModel(inner, tok)
    model.add("Say hi", final_answer(tok, "The user greets.", "Hello there!"))
    model.add("make nan", [NAN])
    model.add("nan later", ids(tok, "<|channel|>", "final", "<|message|>", "Hello") + [NAN])
    with serving(
        model,
        tok,
        max_context=256,
        max_concurrency=1,
        max_queue=1,
        api_key=KEY,
        app_kwargs={"max_body_bytes": BODY_LIMIT},
    ) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def chat_body(**kw):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2}
    body.update(kw)
    return body


def assert_envelope(status, body, expected_status, param=None, code=None):
    """OpenAI's error envelope, one line, no traceback; `param` named in it and its message."""
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"] and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
        assert err["message"].startswith(param), err
    if code is not None:
        assert err["code"] == code, err
    return err


# --------------------------------------------------------------------------- auth, model, size


def test_every_endpoint_but_health_needs_the_key(server, client):
    url = server[0]
    status, _, body = request(url, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    for path in ("/v1/models", "/v1/responses/resp_x"):
        status, headers, body = request(url, "GET", path)
        assert_envelope(status, body, 401, code="invalid_api_key")
        assert headers["www-authenticate"] == "Bearer"
    wrong = {"Authorization": "Bearer " + "x" * len(KEY)}  # same length: only the bytes differ
    assert_envelope(*request(url, "POST", CHAT, chat_body(), wrong)[::2], 401)
    assert_envelope(*request(url, "POST", RESPONSES, {"model": MODEL, "input": "x"})[::2], 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize(
    "name", ["gpt-oss-20b", "gpt-oss:20b", "openai/gpt-oss-20b", "GPT-OSS-20B"]
)
def test_the_common_spellings_of_the_model_are_accepted(client, name):
    r = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Say hi"}], max_tokens=1
    )
    assert r.model == MODEL


@pytest.mark.parametrize("name", ["llama3", "/etc/passwd", "../gpt-oss-20b", ""])
def test_an_unknown_model_is_a_404_naming_the_served_ids(server, name):
    for path, body in ((CHAT, chat_body(model=name)), (RESPONSES, {"model": name, "input": "x"})):
        status, _, out = request(server[0], "POST", path, body, AUTH)
        err = assert_envelope(status, out, 404, param="model", code="model_not_found")
        assert "'gpt-oss-20b', 'gpt-oss:20b', 'openai/gpt-oss-20b'" in err["message"]


def test_a_body_over_the_limit_is_413(server):
    big = chat_body(messages=[{"role": "user", "content": "x" * (BODY_LIMIT + 10)}])
    status, _, body = request(server[0], "POST", CHAT, big, AUTH)
    assert_envelope(status, body, 413, code="request_too_large")
    assert request(server[0], "GET", "/health")[0] == 200


# --------------------------------------------------------------------------- bad requests

BAD_CHAT = [
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", None),
    ({"messages": None}, "messages", None),
    ({"temperature": "hot"}, "temperature", None),
    ({"temperature": 500}, "temperature", None),
    ({"top_p": 0}, "top_p", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"n": 2}, "n", "unsupported_parameter"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
    ({"logit_bias": {"42": 3}}, "logit_bias", "unsupported_parameter"),
    ({"functions": []}, "functions", "unsupported_parameter"),
    ({"bogus": 1}, "bogus", "unsupported_parameter"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True}},
            }
        },
        "response_format.schema",
        None,
    ),
    ({"response_format": {"type": "yaml"}}, "response_format.type", None),
    ({"tool_choice": "required"}, "tool_choice", None),  # no tools to call
    (
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "tool_choice",
        None,
    ),
    ({"reasoning_effort": "extreme"}, "reasoning_effort", None),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),
    (
        {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
        "tools[0].function.name",
        None,
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0].type",
        None,
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "c9", "content": "r"},
            ]
        },
        "messages[1].tool_call_id",
        None,
    ),
]

BAD_RESPONSES = [
    ({"input": [{"type": "bogus"}]}, "input[0].type", None),
    (
        {"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]},
        "input[0].call_id",
        None,
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
        "input[0].content[0].type",
        None,
    ),
    ({"include": ["message.output_text.logprobs"]}, "include[0]", "unsupported_parameter"),
    (
        {
            "text": {
                "format": {
                    "type": "json_schema",
                    "name": "x",
                    "schema": {"type": "array", "uniqueItems": True},
                }
            }
        },
        "text.format.schema",
        None,
    ),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", None),
    ({"tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice", None),
    ({"reasoning": {"effort": "minimal"}}, "reasoning.effort", None),
    ({"background": True}, "background", "unsupported_parameter"),
    ({"conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ({"tools": [{"type": "function", "name": "a b"}]}, "tools[0].name", None),
    ({"max_output_tokens": -1}, "max_output_tokens", None),
    (
        {
            "input": [
                {"role": "user", "content": "x"},
                {"type": "reasoning", "summary": [], "encrypted_content": "gAAAAB-openai"},
            ]
        },
        "input[1].encrypted_content",
        None,
    ),
]


@pytest.mark.parametrize("change,param,code", BAD_CHAT, ids=[c[1] for c in BAD_CHAT])
def test_a_bad_chat_request_is_400_naming_the_field(server, change, param, code):
    status, _, body = request(server[0], "POST", CHAT, chat_body(**change), AUTH)
    assert_envelope(status, body, 400, param=param, code=code)


@pytest.mark.parametrize("change,param,code", BAD_RESPONSES, ids=[c[1] for c in BAD_RESPONSES])
def test_a_bad_responses_request_is_400_naming_the_field(server, change, param, code):
    body = {"model": MODEL, "input": "Say hi", "max_output_tokens": 2, **change}
    status, _, out = request(server[0], "POST", RESPONSES, body, AUTH)
    assert_envelope(status, out, 400, param=param, code=code)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b'"text"', b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_400(server, raw):
    for path in (CHAT, RESPONSES):
        status, _, body = request(server[0], "POST", path, raw, AUTH)
        assert_envelope(status, body, 400)


def test_a_prompt_longer_than_the_context_is_400(server):
    body = chat_body(messages=[{"role": "user", "content": "word " * 400}])
    status, _, out = request(server[0], "POST", CHAT, body, AUTH)
    assert_envelope(status, out, 400, code="context_length_exceeded")


def test_unknown_paths_and_methods(server):
    assert_envelope(*request(server[0], "GET", "/v1/nothing", headers=AUTH)[::2], 404)
    assert_envelope(*request(server[0], "PUT", CHAT, chat_body(), AUTH)[::2], 405)
    status, _, out = request(server[0], "GET", "/v1/responses/resp_unknown", headers=AUTH)
    assert_envelope(status, out, 404, code="not_found")


# --------------------------------------------------------------------------- load and failures


def test_a_full_queue_is_503_with_retry_after(server):
    url, state = server
    long = chat_body(
        messages=[{"role": "user", "content": "Write an essay"}], max_tokens=150, stream=True
    )
    with sse_stream(url, CHAT, long, AUTH) as running, sse_stream(url, CHAT, long, AUTH):
        next(running)
        assert wait_until(lambda: state.scheduler.stats["queued"] == 1)
        status, headers, body = request(url, "POST", CHAT, chat_body(), AUTH)
        assert_envelope(status, body, 503, code="server_busy")
        assert int(headers["retry-after"]) >= 1
    assert wait_until(
        lambda: state.scheduler.stats["active"] + state.scheduler.stats["queued"] == 0
    )
    assert request(url, "POST", CHAT, chat_body(), AUTH)[0] == 200


def test_a_queued_response_is_created_before_its_prefill(server):
    """Codex's idle timer counts parsed events: response.created and response.in_progress come
    while the request still waits for a slot, before any token."""
    url, state = server
    long = chat_body(
        messages=[{"role": "user", "content": "Write an essay"}], max_tokens=150, stream=True
    )
    queued = {"model": MODEL, "input": "Say hi", "stream": True, "max_output_tokens": 2}
    with sse_stream(url, CHAT, long, AUTH) as running:
        next(running)
        with sse_stream(url, RESPONSES, queued, AUTH) as lines:
            head = [line for _, line in zip(range(5), lines, strict=False)]
            assert state.scheduler.stats["queued"] == 1  # still no slot: nothing prefilled
    assert head[0] == "event: response.created" and head[3] == "event: response.in_progress"
    assert wait_until(
        lambda: state.scheduler.stats["active"] + state.scheduler.stats["queued"] == 0
    )


def test_nan_logits_fail_that_request_only(server, client):
    body = chat_body(messages=[{"role": "user", "content": "make nan"}])
    status, _, out = request(server[0], "POST", CHAT, body, AUTH)
    assert_envelope(status, out, 500, code="non_finite_logits")
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], temperature=0
    )
    assert r.choices[0].message.content == "Hello there!"


def test_an_error_mid_stream_is_an_error_chunk(server, client):
    url = server[0]
    body = chat_body(
        messages=[{"role": "user", "content": "nan later"}], stream=True, max_tokens=20
    )
    payloads = sse_payloads(url, CHAT, body, AUTH)
    assert payloads[-1] == "[DONE]"
    assert payloads[-2]["error"]["code"] == "non_finite_logits"
    assert "Hello" in "".join(
        p["choices"][0]["delta"].get("content") or "" for p in payloads[:-2] if p.get("choices")
    )
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(**{**body, "messages": body["messages"]}):
            pass
    resp = {"model": MODEL, "input": "nan later", "stream": True, "max_output_tokens": 20}
    events = sse_payloads(url, RESPONSES, resp, AUTH)
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "non_finite_logits"
    assert request(url, "GET", "/health")[2]["active"] == 0


def test_cors_is_off_unless_an_origin_is_given(server):
    from gptoss_mlx.server.app import create_app

    url, state = server
    preflight = {
        "Origin": "http://ui.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    _, headers, _ = request(url, "OPTIONS", CHAT, None, preflight)
    assert "access-control-allow-origin" not in headers
    with live_server(create_app(state, cors_origins=["http://ui.example"])) as cors_url:
        status, headers, _ = request(cors_url, "OPTIONS", CHAT, None, preflight)
        assert status == 200 and headers["access-control-allow-origin"] == "http://ui.example"
        other = {**preflight, "Origin": "http://evil.example"}
        _, headers, _ = request(cors_url, "OPTIONS", CHAT, None, other)
        assert "access-control-allow-origin" not in headers


def test_one_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="gptoss_mlx.server"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi"}], temperature=0
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "gptoss_mlx.server"]
    (line,) = [x for x in lines if "chat.completions" in x]
    assert re.fullmatch(
        r"chatcmpl-\w+ chat\.completions ok prompt=\d+ cached=\d+ completion=\d+ ttft=[\d.]+s "
        r"tokens/s=[\d.]+ finish=stop \([\d.]+s\)",
        line,
    ), line


# --------------------------------------------------------------------------- fuzzing

_text = st.text(string.printable + "é😀\u2028", max_size=20)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats(allow_nan=True) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", "bot"])},
    optional={
        "content": _text
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text})),
        "tool_call_id": _text,
        "name": _text,
        "reasoning": _text,
        "tool_calls": _json,
    },
)
_user = st.fixed_dictionaries({"role": st.just("user"), "content": _text})
_small = st.integers(1, 3)
_chat = st.fixed_dictionaries(
    {
        "model": st.sampled_from([MODEL, "gpt-oss:20b", "other"]),
        # Valid shapes often enough that the engine runs too, not only the validation.
        "messages": st.one_of(
            st.lists(_user, min_size=1, max_size=2), st.lists(_message, max_size=3), _json
        ),
        "max_tokens": st.one_of(_small, _small, _json),
    },
    optional={
        "temperature": _json,
        "top_p": _json,
        "stream": st.booleans(),
        "stop": _json,
        "tools": _json,
        "tool_choice": _json,
        "reasoning_effort": _json,
    },
)
_item = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["message", "reasoning", "function_call", "function_call_output", "x"]
        )
    },
    optional={
        "role": st.sampled_from(["user", "assistant", "developer", "tool"]),
        "content": _json,
        "call_id": _text,
        "name": _text,
        "arguments": _json,
        "output": _json,
        "encrypted_content": _text,
    },
)
_responses = st.fixed_dictionaries(
    {
        "model": st.sampled_from([MODEL, "other"]),
        "input": _text | st.lists(_item, max_size=3) | _json,
        "max_output_tokens": st.one_of(_small, _small, _json),
    },
    optional={
        "instructions": _json,
        "tools": _json,
        "stream": st.booleans(),
        "store": _json,
        "previous_response_id": _text,
        "reasoning": _json,
        "include": _json,
    },
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from([CHAT, RESPONSES]),
    chat=_chat,
    resp=_responses,
    extra=st.dictionaries(_text, _json, max_size=2),  # unknown fields
)
def test_generated_bodies_never_get_a_500_or_a_traceback(server, path, chat, resp, extra):
    body = {**extra, **(chat if path == CHAT else resp)}
    raw = json.dumps(body).encode()  # NaN and Infinity included, as Python's json writes them
    status, _, out = request(server[0], "POST", path, raw, AUTH)
    assert status in (200, 400, 404, 503), (status, out)
    text = out if isinstance(out, str) else json.dumps(out)
    assert "Traceback" not in text
    if status != 200:
        assert_envelope(status, out, status)
