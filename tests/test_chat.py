"""Harmony turns and chat sessions (gptoss_mlx.chat) driven by a scripted model.

The scripted model (scripted_chat.py) forces greedy decoding to write exactly the harmony
completion a test gives, and records every prompt it is asked to continue, so the tests can check
what the conversation history looks like to the model after each turn.

The real o200k vocabulary is used when it is found locally (TIKTOKEN_ENCODINGS_BASE or tiktoken's
cache); otherwise a synthetic byte-level one with the real control token ids, so these tests run
everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from gptoss_mlx.engine.chat import TurnEvent, run_turn
from gptoss_mlx.errors import UsageError
from gptoss_mlx.harmony.render import render_prompt
from gptoss_mlx.harmony.request import parse_chat_request
from scripted_chat import (
    DATE,
    GREEDY,
    WEATHER_TOOL,
    ScriptedModel,
    contains,
    final_answer,
    ids,
    make_tokenizer,
    message_ids,
    session,
    tool_call,
)

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def expected_prompt(tok, messages, *, tools=(), effort="medium") -> list[int]:
    request = parse_chat_request(
        {"messages": messages, "tools": list(tools), "reasoning_effort": effort}
    )
    return render_prompt(request, tok, date=DATE)


@dataclass
class Recorder:
    events: list[TurnEvent]

    def __call__(self, ev: TurnEvent) -> None:
        self.events.append(ev)

    def kinds(self) -> list[str]:
        """Event kinds with repeats collapsed: the order in which channels streamed."""
        out: list[str] = []
        for ev in self.events:
            if not out or out[-1] != ev.kind:
                out.append(ev.kind)
        return out

    def text(self, kind: str) -> str:
        return "".join(ev.text for ev in self.events if ev.kind == kind)


# --------------------------------------------------------------------------- run_turn


def user_prompt(tok, text: str = "Hello", tools=()) -> list[int]:
    return expected_prompt(tok, [{"role": "user", "content": text}], tools=tools)


def test_run_turn_splits_reasoning_and_final(tok):
    script = final_answer(tok, "The user greets me.", "Hi! How can I help?")
    model = ScriptedModel(tok.vocab_size, [script])
    rec = Recorder([])
    prompt = user_prompt(tok)
    res = run_turn(model, tok, prompt, sampling=GREEDY, on_event=rec)
    assert model.prompts == [prompt]
    assert res.reasoning == "The user greets me."
    assert res.final == "Hi! How can I help?"
    assert res.tool_calls == []
    assert res.finish_reason == "stop"
    assert rec.kinds() == ["reasoning", "final"]
    assert rec.text("reasoning") == res.reasoning and rec.text("final") == res.final
    assert res.prompt_tokens == len(prompt)
    assert res.completion_tokens == len(script)
    assert res.usage["total_tokens"] == len(prompt) + len(script)
    assert res.to_json() == {
        "final": "Hi! How can I help?",
        "reasoning": "The user greets me.",
        "tool_calls": [],
        "finish_reason": "stop",
        "usage": res.usage,
    }


def test_run_turn_returns_tool_calls_in_the_openai_shape(tok):
    script = tool_call(tok, "Need the weather.", "get_weather", '{"city":"Paris"}')
    model = ScriptedModel(tok.vocab_size, [script])
    rec = Recorder([])
    prompt = user_prompt(tok, "Weather in Paris?", tools=[WEATHER_TOOL])
    res = run_turn(
        model,
        tok,
        prompt,
        sampling=GREEDY,
        on_event=rec,
        call_id_prefix="call_7_",
        functions=["get_weather"],
    )
    assert res.finish_reason == "tool_calls"
    assert res.tool_calls == [
        {
            "id": "call_7_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    assert res.final == "" and res.reasoning == "Need the weather."
    assert rec.kinds() == ["reasoning", "tool_call"]
    (call_event,) = [e for e in rec.events if e.kind == "tool_call"]
    assert call_event.tool_call == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert res.assistant_message() == {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Need the weather.",
        "tool_calls": res.tool_calls,
    }


def test_run_turn_streams_a_preamble_before_the_call(tok):
    script = ids(
        tok,
        "<|channel|>", "commentary", "<|message|>", "Let me check.", "<|end|>",
        "<|start|>", "assistant", " to=functions.get_weather", "<|channel|>", "commentary ",
        "<|constrain|>", "json", "<|message|>", "{}", "<|call|>",
    )  # fmt: skip
    rec = Recorder([])
    model = ScriptedModel(tok.vocab_size, [script])
    res = run_turn(model, tok, user_prompt(tok), on_event=rec, functions=["get_weather"])
    assert rec.kinds() == ["preamble", "tool_call"]
    assert res.preambles == ["Let me check."]
    assert res.finish_reason == "tool_calls"


def test_run_turn_cut_by_max_tokens_is_length(tok):
    script = final_answer(tok, "Thinking at length.", "Never reached.")
    n = len(ids(tok, "<|channel|>", "analysis", "<|message|>")) + 2
    res = run_turn(ScriptedModel(tok.vocab_size, [script]), tok, user_prompt(tok), max_tokens=n)
    assert res.finish_reason == "length"
    assert res.completion_tokens == n
    assert res.final == ""
    assert res.reasoning == tok.decode(script[n - 2 : n])


def test_run_turn_stops_at_endoftext(tok):
    """<|endoftext|> ends generation like <|return|> (generation_config's eos ids)."""
    script = ids(tok, "<|channel|>", "final", "<|message|>", "Done.", "<|endoftext|>")
    script += tok.encode(" never generated")
    res = run_turn(ScriptedModel(tok.vocab_size, [script]), tok, user_prompt(tok))
    assert res.final == "Done."
    assert res.finish_reason == "stop"
    assert res.completion_tokens == script.index(tok.special("<|endoftext|>")) + 1


def test_run_turn_never_stops_at_end(tok):
    """<|end|> separates the analysis from the answer; generation goes on past it."""
    script = final_answer(tok, "a", "b")
    res = run_turn(ScriptedModel(tok.vocab_size, [script]), tok, user_prompt(tok))
    assert res.completion_tokens == len(script)


# --------------------------------------------------------------------------- ChatSession


def test_history_drops_a_finished_turns_analysis(tok):
    s, model = session(
        tok,
        [final_answer(tok, "zebra-thoughts", "Hi!"), final_answer(tok, "more", "Fine.")],
    )
    r1 = s.send("Hello")
    assert (r1.final, r1.reasoning, r1.finish_reason) == ("Hi!", "zebra-thoughts", "stop")
    s.send("How are you?")
    turn1, turn2 = model.prompts
    assert turn1 == expected_prompt(tok, [{"role": "user", "content": "Hello"}])
    assert turn2 == expected_prompt(
        tok,
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi!", "reasoning_content": "zebra-thoughts"},
            {"role": "user", "content": "How are you?"},
        ],
    )
    # Independently of the renderer: the stored answer ends in <|end|>, its analysis is gone.
    assert contains(turn2, message_ids(tok, "assistant", "final", "Hi!"))
    assert not contains(turn2, tok.encode("zebra-thoughts"))
    assert not contains(turn2, ids(tok, "<|channel|>", "analysis"))
    assert turn2[: len(turn1)] == turn1  # the prefix is stable: what cache reuse needs
    assert s.turns == 2
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]


