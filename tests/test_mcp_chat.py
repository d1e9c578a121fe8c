"""MCP tools in `chat` and `generate`, end to end: the scripted model of scripted_chat.py calls
tools of real stdio servers (tests/mcp_test_server.py), through the CLI (click's runner, and real
processes for signals and a terminal) and through ChatLoop.

The oracles: the harmony prompt the model is given, rendered independently from hand-written
OpenAI function tools (the schemas as the SDK's MCPServer derives them from Python signatures);
the tool messages the model then sees, token for token; what the user sees on stderr; and the
server pids, which must all be gone when the command ends.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gptoss_mlx.cli import main
from gptoss_mlx.cli.mcp_client import McpServers
from gptoss_mlx.cli.mcp_config import parse_mcp_config
from gptoss_mlx.cli.mcp_tools import DECLINED, Consent, ToolRunner, mcp_tools
from gptoss_mlx.cli.repl import ChatLoop
from gptoss_mlx.harmony.render import render_prompt
from gptoss_mlx.harmony.request import parse_chat_request
from mcp_helpers import pids, serve_http, stdio_entry, wait_gone
from scripted_chat import (
    WEATHER_TOOL,
    ScriptedModel,
    contains,
    final_answer,
    make_tokenizer,
    message_ids,
    session,
    tool_call,
)

DRIVER = str(Path(__file__).with_name("mcp_chat_driver.py"))

# What the model must be offered for alpha (add, who) + beta (who): `who` collides, so both get
# their server's prefix; `add` keeps its name. Schemas as MCPServer writes them.
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"title": "A", "type": "integer"},
                "b": {"title": "B", "type": "integer"},
            },
            "required": ["a", "b"],
            "title": "addArguments",
        },
    },
}


def who(name: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": "The server's name and the MCP_TEST_VALUE environment variable.",
            "parameters": {"type": "object", "properties": {}, "title": "whoArguments"},
        },
    }


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPTOSS_MLX_MODEL", raising=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def scripted(monkeypatch, tok):
    """Make the commands load a ScriptedModel; returns scripts -> the model. `loads` counts."""
    import gptoss_mlx.convert.resolve as resolve
    import gptoss_mlx.engine.runtime as runtime

    holder = {"loads": 0}

    def use(*scripts):
        holder["model"] = ScriptedModel(tok.vocab_size, list(scripts))
        return holder["model"]

    def fake_load(path, max_context=None, batch=1, dtype=None):
        holder["loads"] += 1
        return holder["model"], tok, max_context or 131072

    monkeypatch.setattr(resolve, "resolve_model", lambda spec, **kw: Path(spec or "m"))
    monkeypatch.setattr(runtime, "load_for_inference", fake_load)
    use.holder = holder
    return use


def write_config(path: Path, servers: dict) -> str:
    path.write_text(json.dumps({"mcpServers": servers}))
    return str(path)


@pytest.fixture
def two_servers(tmp_path):
    """alpha (add, who) and beta (who), recording their pids; returns (config path, pidfile)."""
    pidfile = tmp_path / "pids"
    cfg = write_config(
        tmp_path / "mcp.json",
        {
            "alpha": stdio_entry("alpha", "--tools", "add,who", pidfile=pidfile),
            "beta": stdio_entry("beta", "--tools", "who", pidfile=pidfile),
        },
    )
    return cfg, pidfile


@pytest.fixture(scope="module")
def web_alpha():
    """alpha (add, who) over Streamable HTTP, started once for the tests that need no process
    of their own; yields its config entry."""
    proc, port = serve_http("streamable-http", "alpha", "--tools", "add,who")
    yield {"alpha": {"url": f"http://127.0.0.1:{port}/mcp"}}
    proc.terminate()
    proc.wait(timeout=30)


def cli(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def tool_result(tok, name: str, content: str) -> list[int]:
    """A tool's result as the model sees it in its next prompt."""
    return message_ids(tok, f"functions.{name}", "commentary", content, recipient="assistant")


# --------------------------------------------------------------------------- generate


