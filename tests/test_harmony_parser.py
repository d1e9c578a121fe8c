"""Tests for the streaming harmony parser, on a fake byte-level vocabulary.

Fake vocabulary (vocabs.py): ids 0..255 are single bytes, so every multi-byte character arrives split across
tokens; the harmony control ids are the real ones; two reserved ids render as their names.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_mlx.harmony.parser import (
    ContentDelta,
    HarmonyStreamParser,
    Message,
    MessageEnd,
    MessageStart,
    build_result,
    message_kind,
    parse_completion,
)
from vocabs import CONTROL, IDS, RESERVED, fake_decode_bytes, real_vocab_dir, toks

S, E, M, C, K = IDS.start, IDS.end, IDS.message, IDS.channel, IDS.constrain
RET, CALL, EOT = IDS.return_, IDS.call, IDS.endoftext


def run(tokens: list[int], **kwargs) -> tuple[list, list[list]]:
    """Feed tokens; return all events and the events returned by each call."""
    parser = HarmonyStreamParser(fake_decode_bytes, **kwargs)
    per_call = [parser.feed(t) for t in tokens] + [parser.finish()]
    return [e for events in per_call for e in events], per_call


def messages(tokens: list[int], **kwargs) -> list[Message]:
    return [e.message for e in run(tokens, **kwargs)[0] if isinstance(e, MessageEnd)]


def test_analysis_then_final():
    stream = toks(C, "analysis", M, "thinking...", E, S, "assistant", C, "final", M, "Hi", RET)
    events, _ = run(stream)
    assert events[0] == MessageStart("assistant", "analysis")
    assert "".join(e.text for e in events[1:-3] if isinstance(e, ContentDelta)) == "thinking..."
    assert [m for m in messages(stream)] == [
        Message("assistant", "analysis", None, None, "thinking...", "end"),
        Message("assistant", "final", None, None, "Hi", "return"),
    ]
    result = parse_completion(stream, fake_decode_bytes)
    assert (result.final, result.reasoning, result.finish_reason) == ("Hi", "thinking...", "stop")
    assert result.tool_calls == [] and result.preambles == []


def test_multibyte_characters_split_across_tokens_are_never_halved():
    text = "é€😀 naïve"
    _, per_call = run(toks(C, "final", M, text, RET))
    calls = per_call[7:]  # after <|channel|>, the 5 bytes of "final" and <|message|>
    assert calls[0] == [] and calls[1] == [ContentDelta("é")]  # é is 2 bytes: nothing after 1
    assert calls[2:4] == [[], []] and calls[4] == [ContentDelta("€")]
    assert calls[5:8] == [[], [], []] and calls[8] == [ContentDelta("😀")]
    deltas = [e.text for call in calls for e in call if isinstance(e, ContentDelta)]
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)


def test_incomplete_utf8_at_message_end_is_replaced_not_dropped():
    stream = toks(C, "final", M, "a") + [0xE2, 0x82] + [E]
    (message,) = messages(stream)
    assert message.content == "a\ufffd"


def test_tool_call_recipient_in_channel_header():
    stream = toks(
        C, "commentary to=functions.get_weather ", K, "json", M, '{"location":"SF"}', CALL
    )
    (message,) = messages(stream)
    assert message == Message(
        "assistant",
        "commentary",
        "functions.get_weather",
        "<|constrain|>json",
        '{"location":"SF"}',
        "call",
    )
    result = parse_completion(stream, fake_decode_bytes, functions=["get_weather"])
    assert result.finish_reason == "tool_calls"
    assert result.tool_calls == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location":"SF"}'},
        }
    ]


def test_tool_call_recipient_in_role_header():
    # The prompt ended in `<|start|>assistant`; the model adds the recipient itself.
    stream = toks(" to=functions.lookup", C, "commentary json", M, '{"q":1}', CALL)
    assert messages(stream) == [
        Message("assistant", "commentary", "functions.lookup", "json", '{"q":1}', "call")
    ]
    # The same with a full header, starting between messages.
    stream = toks(S, "assistant to=functions.lookup", C, "commentary json", M, "{}", CALL)
    (message,) = messages(stream, role=None)
    assert (message.role, message.recipient, message.content_type) == (
        "assistant",
        "functions.lookup",
        "json",
    )


def test_tool_call_on_the_analysis_channel():
    stream = toks(C, "analysis to=functions.search ", K, "json", M, '{"q":"x"}', CALL)
    result = parse_completion(stream, fake_decode_bytes, functions=["search"])
    assert result.reasoning == "" and result.finish_reason == "tool_calls"
    assert result.tool_calls[0]["function"] == {"name": "search", "arguments": '{"q":"x"}'}
    assert message_kind(result.messages[0]) == "tool_call"


def test_preamble_then_tool_calls_with_counter_ids():
    stream = toks(
        C, "analysis", M, "Need weather.", E,
        S, "assistant", C, "commentary", M, "Checking both cities.", E,
        S, "assistant", C, "commentary to=functions.get_weather ", K, "json", M, '{"c":"SF"}', CALL,
        S, "assistant", C, "commentary to=browser.search", M, '{"c":"NY"}', CALL,
    )  # fmt: skip
    result = parse_completion(
        stream, fake_decode_bytes, id_prefix="call_7_", functions=["get_weather"]
    )
    assert result.preambles == ["Checking both cities."]
    assert result.reasoning == "Need weather."
    assert [(c["id"], c["function"]["name"]) for c in result.tool_calls] == [
        ("call_7_0", "get_weather")
    ]
    # Only a declared `functions.NAME` is a function call; the stream ends on another one.
    assert result.refused_calls == [{"recipient": "browser.search", "arguments": '{"c":"NY"}'}]
    assert result.final == "" and result.finish_reason == "stop"
    assert len(result.messages) == 4


def test_only_finished_calls_to_declared_functions_are_tool_calls():
    head = (C, "commentary to=functions.get_weather ", K, "json", M)
    declared = ["get_weather"]
    # A call cut off by max_tokens: unfinished, finish "length", not a call.
    cut = parse_completion(toks(*head, '{"city": "Pa'), fake_decode_bytes, functions=declared)
    assert (cut.tool_calls, cut.finish_reason) == ([], "length")
    assert cut.unfinished_calls == [
        {"recipient": "functions.get_weather", "arguments": '{"city": "Pa'}
    ]
    # Closed by <|end|> instead of <|call|>: not a call either.
    ended = parse_completion(toks(*head, "{}", E, S, "assistant", C, "final", M, "Hi", RET),
                             fake_decode_bytes, functions=declared)  # fmt: skip
    assert (ended.tool_calls, ended.final, ended.finish_reason) == ([], "Hi", "stop")
    assert ended.unfinished_calls == [{"recipient": "functions.get_weather", "arguments": "{}"}]
    # A finished call to a function nobody declared, or with none declared: refused.
    for functions in (["other"], []):
        refused = parse_completion(toks(*head, "{}", CALL), fake_decode_bytes, functions=functions)
        assert (refused.tool_calls, refused.finish_reason) == ([], "stop")
        assert refused.refused_calls == [{"recipient": "functions.get_weather", "arguments": "{}"}]


def test_result_joins_reasoning_and_reports_length():
    stream = toks(C, "analysis", M, "one", E, S, "assistant", C, "analysis", M, "two", E)
    stream += toks(S, "assistant", C, "final", M, "partial answ")
    result = parse_completion(stream, fake_decode_bytes)
    assert result.reasoning == "one\ntwo"
    assert result.final == "partial answ"
    assert result.finish_reason == "length"
    assert result.messages[-1].ended == "truncated"


def test_call_without_recipient_is_stop_not_tool_calls():
    result = parse_completion(toks(C, "commentary", M, "hm", CALL), fake_decode_bytes)
    assert result.finish_reason == "stop" and result.tool_calls == []
    assert result.preambles == ["hm"]


def test_build_result_from_messages():
    msgs = [
        Message("assistant", "final", None, None, "A", "end"),
        Message("user", "final", None, None, "hallucinated turn", "end"),
        Message("assistant", "final", None, None, "B", "return"),
    ]
    result = build_result(msgs, "return")
    assert result.final == "AB"  # the other role is kept in messages, not shown as final
    assert result.messages == msgs and message_kind(msgs[1]) == "other"


def test_stray_channel_inside_content_is_literal_text():
    stream = toks(C, "final", M, "a", C, "b", K, "c", M, "d", RET)
    assert messages(stream)[0].content == "a<|channel|>b<|constrain|>c<|message|>d"


def test_missing_message_token_header_runs_into_text():
    (message,) = messages(toks(C, "final The answer", RET))
    assert (message.channel, message.content, message.ended) == ("final", "The answer", "return")


def test_stream_ends_inside_the_header():
    (message,) = messages(toks(C, "analy"))
    assert (message.channel, message.content, message.ended) == ("analy", "", "truncated")
    (message,) = messages(toks(C, "commentary to=functions.f ", K, "js"))
    assert message.channel == "commentary"
    assert message.content == "to=functions.f <|constrain|>js"  # the raw header text is kept
    assert parse_completion(toks(C, "analy"), fake_decode_bytes).finish_reason == "length"


def test_return_right_after_end():
    stream = toks(C, "final", M, "Done", E, RET)
    assert messages(stream) == [Message("assistant", "final", None, None, "Done", "end")]
    assert parse_completion(stream, fake_decode_bytes).finish_reason == "stop"


def test_headerless_text_is_final_and_streams_at_once():
    for kwargs in ({}, {"role": None}):
        events, per_call = run(toks("Hello there", RET), **kwargs)
        assert per_call[0] == [MessageStart("assistant"), ContentDelta("H")]
        result = parse_completion(toks("Hello there", RET), fake_decode_bytes, **kwargs)
        assert result.final == "Hello there" and result.finish_reason == "stop"
    # Text after <|end|> with no new header.
    stream = toks(C, "analysis", M, "x", E, "loose text")
    result = parse_completion(stream, fake_decode_bytes)
    assert result.final == "loose text" and result.messages[1].ended == "truncated"


def test_unknown_channel_is_kept_and_shown_as_final():
    stream = toks(C, "finalanswer", M, "42", RET)
    result = parse_completion(stream, fake_decode_bytes)
    assert result.messages[0].channel == "finalanswer" and result.final == "42"


def test_extra_start_without_role():
    stream = toks(S, S, "assistant", C, "final", M, "hi", RET)
    assert messages(stream) == [Message("assistant", "final", None, None, "hi", "return")]
    stream = toks(S, C, "final", M, "hi", RET)
    assert messages(stream, role=None) == [
        Message("assistant", "final", None, None, "hi", "return")
    ]


def test_start_inside_content_closes_the_message():
    stream = toks(C, "analysis", M, "a", S, "assistant", C, "final", M, "b", RET)
    assert [(m.channel, m.content, m.ended) for m in messages(stream)] == [
        ("analysis", "a", "end"),
        ("final", "b", "return"),
    ]


def test_absurdly_long_header_becomes_content_before_the_stream_ends():
    junk = "x" * 400
    _, per_call = run(toks(S, "assistant", C, "final " + junk, RET), role=None)
    started = next(i for i, call in enumerate(per_call) if call)
    assert started < len(per_call) - 2  # the cap fired long before the stop token
    end = per_call[-2][-1]
    assert end.message.channel == "final" and end.message.content == junk
    # Without a channel: the whole raw header is the content.
    (message,) = messages(toks(S, "model rambling " * 30, E), role=None)
    assert message.role == "assistant" and message.content == "model rambling " * 30


def test_malformed_header_at_message_keeps_raw_text():
    (message,) = messages(toks(C, "a", C, "b", M, "x", E))
    assert (message.channel, message.content) == ("a", "<|channel|>bx")
    (message,) = messages(toks(C, M, "x", E))
    assert (message.channel, message.content) == (None, "<|channel|>x")


def test_reserved_and_undecodable_tokens_in_content():
    stream = toks(C, "final", M, "a", 200010, 199998, 999_999, "b", RET)
    (message,) = messages(stream)
    assert message.content == "a<|reserved_200010|><|startoftext|><|token_999999|>b"


def test_endoftext_stops():
    stream = toks(C, "final", M, "bye", EOT)
    result = parse_completion(stream, fake_decode_bytes)
    assert result.finish_reason == "stop" and result.messages[0].ended == "end"


def test_model_repeats_start_assistant_and_skipped_start():
    stream = toks(S, "assistant", C, "final", M, "hi", RET)
    assert messages(stream) == [Message("assistant", "final", None, None, "hi", "return")]
    # Between messages, a bare <|channel|> implies `<|start|>assistant`.
    stream = toks(C, "final", M, "hi", RET)
    assert messages(stream, role=None)[0].channel == "final"


TEXT_PIECES = [
    "analysis", "final", "commentary", " to=functions.f", "to=", " ", "json", "\n", "assistant",
    "Z", "#", "7", "é", "😀", "<|", "x" * 40,
]  # fmt: skip
HEADER_PIECES = [
    toks(C, "final "), toks(C, "analysis"), toks(S, "assistant"), toks(" to=functions.f ", K, "json"),
    toks(C, "commentary", M), toks(E, S, "assistant", C, "final", M),
]  # fmt: skip
token_lists = st.one_of(
    st.sampled_from(HEADER_PIECES),
    st.sampled_from(CONTROL + list(RESERVED)).map(lambda t: [t]),
    st.sampled_from(TEXT_PIECES).map(lambda s: list(s.encode())),
    st.integers(0, 255).map(lambda b: [b]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(token_lists, max_size=60), st.sampled_from(["assistant", None]))
def test_random_streams_never_raise_and_deltas_match_messages(chunks, role):
    tokens = [t for chunk in chunks for t in chunk]
    events, _ = run(tokens, role=role)
    # Events nest: start, deltas, end; each end's message holds exactly its deltas.
    current, parts, ended = None, [], []
    for event in events:
        if isinstance(event, MessageStart):
            assert current is None
            current, parts = event, []
        elif isinstance(event, ContentDelta):
            assert current is not None and event.text
            parts.append(event.text)
        else:
            m = event.message
            assert (m.role, m.channel, m.recipient, m.content_type) == (
                current.role,
                current.channel,
                current.recipient,
                current.content_type,
            )
            assert m.content == "".join(parts)
            ended.append(m)
            current = None
    assert current is None
    all_deltas = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert all_deltas == "".join(m.content for m in ended)
    # Nothing is dropped: each "Z", "#", "7" of the input (no keyword or marker has them) shows
    # up in some message's fields or content.
    shown = "".join(f"{m.role}{m.channel}{m.recipient}{m.content_type}{m.content}" for m in ended)
    text_in = bytes(t for t in tokens if t < 256).decode("latin-1")
    assert Counter(c for c in shown if c in "Z#7") == Counter(c for c in text_in if c in "Z#7")


@pytest.fixture
def real_encoding(monkeypatch):
    """tiktoken's o200k_harmony on the local vocabulary (skips without it)."""
    local = str(real_vocab_dir() / "o200k_base.tiktoken")
    import tiktoken
    import tiktoken.load
    import tiktoken_ext.openai_public as public

    # tiktoken's o200k_harmony definition, with the ranks read from the local file.
    real_load = tiktoken.load.load_tiktoken_bpe
    monkeypatch.setattr(
        public, "load_tiktoken_bpe", lambda url, expected_hash=None: real_load(local, expected_hash)
    )
    return tiktoken.Encoding(**public.o200k_harmony())


