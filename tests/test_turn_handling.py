"""How a turn's messages are kept and handled (issue 16), driven by scripted token streams.

- a commentary preamble written before a tool call stays in the history and renders back as
  openai-harmony renders it;
- a call to anything but a declared `functions.NAME` (`browser.search`, `python`, an undeclared
  function) is never a function call: the model is told the tool is not available and goes on,
  in chat, in `run_turn` and in `gptoss-mlx batch`, and the conversation stays usable;
- a call cut off before `<|call|>` is unfinished: never a call, never asked about in the REPL,
  never rendered back as a finished call;
- `BatchEngine`'s default stop ids include `<|endoftext|>`, as `run_turn` and `batch` stop.

Scripts run on the real o200k vocabulary when it is found, else on a synthetic byte-level one with
the real control ids; the comparisons with openai-harmony need the real one and skip without it.
"""

from __future__ import annotations

import io
import json

import pytest

from gptoss_mlx.cli.batch_files import read_lines
from gptoss_mlx.cli.batch_job import BatchDefaults, BatchJob
from gptoss_mlx.cli.repl import ChatLoop
from gptoss_mlx.engine.batching import BatchEngine, BatchRequest
from gptoss_mlx.engine.chat import run_turn
from gptoss_mlx.harmony.calls import refusal_ids, refusal_text
from gptoss_mlx.harmony.parser import Message
from gptoss_mlx.harmony.render import render_prompt
from gptoss_mlx.harmony.request import parse_chat_request
from gptoss_mlx.harmony.turn import MAX_REFUSALS
from scripted_chat import (
    DATE,
    GREEDY,
    WEATHER_TOOL,
    TableModel,
    contains,
    final_answer,
    ids,
    make_tokenizer,
    message_ids,
    session,
    tool_call,
)
from vocabs import real_vocab_dir

PREAMBLE = "Let me check the weather for you."
ARGS = '{"city":"Paris"}'


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hx():
    """openai-harmony, the reference renderer (needs the real vocabulary, no download)."""
    real_vocab_dir()
    return pytest.importorskip("openai_harmony", reason="openai-harmony is not installed")


def harmony_ids(hx, messages, *, completion: bool = True) -> list[int]:
    """openai-harmony's rendering of `messages` (for completion: plus `<|start|>assistant`)."""
    enc = hx.load_harmony_encoding(hx.HarmonyEncodingName.HARMONY_GPT_OSS)
    conversation = hx.Conversation.from_messages(messages)
    if not completion:
        return enc.render_conversation(conversation)
    config = hx.RenderConversationConfig(auto_drop_analysis=False)
    return enc.render_conversation_for_completion(conversation, hx.Role.ASSISTANT, config)


def h_head(hx, tools=(WEATHER_TOOL,)):
    """The system and developer messages of a conversation with `tools`, as harmony writes them."""
    system = hx.SystemContent.new().with_conversation_start_date(DATE)
    system = system.with_reasoning_effort(hx.ReasoningEffort.MEDIUM)
    functions = [
        hx.ToolDescription.new(
            t["function"]["name"], t["function"]["description"], t["function"]["parameters"]
        )
        for t in tools
    ]
    developer = hx.DeveloperContent.new().with_function_tools(functions)
    return [
        hx.Message.from_role_and_content(hx.Role.SYSTEM, system),
        hx.Message.from_role_and_content(hx.Role.DEVELOPER, developer),
    ]


def h_msg(hx, role, text, channel=None):
    msg = hx.Message.from_role_and_content(getattr(hx.Role, role.upper()), text)
    return msg.with_channel(channel) if channel else msg


def h_call(hx, args):
    msg = h_msg(hx, "assistant", args, "commentary").with_recipient("functions.get_weather")
    return msg.with_content_type("<|constrain|>json")


def h_tool(hx, author, text, channel="commentary"):
    msg = hx.Message.from_author_and_content(hx.Author.new(hx.Role.TOOL, author), text)
    return msg.with_recipient("assistant").with_channel(channel)


def preamble_then_call(tok, *preambles: str, analysis: str = "Need the weather.") -> list[int]:
    """Analysis, commentary preambles, then the weather call, as the model writes them."""
    out = ids(tok, "<|channel|>", "analysis", "<|message|>", analysis, "<|end|>")
    for p in preambles:
        out += ids(tok, "<|start|>", "assistant", "<|channel|>", "commentary", "<|message|>", p)
        out += ids(tok, "<|end|>")
    return out + ids(
        tok,
        "<|start|>", "assistant", " to=functions.get_weather", "<|channel|>", "commentary ",
        "<|constrain|>", "json", "<|message|>", ARGS, "<|call|>",
    )  # fmt: skip


