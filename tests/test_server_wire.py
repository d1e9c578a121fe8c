"""The server's wire pieces on their own: stop sequences, the reasoning blob, Responses input items
-> chat messages, the response store, and harmony tokens -> stream events (checked against the
library's own parse of the same completion)."""

from __future__ import annotations

import base64
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gptoss_mlx.errors import UsageError
from gptoss_mlx.server.errors import APIError, field_of
from gptoss_mlx.server.reasoning_blob import PREFIX, decode_reasoning, encode_reasoning
from gptoss_mlx.server.response_store import ResponseStore
from gptoss_mlx.server.responses_request import input_messages
from gptoss_mlx.server.stop_strings import StopMatcher

# --------------------------------------------------------------------------- stop sequences


def run_stops(stops, pieces):
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces) + m.flush()
    return out, m.stopped


def test_a_stop_split_across_pieces_is_found_and_cut():
    assert run_stops(["END"], ["abc E", "N", "D tail"]) == ("abc ", True)
    assert run_stops(["\n\n"], ["one\n", "\ntwo"]) == ("one", True)


def test_text_that_only_looks_like_a_stop_comes_through():
    assert run_stops(["END"], ["abc E", "NX"]) == ("abc ENX", False)
    assert run_stops(["END"], ["abc EN"]) == ("abc EN", False)  # flushed at the end


def test_the_earliest_stop_wins():
    assert run_stops(["b", "a"], ["xxab"]) == ("xx", True)


@given(
    text=st.text("abAB", max_size=30),
    stops=st.lists(st.text("abAB", min_size=1, max_size=3), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
def test_stop_matching_equals_cutting_the_whole_text(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = (text[: min(hits)], True) if hits else (text, False)
    assert run_stops(stops, pieces) == expected


# --------------------------------------------------------------------------- reasoning blob


@given(st.text())
def test_the_reasoning_blob_round_trips(text):
    blob = encode_reasoning(text)
    assert blob.startswith(PREFIX) and blob.isascii()
    assert decode_reasoning(blob, "x") == text


@pytest.mark.parametrize(
    "blob",
    [
        "gAAAAABopenai-encrypted",
        PREFIX + "!!!",
        PREFIX + base64.urlsafe_b64encode(b"not zlib").decode(),
        PREFIX + base64.urlsafe_b64encode(zlib.compress(b"\xff\xfe"))[:-4].decode(),
        PREFIX + base64.urlsafe_b64encode(zlib.compress(b"\xff\xfe")).decode(),
    ],
)
def test_a_blob_we_did_not_make_is_refused_naming_the_field(blob):
    with pytest.raises(UsageError, match=r"^input\[2\]\.encrypted_content: "):
        decode_reasoning(blob, "input[2].encrypted_content")


def test_a_zip_bomb_is_refused():
    blob = PREFIX + base64.urlsafe_b64encode(zlib.compress(b"a" * (17 << 20))).decode()
    with pytest.raises(UsageError, match="corrupt"):
        decode_reasoning(blob, "x")


# --------------------------------------------------------------------------- input items


def test_assistant_items_of_one_turn_form_one_message():
    call = {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"}
    items = [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "R1"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "P"}]},
        call,
        {"type": "function_call_output", "call_id": "c1", "output": "out"},
        {"type": "reasoning", "summary": [], "encrypted_content": encode_reasoning("R2")},
        {"type": "message", "role": "assistant", "content": "Final."},
        {"role": "developer", "content": [{"type": "input_text", "text": "D"}]},
    ]
    assert input_messages(items, {}) == [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "P",
            "reasoning_content": "R1",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "shell", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "shell", "content": "out"},
        {"role": "assistant", "content": "Final.", "reasoning_content": "R2"},
        {"role": "developer", "content": "D"},
    ]


def test_an_output_for_a_call_of_a_stored_response_is_named_after_it():
    items = [{"type": "function_call_output", "call_id": "c7", "output": "x"}]
    assert input_messages(items, {"c7": "lookup"})[0]["name"] == "lookup"
    with pytest.raises(APIError) as e:
        input_messages(items, {})
    assert e.value.param == "input[0].call_id"


def test_a_string_input_is_a_user_message():
    assert input_messages("hello", {}) == [{"role": "user", "content": "hello"}]


# --------------------------------------------------------------------------- store and errors


def test_the_response_store_is_a_bounded_lru():
    store = ResponseStore(max_entries=2)
    for i in range(3):
        store.put({"id": f"r{i}"}, [])
        if i == 1:
            assert store.get("r0") is not None  # r0 becomes the most recent
    assert [store.get(k) is not None for k in ("r0", "r1", "r2")] == [True, False, True]
    assert store.delete("r0") and not store.delete("r0") and len(store) == 1
    small = ResponseStore(max_bytes=100)
    small.put({"id": "a", "x": "y" * 200}, [])
    assert len(small) == 0  # larger than the whole budget: not kept


@pytest.mark.parametrize(
    "message,field",
    [
        ("messages[2].role: unknown role 'bot'", "messages[2].role"),
        ("temperature: must be in [0, 100], got 500", "temperature"),
        ("top_p must be in (0, 1], got 0", "top_p"),
        ("the prompt has 5 tokens", None),
    ],
)
def test_the_field_is_read_from_a_one_line_error(message, field):
    assert field_of(message) == field