def test_generate_runs_tools_over_rounds_until_the_answer(scripted, tok, two_servers):
    cfg, pidfile = two_servers
    model = scripted(
        tool_call(tok, "sum", "add", '{"a": 2, "b": 3}'),
        tool_call(tok, "who", "beta_who", "{}"),
        final_answer(tok, "done", "5, from beta."),
    )
    res = cli("generate", "-m", "x", "-p", "2+3?", "--mcp", cfg, "--yes-tools", "--json")
    assert res.exit_code == 0, res.output
    request = parse_chat_request(
        {
            "messages": [{"role": "user", "content": "2+3?"}],
            "tools": [ADD, who("alpha_who"), who("beta_who")],
        }
    )
    assert model.prompts[0] == render_prompt(request, tok)
    assert contains(model.prompts[1], tool_result(tok, "add", "5"))
    assert contains(model.prompts[2], tool_result(tok, "beta_who", "beta:"))  # beta's, not alpha's
    obj = json.loads(res.stdout)
    assert obj["final"] == "5, from beta."
    assert [m["role"] for m in obj["messages"]] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]  # fmt: skip
    assert [m["content"] for m in obj["messages"] if m["role"] == "tool"] == ["5", "beta:"]
    n_prompts = sum(len(p) for p in model.prompts)
    assert obj["usage"]["prompt_tokens"] == n_prompts  # summed over the three turns
    assert (
        res.stderr.splitlines()[0] == "mcp: 3 tools from 2 of 2 servers: add, alpha_who, beta_who"
    )
    assert "[tool result] add: 5" in res.stderr
    assert "[tool result] beta_who: beta:" in res.stderr
    assert wait_gone(pids(pidfile)) == [] and len(pids(pidfile)) == 2


def test_generate_without_consent_refuses_before_loading_anything(scripted, two_servers):
    cfg, pidfile = two_servers
    scripted()
    res = cli("generate", "-m", "x", "-p", "hi", "--mcp", cfg)
    assert res.exit_code == 2
    assert res.stderr == (
        "error: --mcp: generate cannot ask before running a tool; "
        "pass --allow-tools NAME,... or --yes-tools\n"
    )
    assert scripted.holder["loads"] == 0 and pids(pidfile) == []  # no model, no server


def test_generate_allow_tools_runs_those_and_tells_the_model_about_others(
    scripted, tok, web_alpha, tmp_path
):
    cfg = write_config(tmp_path / "mcp.json", web_alpha)
    model = scripted(
        tool_call(tok, "a", "who", "{}"),
        tool_call(tok, "b", "add", '{"a": 1, "b": 1}'),
        final_answer(tok, "c", "2."),
    )
    res = cli("generate", "-m", "x", "-p", "?", "--mcp", cfg, "--allow-tools", "add,nosuch")
    assert res.exit_code == 0, res.output
    assert res.stdout == "2.\n"
    refused = '{"error": "not allowed: this tool was not approved for this session"}'
    assert contains(model.prompts[1], tool_result(tok, "who", refused))
    assert contains(model.prompts[2], tool_result(tok, "add", "2"))
    assert "[tool not run] who: not in --allow-tools" in res.stderr
    assert "mcp: --allow-tools nosuch: no such tool (the tools: add, who)" in res.stderr


def test_generate_max_tool_rounds(scripted, tok, web_alpha, tmp_path):
    cfg = write_config(tmp_path / "mcp.json", web_alpha)
    call = tool_call(tok, "again", "add", '{"a": 1, "b": 2}')
    model = scripted(call, call, call)
    res = cli(
        "generate", "-m", "x", "-p", "?", "--mcp", cfg, "--yes-tools", "--max-tool-rounds", "1"
    )
    assert res.exit_code == 0, res.output
    limit = '{"error": "tool-call limit reached (1 rounds); answer without tools"}'
    assert contains(model.prompts[1], tool_result(tok, "add", "3"))
    assert contains(model.prompts[2], tool_result(tok, "add", limit))
    assert len(model.prompts) == 3
    assert "[tool limit] 1 rounds of tool calls: the model must answer now" in res.stderr
    assert "[stopped: still calling tools after the limit of 1 rounds]" in res.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--yes-tools"], "error: --yes-tools applies to MCP tools: pass --mcp FILE too\n"),
        (
            ["--allow-tools", "x"],
            "error: --allow-tools applies to MCP tools: pass --mcp FILE too\n",
        ),
        (
            ["--max-tool-rounds", "3"],
            "error: --max-tool-rounds applies to MCP tools: pass --mcp FILE too\n",
        ),
        (
            ["--mcp", "{cfg}", "--yes-tools", "--allow-tools", "add"],
            "error: --allow-tools and --yes-tools: pass one or the other\n",
        ),
    ],
)
def test_generate_option_misuse_is_one_line(scripted, two_servers, args, message):
    cfg, pidfile = two_servers
    scripted()
    res = cli("generate", "-m", "x", "-p", "hi", *[a.replace("{cfg}", cfg) for a in args])
    assert res.exit_code == 2 and res.stderr == message
    assert scripted.holder["loads"] == 0 and pids(pidfile) == []