def builtin_call(tok, recipient: str, args: str, analysis: str = "Search it.") -> list[int]:
    """A built-in tool call the way gpt-oss writes them: on the analysis channel, `code` type."""
    return ids(
        tok,
        "<|channel|>", "analysis", "<|message|>", analysis, "<|end|>",
        "<|start|>", "assistant", "<|channel|>", f"analysis to={recipient} code", "<|message|>",
        args, "<|call|>",
    )  # fmt: skip


def refusal(tok, recipient: str, functions=("get_weather",), channel="analysis") -> list[int]:
    """The tool message answering a refused call, then `<|start|>assistant` (written out here as
    the renderer splits messages; checked against openai-harmony in its own test)."""
    text = refusal_text(recipient, functions)
    head = ["<|start|>", recipient, " to=assistant", "<|channel|>", channel, "<|message|>"]
    return ids(tok, *head, text, "<|end|>", "<|start|>", "assistant")


def prompt_for(tok, messages, tools=(WEATHER_TOOL,)) -> list[int]:
    request = parse_chat_request({"messages": messages, "tools": list(tools)})
    return render_prompt(request, tok, date=DATE)


def kinds(events) -> list[str]:
    out: list[str] = []
    for ev in events:
        if not out or out[-1] != ev.kind:
            out.append(ev.kind)
    return out


# --------------------------------------------------------------------------- 1. preambles


def test_a_preamble_before_a_call_stays_in_the_history(tok, tmp_path):
    s, model = session(
        tok,
        [preamble_then_call(tok, PREAMBLE), final_answer(tok, "Got it.", "Sunny, 21 C.")],
        tools=[WEATHER_TOOL],
    )
    r1 = s.send("Weather in Paris?")
    assert r1.finish_reason == "tool_calls" and r1.preambles == [PREAMBLE]
    stored = s.messages[-1]
    assert stored["content"] == PREAMBLE and stored["tool_calls"] == r1.tool_calls
    s.send_tool_results([(s.pending_tool_calls()[0], '{"temp_c": 21}')])
    turn2 = model.prompts[1]
    # What the model wrote comes back as written: the preamble, then the call.
    the_call = ids(
        tok,
        "<|start|>", "assistant", " to=functions.get_weather", "<|channel|>", "commentary",
        " ", "<|constrain|>", "json", "<|message|>", ARGS, "<|call|>",
    )  # fmt: skip
    assert contains(turn2, message_ids(tok, "assistant", "commentary", PREAMBLE) + the_call)
    # The user saw the preamble: a saved chat keeps it too.
    s.save(tmp_path / "chat.json")
    saved = json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))
    assert saved["messages"][1]["content"] == PREAMBLE


def test_preambles_render_back_as_openai_harmony_renders_them(tok, hx):
    """One preamble and two (two commentary messages before the call), token for token."""
    for preambles in ([PREAMBLE], ["Checking.", "Still checking."]):
        s, model = session(
            tok,
            [preamble_then_call(tok, *preambles), final_answer(tok, "ok", "Sunny.")],
            tools=[WEATHER_TOOL],
        )
        s.send("Weather in Paris?")
        s.send_tool_results([(s.pending_tool_calls()[0], "sunny")])
        expected = harmony_ids(
            hx,
            [
                *h_head(hx),
                h_msg(hx, "user", "Weather in Paris?"),
                h_msg(hx, "assistant", "Need the weather.", "analysis"),
                *[h_msg(hx, "assistant", p, "commentary") for p in preambles],
                h_call(hx, ARGS),
                h_tool(hx, "functions.get_weather", "sunny"),
            ],
        )
        assert model.prompts[1] == expected, preambles


# --------------------------------------------------------------------------- 2. refused calls


def test_a_builtin_tool_call_is_refused_and_the_chat_goes_on(tok):
    search = builtin_call(tok, "browser.search", '{"query":"Paris weather"}')
    answer = final_answer(tok, "No browser: answer from memory.", "Usually mild in spring.")
    s, model = session(
        tok, [search, answer, final_answer(tok, "t", "You're welcome.")], tools=[WEATHER_TOOL]
    )
    events = []
    r1 = s.send("Weather in Paris?", events.append)
    # The model was told, in the same turn, and went on to answer.
    assert model.prompts[1] == model.prompts[0] + search + refusal(tok, "browser.search")
    assert (r1.final, r1.finish_reason, r1.tool_calls) == ("Usually mild in spring.", "stop", [])
    assert r1.refused_calls == [
        {"recipient": "browser.search", "arguments": '{"query":"Paris weather"}'}
    ]
    assert r1.completion_tokens == len(search) + len(answer)
    assert "refused_call" in kinds(events) and "tool_call" not in kinds(events)
    assert s.pending_tool_calls() == []
    # The conversation is still a valid request: the next turn runs, on the stored history.
    r2 = s.send("Thanks")
    assert r2.final == "You're welcome."
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Usually mild in spring.",
            "reasoning_content": "Search it.\nNo browser: answer from memory.",
        },
        {"role": "user", "content": "Thanks"},
    ]
    assert model.prompts[2] == prompt_for(tok, history)


