"""`gptoss-mlx generate` and `gptoss-mlx chat`, and the chat loop behind the latter.

Three levels: the commands on a tiny random model converted like a real one (in-process with
click's runner, plus a few real subprocesses for what only a process shows: exit codes, closed
pipes, tracebacks); the commands on the scripted model of scripted_chat.py (exact outputs); and
`ChatLoop` driven through the library API with piped input.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import convert_chat_model
from gptoss_mlx.cli import main
from gptoss_mlx.cli.repl import HELP, SKIPPED, ChatLoop
from gptoss_mlx.harmony.render import render_prompt
from gptoss_mlx.harmony.request import parse_chat_request
from gptoss_mlx.harmony.tokenizer import load_tokenizer
from scripted_chat import (
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
from vocabs import REAL_VOCAB, needs_real_vocab

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """`convert_chat_model`, with the real vocabulary when it is here."""
    out = convert_chat_model(tmp_path_factory.mktemp("cli"))
    if REAL_VOCAB is not None:
        # load_tokenizer prefers o200k_base.tiktoken over the synthetic tokenizer.json.
        shutil.copy(REAL_VOCAB, out / "o200k_base.tiktoken")
    return str(out)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPTOSS_MLX_MODEL", raising=False)


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def one_error_line(result_or_stderr, code: int | None = None) -> str:
    """Assert the failure was one `error: ...` line with no traceback; return it."""
    stderr = getattr(result_or_stderr, "stderr", result_or_stderr)
    if code is not None:
        assert result_or_stderr.exit_code == code, result_or_stderr.output
        assert isinstance(result_or_stderr.exception, SystemExit), result_or_stderr.exception
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def run_process(*args: str, stdin: str = "", env: dict | None = None, close_stdout=False):
    """Run `python -m gptoss_mlx.cli ARGS` in a real process; returns (rc, stdout, stderr)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("GPTOSS_MLX_MODEL", None)
    cmd = [sys.executable, "-m", "gptoss_mlx.cli", *args]
    p = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
    )
    if close_stdout:
        p.stdout.close()  # the reader is gone before the first byte (like `| head -c 0`)
        p.stdin.close()
        err = p.stderr.read()
        p.stderr.close()
        return p.wait(timeout=120), b"", err.decode()
    out, err = p.communicate(stdin.encode(), timeout=120)
    return p.returncode, out.decode(), err.decode()


# --------------------------------------------------------------------------- generate (tiny model)


def test_generate_streams_the_answer_to_stdout(folder):
    args = ("generate", "-m", folder, "-p", "Hello", "-n", "5", "--seed", "1")
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip()
    assert cli(*args).stdout == res.stdout  # seeded: the same answer again
    as_json = json.loads(cli(*args, "--json").stdout)
    assert res.stdout == as_json["final"] + "\n"


def test_generate_json_has_the_whole_result(folder):
    res = cli("generate", "-m", folder, "-p", "Hello", "-n", "5", "--seed", "1", "--json")
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert set(obj) == {"final", "reasoning", "tool_calls", "finish_reason", "usage"}
    assert isinstance(obj["final"], str) and isinstance(obj["reasoning"], str)
    assert isinstance(obj["tool_calls"], list)
    assert obj["finish_reason"] in ("length", "stop", "tool_calls")
    usage = obj["usage"]
    assert 0 < usage["completion_tokens"] <= 5
    assert usage["prompt_tokens"] > 20  # the harmony system message alone is longer
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_generate_reads_the_prompt_from_stdin(folder):
    args = ("generate", "-m", folder, "-n", "4", "--seed", "2", "--json")
    piped = cli(*args, input="Hello")
    assert piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout) == json.loads(cli(*args, "-p", "Hello").stdout)


@needs_real_vocab("the tiny model samples ids the synthetic vocabulary cannot decode")
def test_generate_raw_completes_the_text(folder):
    args = ("generate", "-m", folder, "-p", "def fibonacci(n):", "--raw", "-t", "0", "-n", "8")
    res = cli(*args)
    assert res.exit_code == 0, res.output
    obj = json.loads(cli(*args, "--json").stdout)
    assert set(obj) == {"text", "finish_reason", "usage"}
    assert res.stdout == obj["text"] + "\n"
    assert obj["usage"]["prompt_tokens"] == len(load_tokenizer(folder).encode("def fibonacci(n):"))
    assert obj["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize(
    "args, stdin",
    [(["-p", "   "], None), ([], ""), ([], "\n\n")],
    ids=["blank-p", "empty-stdin", "blank-stdin"],
)
def test_generate_empty_prompt_is_one_line_exit_2(folder, args, stdin):
    res = cli("generate", "-m", folder, *args, input=stdin)
    assert one_error_line(res, 2) == "error: the prompt is empty"