def test_generate_raw_refuses_mcp(scripted, two_servers):
    cfg, pidfile = two_servers
    scripted()
    res = cli("generate", "-m", "x", "-p", "hi", "--raw", "--mcp", cfg, "--yes-tools")
    assert res.exit_code == 2
    (line,) = res.stderr.splitlines()  # generate's own --raw check, or mcp_tools'
    assert line.startswith("error: ") and "--mcp" in line and "--raw" in line
    assert scripted.holder["loads"] == 0 and pids(pidfile) == []


def test_bad_config_is_one_line_naming_file_and_field(scripted, tmp_path):
    scripted()
    cfg = write_config(tmp_path / "mcp.json", {"files": {"command": "npx", "args": "-y server"}})
    res = cli("chat", "-m", "x", "--mcp", cfg, "--yes-tools", input="hi\n")
    assert res.exit_code == 2
    assert res.stderr == f"error: {cfg}: mcpServers.files.args: expected a list of strings\n"
    assert scripted.holder["loads"] == 0


# --------------------------------------------------------------------------- chat, piped


def test_chat_tool_failures_reach_the_model_and_the_chat_goes_on(scripted, tok, tmp_path):
    pidfile = tmp_path / "pids"
    cfg = write_config(
        tmp_path / "mcp.json",
        {
            "alpha": stdio_entry("alpha", "--tools", "echo,fail,slow,crash", pidfile=pidfile),
            "dead": stdio_entry("dead", "--start", "exit"),
        },
    )
    model = scripted(
        tool_call(tok, "1", "fail", '{"why": "disk full"}'),
        final_answer(tok, "1", "It failed."),
        tool_call(tok, "2", "slow", '{"seconds": 60}'),
        final_answer(tok, "2", "Too slow."),
        tool_call(tok, "3", "crash", "{}"),
        final_answer(tok, "3", "It crashed."),
        tool_call(tok, "4", "echo", '{"text": "back"}'),
        final_answer(tok, "4", "Back."),
    )
    res = cli(
        "chat", "-m", "x", "--mcp", cfg, "--yes-tools", "--tool-timeout", "3",
        input="fail\nslow\ncrash\necho\n",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stdout == "It failed.\nToo slow.\nIt crashed.\nBack.\n"
    err = res.stderr.splitlines()
    assert err[0].startswith("mcp: server 'dead' did not start: it exited (stderr: dead: cannot")
    assert err[1] == "mcp: 4 tools from 1 of 2 servers: echo, fail, slow, crash"
    expected = [
        ("fail", '{"error": "Error executing tool fail: failed on purpose: disk full"}'),
        ("slow", '{"error": "server \'alpha\' gave no answer within 3 s"}'),
        ("crash", '{"error": "server \'alpha\' stopped: it exited (stderr: crashing now)"}'),
        ("echo", "back"),  # restarted after the crash
    ]
    for turn, (name, content) in enumerate(expected):
        assert contains(model.prompts[2 * turn + 1], tool_result(tok, name, content)), name
    assert "[tool error] slow: server 'alpha' gave no answer within 3 s" in err
    assert "[tool error] crash: server 'alpha' stopped: it exited (stderr: crashing now)" in err
    assert "[tool result] echo: back" in err
    assert len(pids(pidfile)) == 2 and wait_gone(pids(pidfile)) == []


def test_chat_piped_needs_consent_options(scripted, two_servers):
    cfg, pidfile = two_servers
    scripted()
    res = cli("chat", "-m", "x", "--mcp", cfg, input="hi\n")
    assert res.exit_code == 2
    assert res.stderr == (
        "error: --mcp: chat with stdin not a terminal cannot ask before running a tool; "
        "pass --allow-tools NAME,... or --yes-tools\n"
    )
    assert scripted.holder["loads"] == 0 and pids(pidfile) == []


# --------------------------------------------------------------------------- ChatLoop, a terminal


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def alpha(tmp_path_factory):
    """One alpha server (echo, add) shared by the ChatLoop tests; each makes its own runner."""
    cfg = parse_mcp_config(
        {"mcpServers": {"alpha": stdio_entry("alpha", "--tools", "echo,add,big")}}
    )
    logs = tmp_path_factory.mktemp("logs")
    servers = McpServers(cfg.servers, timeout=30, start_timeout=60, log_dir=logs)
    servers.start()
    yield servers
    servers.close()


def run_terminal(monkeypatch, sess, servers, answers: list, **runner_kw):
    """ChatLoop as on a terminal: `answers` are typed at the prompts (an exception is raised)."""
    import builtins

    import gptoss_mlx.cli.repl as repl

    prompts = []

    def fake_input(prompt=""):
        prompts.append(prompt)
        if not answers:
            raise EOFError
        a = answers.pop(0)
        if isinstance(a, BaseException):
            raise a
        return a

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(repl, "_setup_history", lambda: None)
    err = io.StringIO()
    runner = ToolRunner(servers, Consent(interactive=True, **runner_kw), max_rounds=10)
    runner.attach(sess, lambda line: print(line, file=err))
    out = io.StringIO()
    ChatLoop(sess, stdin=Terminal(), out=out, err=err, tools=runner).run()
    return out.getvalue(), err.getvalue(), prompts


ASK = "run {}({}) on alpha? [y]es, [a]lways, [n]o: "


def test_terminal_approvals_yes_always_no(monkeypatch, tok, alpha):
    add = '{"a": 1, "b": 2}'
    s, model = session(
        tok,
        [
            tool_call(tok, "1", "add", add),
            final_answer(tok, "1", "3."),
            tool_call(tok, "2", "add", add),
            final_answer(tok, "2", "3 again."),
            tool_call(tok, "3", "add", add),  # always: not asked
            tool_call(tok, "3", "echo", '{"text": "x"}'),  # another tool: asked, declined
            final_answer(tok, "3", "Fine."),
        ],
    )
    answers = ["first", "y", "second", "maybe", "a", "third", "n"]
    out, err, prompts = run_terminal(monkeypatch, s, alpha, answers)
    assert out == "3.\n3 again.\nFine.\n"
    assert prompts == [
        ">>> ", ASK.format("add", add),
        ">>> ", ASK.format("add", add), ASK.format("add", add),  # "maybe" is asked again
        ">>> ", ASK.format("echo", '{"text": "x"}'),
        ">>> ",
    ]  # fmt: skip
    tool_msgs = [m["content"] for m in s.messages if m["role"] == "tool"]
    assert tool_msgs == ["3", "3", "3", DECLINED]
    assert contains(model.prompts[6], tool_result(tok, "echo", DECLINED))
    assert "[tool not run] echo: declined" in err


def test_terminal_ctrl_c_at_the_approval_leaves_the_call_unanswered(monkeypatch, tok, alpha):
    s, _ = session(
        tok,
        [tool_call(tok, "1", "add", '{"a": 1, "b": 2}'), final_answer(tok, "2", "Hi.")],
    )
    out, err, _ = run_terminal(monkeypatch, s, alpha, ["add", KeyboardInterrupt(), "hello"])
    assert "[tool call left unanswered]" in err
    assert out == "Hi.\n"  # the chat went on
    assert not [m for m in s.messages if m["role"] == "tool"]  # nothing ran


def test_tools_file_functions_are_still_answered_by_hand(monkeypatch, tok, alpha):
    s, model = session(
        tok,
        [
            tool_call(tok, "1", "get_weather", '{"city": "Paris"}'),
            tool_call(tok, "2", "add", '{"a": 2, "b": 2}'),
            final_answer(tok, "3", "Sunny, and 4."),
        ],
        tools=[WEATHER_TOOL],
    )
    answers = ["weather", '{"temp_c": 21}']
    out, _, prompts = run_terminal(monkeypatch, s, alpha, answers, allowed={"add"})
    assert out == "Sunny, and 4.\n"
    assert prompts[1] == 'result of get_weather({"city": "Paris"}) or /skip: '
    assert [m["content"] for m in s.messages if m["role"] == "tool"] == ['{"temp_c": 21}', "4"]
    assert [t["function"]["name"] for t in s.tools] == ["get_weather", "echo", "add", "big"]
    assert contains(model.prompts[2], tool_result(tok, "add", "4"))


def test_a_long_result_is_cut_and_the_model_told(monkeypatch, tok, alpha):
    s, _ = session(
        tok, [tool_call(tok, "1", "big", '{"n": 40000}'), final_answer(tok, "2", "Long.")]
    )
    _, err, _ = run_terminal(monkeypatch, s, alpha, ["go"], yes_all=True)
    (result,) = [m["content"] for m in s.messages if m["role"] == "tool"]
    assert result == "x" * 32000 + "\n[... 8000 more characters left out]"
    line = "[tool result] big: " + "x" * 119 + "… (40000 characters: the last 8000 left out)"
    assert line in err.splitlines()


def test_load_keeps_the_mcp_tools_declared(monkeypatch, tok, alpha, tmp_path):
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": []}))
    s, model = session(
        tok, [tool_call(tok, "1", "add", '{"a": 5, "b": 5}'), final_answer(tok, "2", "10.")]
    )
    out, err, _ = run_terminal(
        monkeypatch, s, alpha, [f"/load {saved}", "and now?"], allowed={"add"}
    )
    assert f"loaded 1 messages from {saved}" in err
    assert [t["function"]["name"] for t in s.tools] == ["echo", "add", "big"]
    assert out == "10.\n"
    assert contains(model.prompts[1], tool_result(tok, "add", "10"))


# --------------------------------------------------------------------------- real processes


def _driver(turns, *args, **popen_kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("GPTOSS_MLX_MODEL", None)
    return subprocess.Popen([sys.executable, DRIVER, json.dumps(turns), *args], env=env, **popen_kw)


class PtyReader:
    """What a process wrote to a pty, read as it comes; `expect` moves past each thing seen."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.pos = fd, bytearray(), 0

    def expect(self, needle: bytes, within: float = 120) -> None:
        deadline = time.monotonic() + within
        while (at := self.buf.find(needle, self.pos)) < 0:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {needle!r}; got {bytes(self.buf)[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the other end closed
                    chunk = b""
                assert chunk, f"closed before {needle!r}; got {bytes(self.buf)[-2000:]!r}"
                self.buf += chunk
        self.pos = at + len(needle)


def _wait_draining(p: subprocess.Popen, term: PtyReader, within: float = 120) -> int:
    """Wait for `p` to exit, reading its terminal meanwhile (a full pty would block it)."""
    deadline = time.monotonic() + within
    while p.poll() is None:
        assert time.monotonic() < deadline, f"still running; got {bytes(term.buf)[-2000:]!r}"
        ready, _, _ = select.select([term.fd], [], [], 0.1)
        if ready:
            try:
                term.buf += os.read(term.fd, 4096)
            except OSError:
                pass
    return p.returncode


def test_a_closed_terminal_stops_the_servers(tmp_path):
    """SIGHUP (the terminal closed) ends the command through its cleanup, like SIGTERM."""
    pidfile = tmp_path / "pids"
    cfg = write_config(
        tmp_path / "mcp.json", {"alpha": stdio_entry("alpha", "--tools", "echo", pidfile=pidfile)}
    )
    before = signal.getsignal(signal.SIGHUP)
    opts = {"mcp_config": cfg, "yes_tools": True}
    with pytest.raises(SystemExit) as e:
        with mcp_tools(opts, interactive=False, command="chat") as runner:
            runner.servers.wait_ready()
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(30)  # the handler raises here
    assert e.value.code == 128 + signal.SIGHUP
    assert signal.getsignal(signal.SIGHUP) is before  # restored
    assert len(pids(pidfile)) == 1 and wait_gone(pids(pidfile)) == []


def test_a_real_terminal_ctrl_c_and_sigterm(tmp_path):
    """One chat on a pseudo-terminal: approvals typed at a real tty (a, then y), Ctrl-C during a
    call ends that call only, SIGTERM during a call ends the command, and no server is left."""
    import pty

    pidfile = tmp_path / "pids"
    cfg = write_config(
        tmp_path / "mcp.json",
        {"alpha": stdio_entry("alpha", "--tools", "add,slow", pidfile=pidfile)},
    )
    slow = '{"seconds": 600}'
    turns = [
        ["call", "slow", slow],  # interrupted by Ctrl-C
        ["call", "add", '{"a": 20, "b": 22}'],
        ["final", "It is 42."],
        ["call", "slow", slow],  # interrupted by SIGTERM
    ]
    master, slave = pty.openpty()
    p = _driver(turns, "chat", "-m", "x", "--mcp", cfg, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    term = PtyReader(master)
    try:
        term.expect(b">>> ")
        os.write(master, b"wait a while\n")
        term.expect(f"run slow({slow}) on alpha? [y]es, [a]lways, [n]o: ".encode())
        os.write(master, b"a\n")
        time.sleep(1.0)  # the call is on its server
        p.send_signal(signal.SIGINT)
        term.expect(b"[tool call left unanswered]")
        term.expect(b">>> ")
        os.write(master, b"what is 20+22?\n")
        term.expect(b'run add({"a": 20, "b": 22}) on alpha? [y]es, [a]lways, [n]o: ')
        os.write(master, b"y\n")
        term.expect(b"It is 42.")
        term.expect(b">>> ")
        os.write(master, b"once more\n")
        term.expect(b"[tool call] slow")  # always: not asked again
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        assert _wait_draining(p, term) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    text = term.buf.decode(errors="replace")
    assert "[tool result] add: 42" in text
    assert text.count("run slow(") == 1
    assert "Traceback" not in text
    assert len(pids(pidfile)) == 1 and wait_gone(pids(pidfile)) == []