def test_the_refusal_is_the_tool_message_openai_harmony_renders(tok, hx):
    for recipient, channel in (("browser.search", "analysis"), ("functions.nope", "commentary")):
        call = Message("assistant", channel, recipient, "json", "{}", "call")
        ours = refusal_ids(call, ["get_weather"], tok)
        text = refusal_text(recipient, ["get_weather"])
        expected = harmony_ids(hx, [h_tool(hx, recipient, text, channel)], completion=False)
        assert ours == expected + ids(tok, "<|start|>", "assistant")


@pytest.mark.parametrize(
    "recipient",
    ["python", "functions.unknown_name", "functions.get_weather_now"],
    ids=["python", "undeclared", "prefix-of-nothing"],
)
def test_python_and_undeclared_functions_are_refused(tok, recipient):
    call = ids(
        tok,
        "<|start|>", "assistant", f" to={recipient}", "<|channel|>", "commentary ",
        "<|constrain|>", "json", "<|message|>", "{}", "<|call|>",
    )  # fmt: skip
    s, model = session(
        tok,
        [call, final_answer(tok, "a", "Done."), final_answer(tok, "b", "Bye.")],
        tools=[WEATHER_TOOL],
    )
    r1 = s.send("Go")
    assert r1.tool_calls == [] and r1.final == "Done."
    assert model.prompts[1][-len(refusal(tok, recipient, channel="commentary")) :] == refusal(
        tok, recipient, channel="commentary"
    )
    s.send("Again")
    # Never stored, never rendered back as a function call (`python` was `functions.python`).
    assert not contains(model.prompts[2], tok.encode(f" to={recipient}"))
    assert not contains(model.prompts[2], tok.encode(" to=functions.python"))


def test_a_model_that_insists_is_stopped_after_max_refusals(tok):
    calls = [builtin_call(tok, "browser.search", f'{{"q":{i}}}') for i in range(MAX_REFUSALS + 1)]
    s, model = session(tok, [*calls, final_answer(tok, "x", "Fine.")], tools=[WEATHER_TOOL])
    r1 = s.send("Search!")
    assert len(model.prompts) == MAX_REFUSALS + 1  # answered 3 times, then the turn ended
    assert r1.finish_reason == "stop" and r1.tool_calls == []
    assert len(r1.refused_calls) == MAX_REFUSALS + 1
    assert s.send("Stop searching.").final == "Fine."


def test_a_refusal_never_passes_max_tokens(tok):
    search = builtin_call(tok, "browser.search", "{}")
    s, model = session(tok, [search], tools=[WEATHER_TOOL], max_tokens=len(search))
    r1 = s.send("Search!")
    assert len(model.prompts) == 1  # no room left for the model to go on
    assert r1.finish_reason == "length" and r1.completion_tokens == len(search)
    assert r1.refused_calls and r1.tool_calls == []


def test_run_turn_without_declared_functions_refuses_every_call(tok):
    """A library caller who declares nothing gets no tool calls, whatever the model writes."""
    prompt = prompt_for(tok, [{"role": "user", "content": "Hi"}], tools=())
    script = tool_call(tok, "plan", "get_weather", ARGS)
    model = TableModel(
        tok.vocab_size,
        {
            tuple(prompt): script,
            tuple(prompt + script + refusal(tok, "functions.get_weather", (), "commentary")): (
                final_answer(tok, "no tools", "Hello!")
            ),
        },
    )
    res = run_turn(model, tok, prompt, sampling=GREEDY)
    assert (res.final, res.tool_calls, res.finish_reason) == ("Hello!", [], "stop")


# --------------------------------------------------------------------------- 3. unfinished calls


def cut_call(tok) -> tuple[list[int], int, str]:
    """A weather call, a number of its tokens that ends inside the arguments, and the arguments
    written by then."""
    args = tok.encode('{"city": "Paris"}')
    script = tool_call(tok, "Need it.", "get_weather", '{"city": "Paris"}')
    assert script[-len(args) - 1 : -1] == args
    cut = len(script) - 2  # the last argument token and <|call|> never come
    return script, cut, tok.decode(args[:-1])