@pytest.mark.parametrize(
    "opt, field",
    [
        (["--temp", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-k", "-3"], "top_k"),
        (["--min-p", "1"], "min_p"),
    ],
)
def test_generate_bad_sampling_is_one_line_exit_2(folder, opt, field):
    res = cli("generate", "-m", folder, "-p", "Hi", *opt)
    assert field in one_error_line(res, 2)


@pytest.mark.parametrize(
    "content",
    [None, "{oops", '{"tools": 5}', '[{"type": "function", "function": {}}]'],
    ids=["missing", "not-json", "not-a-list", "bad-tool"],
)
def test_generate_bad_tools_file_is_one_line_exit_2(folder, tmp_path, content):
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    res = cli("generate", "-m", folder, "-p", "Hi", "--tools", str(path))
    line = one_error_line(res, 2)
    assert str(path) in line or "tools[0]" in line


def test_generate_missing_model_is_one_line_exit_2():
    res = cli("generate", "-m", "/nonexistent/model", "-p", "Hi")
    assert "/nonexistent/model" in one_error_line(res, 2)


def test_generate_bad_threads_variable_is_one_line_exit_2(folder, monkeypatch):
    monkeypatch.setenv("GPTOSS_MLX_THREADS", "all")
    res = cli("generate", "-m", folder, "-p", "Hi")
    assert "GPTOSS_MLX_THREADS='all'" in one_error_line(res, 2)


def test_generate_missing_model_in_a_process(tmp_path):
    rc, out, err = run_process(
        "generate", "-m", "/nonexistent/model", "-p", "Hi", env={"GPTOSS_MLX_HOME": str(tmp_path)}
    )
    assert rc == 2 and out == ""
    assert "/nonexistent/model" in one_error_line(err)


def test_generate_into_a_closed_pipe_exits_quietly(folder, tmp_path):
    args = ("generate", "-m", folder, "-p", "Hello", "-n", "12", "--seed", "3")
    assert cli(*args).stdout.strip()  # it does write to stdout, so the pipe break is hit
    rc, _, err = run_process(*args, env={"GPTOSS_MLX_HOME": str(tmp_path)}, close_stdout=True)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "BrokenPipe" not in err, err
    assert rc == 0


# --------------------------------------------------------------------------- chat (tiny model)


def test_chat_piped_lines_and_commands(folder, tmp_path):
    saved = tmp_path / "conv.json"
    lines = [
        "/stats",
        "Hello",
        "/stats",
        "/effort high",
        "/effort extreme",
        f"/save {saved}",
        f"/load {saved}",
        f"/load {tmp_path / 'missing.json'}",
        "/bogus",
        "",
    ]
    res = cli("chat", "-m", folder, "-n", "3", "--seed", "1", input="\n".join(lines) + "\n")
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.stderr
    err = res.stderr.splitlines()
    assert "no turn yet" in err
    assert any(line.startswith("prompt: ") and "tokens/s" in line for line in err)
    assert "reasoning effort: high" in err
    assert "usage: /effort low|medium|high (now high)" in err
    assert f"saved 2 messages to {saved}" in err
    assert f"loaded 2 messages from {saved}" in err
    assert f"error: {tmp_path / 'missing.json'}: not found" in err
    assert "unknown command /bogus; /help lists them" in err
    conv = json.loads(saved.read_text(encoding="utf-8"))
    assert conv["reasoning_effort"] == "high"
    assert conv["messages"][0] == {"role": "user", "content": "Hello"}
    assert conv["messages"][1]["role"] == "assistant"


def test_chat_with_no_input_exits_0(folder):
    res = cli("chat", "-m", folder, input="")
    assert res.exit_code == 0, res.output
    assert res.stdout == ""


# --------------------------------------------------------------------------- commands, scripted


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def scripted(monkeypatch, tok):
    """Make the commands load a ScriptedModel; returns a function scripts -> the model."""
    import gptoss_mlx.convert.resolve as resolve
    import gptoss_mlx.engine.runtime as runtime

    holder = {}

    def use(*scripts):
        holder["model"] = ScriptedModel(tok.vocab_size, list(scripts))
        return holder["model"]

    def fake_load(path, max_context=None, batch=1, dtype=None):
        return holder["model"], tok, max_context or 131072

    monkeypatch.setattr(resolve, "resolve_model", lambda spec, **kw: Path(spec or "m"))
    monkeypatch.setattr(runtime, "load_for_inference", fake_load)
    return use


def test_generate_scripted_json_is_exact(scripted, tok):
    model = scripted(final_answer(tok, "The user says hi.", "Hi there!"))
    res = cli("generate", "-m", "x", "-p", "Hello", "--json", "-r", "low")
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    n_prompt = len(model.prompts[0])
    assert obj == {
        "final": "Hi there!",
        "reasoning": "The user says hi.",
        "tool_calls": [],
        "finish_reason": "stop",
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": len(final_answer(tok, "The user says hi.", "Hi there!")),
            "total_tokens": n_prompt + len(final_answer(tok, "The user says hi.", "Hi there!")),
        },
    }
    request = parse_chat_request(
        {"messages": [{"role": "user", "content": "Hello"}], "reasoning_effort": "low"}
    )
    # The command pins no date: the session renders today's.
    assert model.prompts[0] == render_prompt(request, tok)


def test_generate_scripted_streams_answer_and_optionally_reasoning(scripted, tok):
    scripted(final_answer(tok, "zebra", "Hi there!"))
    res = cli("generate", "-m", "x", "-p", "Hello")
    assert res.exit_code == 0, res.output
    assert res.stdout == "Hi there!\n"
    assert "zebra" not in res.stderr
    scripted(final_answer(tok, "zebra", "Hi there!"))
    res = cli("generate", "-m", "x", "-p", "Hello", "--show-reasoning")
    assert res.stdout == "Hi there!\n"
    assert "[reasoning] zebra" in res.stderr


def test_generate_scripted_tool_call(scripted, tok, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"tools": [WEATHER_TOOL]}))
    script = tool_call(tok, "plan", "get_weather", '{"city":"Paris"}')
    model = scripted(script)
    res = cli("generate", "-m", "x", "-p", "Weather?", "--tools", str(tools), "--json")
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["finish_reason"] == "tool_calls"
    assert obj["tool_calls"] == [
        {
            "id": "call_0_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    assert contains(model.prompts[0], tok.encode("namespace functions"))
    scripted(script)
    res = cli("generate", "-m", "x", "-p", "Weather?", "--tools", str(tools))
    assert res.stdout == ""  # stdout is the answer alone
    assert '[tool call] get_weather({"city":"Paris"})' in res.stderr


def test_generate_scripted_system_and_developer_become_instructions(scripted, tok):
    model = scripted(final_answer(tok, "a", "b"))
    res = cli("generate", "-m", "x", "-p", "Hi", "--system", "Be brief.", "--developer", "Be kind.")
    assert res.exit_code == 0, res.output
    assert contains(model.prompts[0], tok.encode("Be brief.\n\nBe kind."))


def test_generate_scripted_max_tokens_says_stopped(scripted, tok):
    scripted(final_answer(tok, "a long thought", "never"))
    res = cli("generate", "-m", "x", "-p", "Hi", "-n", "3")
    assert res.exit_code == 0, res.output
    assert "[stopped: max tokens or context limit reached]" in res.stderr


def test_generate_scripted_raw_stops_on_eos_with_stop(scripted, tok):
    text = "fib = lambda n: n"
    model = scripted(tok.encode(text) + ids(tok, "<|endoftext|>") + tok.encode(" junk"))
    res = cli("generate", "-m", "x", "-p", "def fib", "--raw", "--json")
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["text"] == text
    assert obj["finish_reason"] == "stop"
    assert obj["usage"]["completion_tokens"] == len(tok.encode(text)) + 1
    assert model.prompts == [tok.encode("def fib")]  # raw: no harmony around the prompt
    scripted(tok.encode(text) + ids(tok, "<|return|>"))
    res = cli("generate", "-m", "x", "-p", "def fib", "--raw")
    assert res.stdout == text + "\n"


def test_chat_scripted_tool_loop_through_the_command(scripted, tok, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER_TOOL]))
    model = scripted(
        tool_call(tok, "plan", "get_weather", '{"city":"Paris"}'),
        final_answer(tok, "ok", "Sunny."),
    )
    res = cli("chat", "-m", "x", "--tools", str(tools), input='Weather?\n{"temp_c": 21}\n')
    assert res.exit_code == 0, res.output
    assert res.stdout == "Sunny.\n"
    assert 'result of get_weather({"city":"Paris"}) or /skip:' in res.stderr
    result = message_ids(
        tok, "functions.get_weather", "commentary", '{"temp_c": 21}', recipient="assistant"
    )
    assert contains(model.prompts[1], result)