def test_open_tool_loop_keeps_analysis_and_call(tok):
    s, model = session(
        tok,
        [
            tool_call(tok, "zebra-plan", "get_weather", '{"city":"Paris"}'),
            final_answer(tok, "got it", "Sunny, 21 C."),
            final_answer(tok, "ok", "Bye."),
        ],
        tools=[WEATHER_TOOL],
    )
    r1 = s.send("Weather in Paris?")
    assert r1.finish_reason == "tool_calls"
    calls = s.pending_tool_calls()
    assert calls == r1.tool_calls and calls[0]["id"] == "call_0_0"
    r2 = s.send_tool_results([(calls[0], '{"temp_c": 21}')])
    assert r2.final == "Sunny, 21 C."
    assert s.pending_tool_calls() == []
    turn2 = model.prompts[1]
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "zebra-plan",
            "tool_calls": r1.tool_calls,
        },
        {"role": "tool", "tool_call_id": "call_0_0", "content": '{"temp_c": 21}'},
    ]
    assert turn2 == expected_prompt(tok, history, tools=[WEATHER_TOOL])
    assert contains(turn2, message_ids(tok, "assistant", "analysis", "zebra-plan"))
    the_call = ids(
        tok,
        "<|start|>", "assistant", " to=functions.get_weather", "<|channel|>", "commentary",
        " ", "<|constrain|>", "json", "<|message|>", '{"city":"Paris"}', "<|call|>",
    )  # fmt: skip
    assert contains(turn2, the_call)
    result = message_ids(
        tok, "functions.get_weather", "commentary", '{"temp_c": 21}', recipient="assistant"
    )
    assert contains(turn2, result)
    tail = result + ids(tok, "<|start|>", "assistant")
    assert turn2[-len(tail) :] == tail

    # Once the loop ends with a final answer, the next turn no longer sees its analysis.
    s.send("Thanks")
    turn3 = model.prompts[2]
    assert not contains(turn3, tok.encode("zebra-plan"))
    assert contains(turn3, the_call) and contains(turn3, result)
    assert contains(turn3, message_ids(tok, "assistant", "final", "Sunny, 21 C."))


def test_instructions_and_effort_reach_the_prompt(tok):
    s, model = session(
        tok,
        [final_answer(tok, "a", "b")],
        instructions="Answer in French.",
        reasoning_effort="high",
    )
    s.send("Hello")
    assert model.prompts[0] == expected_prompt(
        tok,
        [
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
        ],
        effort="high",
    )