def test_a_call_cut_by_max_tokens_is_unfinished_not_a_call(tok):
    script, cut, partial = cut_call(tok)
    s, model = session(
        tok, [script, final_answer(tok, "b", "Hi.")], tools=[WEATHER_TOOL], max_tokens=cut
    )
    events = []
    r1 = s.send("Weather?", events.append)
    assert (r1.finish_reason, r1.tool_calls) == ("length", [])
    assert r1.unfinished_calls == [{"recipient": "functions.get_weather", "arguments": partial}]
    assert "unfinished_call" in kinds(events) and "tool_call" not in kinds(events)
    assert s.pending_tool_calls() == []  # nothing to run or ask about
    s.send("Hello?")
    # Never rendered back as a finished call.
    assert tok.call not in model.prompts[1]
    assert model.prompts[1] == prompt_for(
        tok,
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "reasoning_content": "Need it."},
            {"role": "user", "content": "Hello?"},
        ],
    )


def test_the_repl_never_asks_about_an_unfinished_call(tok):
    script, cut, _ = cut_call(tok)
    s, model = session(
        tok, [script, final_answer(tok, "b", "Hi.")], tools=[WEATHER_TOOL], max_tokens=cut
    )
    out, err = io.StringIO(), io.StringIO()
    ChatLoop(s, stdin=io.StringIO("Weather?\nHello?\n"), out=out, err=err).run()
    assert "result of" not in err.getvalue()
    assert "[tool call cut off: functions.get_weather(" in err.getvalue()
    # The next line was sent as a user message, not taken for a tool result.
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert s.messages[2]["content"] == "Hello?" and out.getvalue().strip() == "Hi."


# --------------------------------------------------------------------------- batch and the engine


def run_batch(tok, model, lines: list[dict], **defaults) -> dict[int, dict]:
    defaults = {"sampling": GREEDY, "max_tokens": 200, **defaults}
    job = BatchJob(model, tok, defaults=BatchDefaults(**defaults), batch_size=2, date=DATE)
    records: list[dict] = []
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    job.run(read_lines(io.BytesIO(data)), records.append)
    return {r["line"]: r for r in records}


def test_batch_refuses_a_builtin_call_and_continues_the_line(tok):
    """Lines 1 and 4 call browser.search: line 1's next segment joins the running batch, line 4's
    runs after the input is over. Each record equals `run_turn` on the same script."""
    tools = [WEATHER_TOOL]
    lines = [{"prompt": f"Question {i}", "tools": tools} for i in range(1, 5)]
    scripts = {}
    for i, line in enumerate(lines, 1):
        p = prompt_for(tok, [{"role": "user", "content": line["prompt"]}])
        answer = final_answer(tok, f"think {i}", f"Answer {i}.")
        if i in (1, 4):
            search = builtin_call(tok, "browser.search", f'{{"q":{i}}}')
            scripts[tuple(p)] = search
            scripts[tuple(p + search + refusal(tok, "browser.search"))] = answer
        else:
            scripts[tuple(p)] = answer
    records = run_batch(tok, TableModel(tok.vocab_size, scripts), lines)
    for i, line in enumerate(lines, 1):
        p = prompt_for(tok, [{"role": "user", "content": line["prompt"]}])
        alone = run_turn(
            TableModel(tok.vocab_size, scripts),
            tok,
            p,
            sampling=GREEDY,
            max_tokens=200,
            functions=["get_weather"],
        ).to_json()
        assert {k: v for k, v in records[i].items() if k not in ("id", "line")} == alone, i
        assert records[i]["final"] == f"Answer {i}." and records[i]["tool_calls"] == []
    assert records[1]["refused_calls"] == [{"recipient": "browser.search", "arguments": '{"q":1}'}]
    assert "refused_calls" not in records[2]


def test_batch_reports_a_call_cut_by_max_tokens_as_unfinished(tok):
    script, cut, partial = cut_call(tok)
    p = prompt_for(tok, [{"role": "user", "content": "Weather?"}])
    model = TableModel(tok.vocab_size, {tuple(p): script})
    records = run_batch(
        tok, model, [{"prompt": "Weather?", "tools": [WEATHER_TOOL]}], max_tokens=cut
    )
    rec = records[1]
    assert (rec["finish_reason"], rec["tool_calls"]) == ("length", [])
    assert rec["unfinished_calls"] == [{"recipient": "functions.get_weather", "arguments": partial}]


def test_batch_engine_stops_at_endoftext_by_default(tok):
    script = ids(tok, "<|channel|>", "final", "<|message|>", "Done.", "<|endoftext|>", "more")
    model = TableModel(tok.vocab_size, {(1, 2, 3): script})
    (result,) = BatchEngine(model).run([BatchRequest([1, 2, 3], 50, GREEDY)])
    end = script.index(tok.special("<|endoftext|>")) + 1
    assert (result.tokens, result.finish_reason) == (script[:end], "stop")