# --------------------------------------------------------------------------- ChatLoop (library)


def run_loop(sess, lines: list[str], **kw) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    stdin = io.StringIO("".join(line + "\n" for line in lines))
    ChatLoop(sess, stdin=stdin, out=out, err=err, **kw).run()
    return out.getvalue(), err.getvalue()


def test_loop_answers_tool_calls_with_the_next_line(tok):
    s, model = session(
        tok,
        [
            tool_call(tok, "plan", "get_weather", '{"city":"Paris"}'),
            final_answer(tok, "ok", "Sunny, 21 C."),
            final_answer(tok, "ok", "You're welcome."),
        ],
        tools=[WEATHER_TOOL],
    )
    out, err = run_loop(s, ["Weather in Paris?", '{"temp_c": 21}', "Thanks"])
    assert out == "Sunny, 21 C.\nYou're welcome.\n"
    assert '[tool call] get_weather({"city":"Paris"})' in err
    assert 'result of get_weather({"city":"Paris"}) or /skip:' in err
    assert [m["role"] for m in s.messages] == [
        "user", "assistant", "tool", "assistant", "user", "assistant",
    ]  # fmt: skip
    assert s.messages[2]["content"] == '{"temp_c": 21}'
    assert s.messages[2]["tool_call_id"] == s.messages[1]["tool_calls"][0]["id"]
    assert len(model.prompts) == 3