def test_bad_settings_are_refused_at_start(tok):
    with pytest.raises(UsageError, match="effort"):
        session(tok, [], reasoning_effort="extreme")
    with pytest.raises(UsageError):
        session(tok, [], tools=[{"type": "function", "function": {}}])


def test_save_and_load_round_trip(tok, tmp_path):
    s, _ = session(
        tok,
        [
            tool_call(tok, "plan", "get_weather", '{"city":"Oslo"}'),
            final_answer(tok, "x", "Cold."),
        ],
        tools=[WEATHER_TOOL],
        instructions="Be brief.",
        reasoning_effort="low",
    )
    s.send("Weather in Oslo? ünïcödé")
    s.send_tool_results([(s.pending_tool_calls()[0], "-5 C")])
    path = tmp_path / "chat.json"
    s.save(path)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["format"] == "gptoss-mlx-chat" and saved["messages"] == s.messages
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file is gone

    s2, model2 = session(tok, [final_answer(tok, "y", "Bye.")], date="2024-01-01")
    s2.load(path)
    assert s2.messages == s.messages
    assert (s2.date, s2.reasoning_effort, s2.instructions, s2.tools) == (
        s.date,
        s.reasoning_effort,
        s.instructions,
        s.tools,
    )
    assert s2.turns == s.turns
    # The loaded conversation continues exactly as the original would.
    s2.send("And tomorrow?")
    expected = render_prompt(
        s.request(s.messages + [{"role": "user", "content": "And tomorrow?"}]), tok, date=s.date
    )
    assert model2.prompts[0] == expected


def test_load_restores_the_saved_tools_even_none(tok, tmp_path):
    plain, _ = session(tok, [])
    plain.save(tmp_path / "plain.json")
    with_tools, _ = session(tok, [], tools=[WEATHER_TOOL])
    with_tools.load(tmp_path / "plain.json")
    assert with_tools.tools == []


def test_load_accepts_a_bare_message_list(tok, tmp_path):
    path = tmp_path / "msgs.json"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path.write_text(json.dumps(msgs))
    s, _ = session(tok, [])
    s.load(path)
    assert s.messages == msgs and s.turns == 1


@pytest.mark.parametrize(
    "content",
    [
        None,  # missing file
        "{not json",
        "42",
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
        json.dumps({"messages": "hello"}),
        json.dumps({"messages": [], "reasoning_effort": "extreme"}),
        json.dumps({"messages": [], "tools": [{"type": "function"}]}),
        json.dumps({"messages": [], "date": "yesterday"}),
        json.dumps({"messages": [], "instructions": 5}),
    ],
    ids=[
        "missing",
        "not-json",
        "number",
        "bad-role",
        "messages-not-list",
        "bad-effort",
        "bad-tools",
        "bad-date",
        "bad-instructions",
    ],
)
def test_load_of_a_bad_file_leaves_the_session_unchanged(tok, tmp_path, content):
    s, _ = session(tok, [final_answer(tok, "a", "Hi!")], instructions="Be kind.")
    s.send("Hello")
    before = json.dumps(s.to_json()), s.turns, s.last
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError) as info:
        s.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert (json.dumps(s.to_json()), s.turns, s.last) == before


def test_save_to_a_missing_folder_is_a_usage_error(tok, tmp_path):
    s, _ = session(tok, [])
    with pytest.raises(UsageError, match="cannot save"):
        s.save(tmp_path / "no" / "such" / "chat.json")


def test_ctrl_c_leaves_the_history_unchanged(tok):
    scripts = [final_answer(tok, "a", "Hi!"), final_answer(tok, "b", "never"), final_answer(tok, "c", "Ok.")]  # fmt: skip
    s, model = session(tok, scripts, interrupt_at=(1, 3))
    s.send("Hello")
    before = [dict(m) for m in s.messages], s.turns, s.last
    with pytest.raises(KeyboardInterrupt):
        s.send("Tell me a story")
    assert (s.messages, s.turns, s.last) == before
    # The session is still usable and the interrupted message left no trace in the next prompt.
    s.send("Something else")
    assert model.prompts[2] == expected_prompt(
        tok,
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "Something else"},
        ],
    )


def test_reset_starts_a_new_conversation(tok):
    s, model = session(tok, [final_answer(tok, "a", "Hi!"), final_answer(tok, "b", "Yo.")])
    s.send("Hello")
    s.reset()
    assert (s.messages, s.turns, s.last) == ([], 0, None)
    s.send("Again")
    assert model.prompts[1] == expected_prompt(tok, [{"role": "user", "content": "Again"}])


def test_context_limit_is_a_usage_error_and_keeps_the_history(tok):
    s, _ = session(tok, [final_answer(tok, "a", "Hi!")], max_context=64)
    with pytest.raises(UsageError, match="context limit is 64"):
        s.send("Hello")
    assert s.messages == [] and s.turns == 0