@pytest.mark.parametrize(
    "completion",
    [
        "<|channel|>analysis<|message|>User asks: 日本語で答える? Let's think 🤔.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>はい、できます！ Ça marche 👍<|return|>",
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>"
        'commentary to=functions.get_weather <|constrain|>json<|message|>{"location":"東京"}<|call|>',
        "<|channel|>commentary<|message|>Let me check…<|end|><|start|>assistant to=functions.x"
        '<|channel|>commentary json<|message|>{"a": [1, 2]}<|call|>',
    ],
)
def test_real_vocabulary_matches_openai_harmony(real_encoding, completion):
    enc = real_encoding
    harmony = pytest.importorskip("openai_harmony")
    tokens = enc.encode(completion, allowed_special="all")
    events, _ = run_real(enc, tokens)
    assert all("\ufffd" not in e.text for e in events if isinstance(e, ContentDelta))
    ours = [e.message for e in events if isinstance(e, MessageEnd)]

    reference = harmony.load_harmony_encoding(harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    parser = harmony.StreamableParser(reference, role=harmony.Role.ASSISTANT)
    for token in tokens:
        parser.process(token)
    expected = [
        (m.author.role.value, m.channel, m.recipient, m.content_type, m.content[0].text)
        for m in parser.messages
    ]
    assert [(m.role, m.channel, m.recipient, m.content_type, m.content) for m in ours] == expected


def run_real(enc, tokens):
    parser = HarmonyStreamParser(enc.decode_bytes)
    per_call = [parser.feed(t) for t in tokens] + [parser.finish()]
    return [e for events in per_call for e in events], per_call