def test_loop_skip_declines_the_tool(tok):
    s, _ = session(
        tok,
        [tool_call(tok, "p", "get_weather", "{}"), final_answer(tok, "ok", "Fine.")],
        tools=[WEATHER_TOOL],
    )
    out, _ = run_loop(s, ["Weather?", "/skip"])
    assert out == "Fine.\n"
    assert s.messages[2]["content"] == SKIPPED


def test_loop_end_of_input_at_a_tool_prompt(tok):
    s, _ = session(tok, [tool_call(tok, "p", "get_weather", "{}")], tools=[WEATHER_TOOL])
    _, err = run_loop(s, ["Weather?"])
    assert "[tool call left unanswered]" in err
    assert len(s.pending_tool_calls()) == 1


def test_loop_commands(tok, tmp_path):
    s, model = session(tok, [final_answer(tok, "a", "One."), final_answer(tok, "b", "Two.")])
    saved = tmp_path / "c.json"
    out, err = run_loop(
        s,
        [
            "/help",
            "/system Answer in French.",
            "First",
            f"/save {saved}",
            "/reset",
            "/system",
            f"/load {saved}",
            "/effort",
            "/save",
            "/load",
            "Second",
            "/quit",
            "Never sent",
        ],
    )
    assert out == "One.\nTwo.\n"
    assert HELP in err
    for line in [
        "instructions set",
        "new conversation",
        "instructions cleared",
        f"saved 2 messages to {saved}",
        f"loaded 2 messages from {saved}",
        "usage: /effort low|medium|high (now medium)",
        "usage: /save FILE",
        "usage: /load FILE",
    ]:
        assert line in err.splitlines(), line
    # /load brought the instructions back with the conversation.
    assert s.instructions == "Answer in French."
    assert contains(model.prompts[1], tok.encode("Answer in French."))
    assert contains(model.prompts[1], message_ids(tok, "assistant", "final", "One."))
    assert len(model.prompts) == 2  # /quit: "Never sent" was not sent


def test_loop_multiline_message(tok):
    s, _ = session(tok, [final_answer(tok, "a", "Ok.")])
    run_loop(s, ['"""', "line one", "", "line two", '"""'])
    assert s.messages[0] == {"role": "user", "content": "line one\n\nline two"}


def test_loop_ctrl_c_drops_the_message_and_goes_on(tok):
    s, model = session(
        tok, [final_answer(tok, "a", "never"), final_answer(tok, "b", "Ok.")], interrupt_at=(0, 2)
    )
    out, err = run_loop(s, ["Tell me a story", "Hi"])
    assert "[interrupted: this message was not added to the conversation]" in err
    assert s.messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Ok.", "reasoning_content": "b"},
    ]
    assert out.endswith("Ok.\n")


def test_loop_errors_are_one_line_and_the_loop_goes_on(tok):
    s, _ = session(tok, [final_answer(tok, "a", "Ok.")], max_context=40)
    _, err = run_loop(s, ["Hello", "/stats"])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "context limit is 40" in errors[0]
    assert "no turn yet" in err


def test_loop_verbose_and_length(tok):
    s, _ = session(tok, [final_answer(tok, "a long thought", "never")], max_tokens=3)
    _, err = run_loop(s, ["Hello"], verbose=True)
    assert "[stopped: max tokens or context limit reached]" in err
    assert "tokens/s" in err


def test_loop_hides_reasoning_when_asked(tok):
    s, _ = session(tok, [final_answer(tok, "zebra", "Ok.")])
    out, err = run_loop(s, ["Hi"], show_reasoning=False)
    assert out == "Ok.\n" and "zebra" not in err
    s, _ = session(tok, [final_answer(tok, "zebra", "Ok.")])
    out, err = run_loop(s, ["Hi"])
    assert out == "Ok.\n" and "[reasoning] zebra\n" in err
