"""MCP tools in `chat` and `generate`: the options, consent, and the tool rounds (call, result
back into the conversation, the model goes on).

The engine knows nothing of MCP: the servers' tools are added to the session as ordinary OpenAI
function tools, and their results go back through `ChatSession.send_tool_results`. What a call
does on its server is mcp_client.py's business; what the user agreed to is this module's.

The names and schemas the model sees are mcp_names.py's.

Consent: nothing runs unless `--yes-tools`, the tool is in `--allow-tools`, or the user says `y`
(once) or `a` (always, this session) at the prompt; `n` declines and the model is told. Where no
one can answer a prompt (generate, piped stdin) the command refuses to start without one of the
two options, before the model loads.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from .mcp_names import McpTool, assign_names

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_START_TIMEOUT_S = 60.0  # `npx -y SERVER` may download the server on its first start
DEFAULT_MAX_ROUNDS = 10
MAX_RESULT_CHARS = 32_000  # ~8k tokens: one tool result must not swallow the context
DECLINED = '{"error": "the user declined to run this tool"}'


def mcp_options(fn):
    """The options `chat` and `generate` share for MCP tools."""
    opts = [
        click.option(
            "--mcp",
            "mcp_config",
            metavar="FILE",
            default=None,
            help='MCP servers whose tools the model may call: a JSON file {"mcpServers": {...}} '
            "as LM Studio and Claude Desktop use (stdio: command/args/env; HTTP: url).",
        ),
        click.option(
            "--allow-tools",
            "allow_tools",
            metavar="NAME,...",
            multiple=True,
            help="MCP tools that run without asking (names as listed at start).",
        ),
        click.option("--yes-tools", is_flag=True, help="Run every MCP tool call without asking."),
        click.option(
            "--tool-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            metavar="SECONDS",
            help=f"Most seconds an MCP tool call may take; then the model is told it timed out "
            f'[default: {DEFAULT_TIMEOUT_S:g}; a server\'s "timeout" in the config wins].',
        ),
        click.option(
            "--mcp-start-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            metavar="SECONDS",
            help=f"Most seconds an MCP server may take to start and list its tools "
            f"[default: {DEFAULT_START_TIMEOUT_S:g}].",
        ),
        click.option(
            "--max-tool-rounds",
            type=click.IntRange(min=1),
            default=None,
            metavar="N",
            help=f"Most rounds of MCP tool calls per message; then the model must answer "
            f"[default: {DEFAULT_MAX_ROUNDS}].",
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@dataclass
class Consent:
    """Who may run what: `--yes-tools`, `--allow-tools`, and the `a` answers of this session."""

    allowed: set[str] = field(default_factory=set)
    yes_all: bool = False
    interactive: bool = False

    def decide(self, tool: McpTool, arguments: str, ask: Callable[[str], str]) -> str | None:
        """None to run the call, else the result the model gets instead. `ask` reads one answer
        (EOFError/KeyboardInterrupt pass through: the caller leaves the call unanswered)."""
        if self.yes_all or tool.name in self.allowed:
            return None
        if not self.interactive:
            return json.dumps({"error": "not allowed: this tool was not approved for this session"})
        prompt = f"run {tool.name}({arguments}) on {tool.server}? [y]es, [a]lways, [n]o: "
        while True:
            raw = ask(prompt)
            _forget_in_history(raw)
            answer = raw.strip().lower()
            if answer in ("y", "yes"):
                return None
            if answer in ("a", "always"):
                self.allowed.add(tool.name)
                return None
            if answer in ("n", "no"):
                return DECLINED


def _forget_in_history(line: str) -> None:
    """Keep y/a/n out of the chat's readline history (the up arrow should bring back messages)."""
    rl = sys.modules.get("readline")
    n = rl.get_current_history_length() if rl is not None else 0
    if n and line.strip() and rl.get_history_item(n) == line:
        rl.remove_history_item(n - 1)


def _one_line(text: str, limit: int = 120) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class ToolRunner:
    """Answers the model's calls to MCP tools, with consent, within a number of rounds."""

    def __init__(self, servers: Any, consent: Consent, max_rounds: int):
        self.servers = servers
        self.consent = consent
        self.max_rounds = max_rounds
        self.tools: dict[str, McpTool] = {}
        self.manual: set[str] = set()  # --tools functions: answered by the user, not by us
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def attach(self, session: Any, say: Callable[[str], None]) -> None:
        """Wait for the servers, then offer their tools to `session` next to its --tools."""
        found, failures = self.servers.wait_ready()
        for line in failures:
            say(f"mcp: {line}")
        self.manual = {t["function"]["name"] for t in session.tools if "function" in t}
        self.tools = {t.name: t for t in assign_names(found, self.manual)}
        for name in sorted(self.consent.allowed - set(self.tools)):
            say(f"mcp: --allow-tools {name}: no such tool (the tools: {', '.join(self.tools)})")
        self.offer(session)
        names = ", ".join(self.tools) or "none"
        n, up = len(self.servers.conns), len(self.servers.conns) - len(failures)
        say(f"mcp: {len(self.tools)} tools from {up} of {n} servers: {names}")

    def offer(self, session: Any) -> None:
        """Declare the MCP tools in `session`: at the start, and again after /load (a saved chat
        brings its own tools; a function of the same name as an MCP tool gives way to it)."""
        others = [t for t in session.tools if t.get("function", {}).get("name") not in self.tools]
        self.manual = {t["function"]["name"] for t in others if "function" in t}
        session.tools = others + [t.function_tool() for t in self.tools.values()]
        session.request()  # the prompt must render with them: check now, not at the first turn

    def handles(self, call: dict[str, Any]) -> bool:
        return call["function"]["name"] not in self.manual

    def answer(
        self, call: dict[str, Any], ask: Callable[[str], str], say: Callable[[str], None]
    ) -> str:
        """Run one call (if allowed) and return what the model gets; one line for the user."""
        fn = call["function"]
        name, arguments = fn["name"], fn.get("arguments") or "{}"
        tool = self.tools.get(name)
        if tool is None:
            say(f"[tool error] {name}: no such tool")
            known = ", ".join(self.tools) or "none"
            return json.dumps({"error": f"no tool named {name!r}; the tools are: {known}"})
        try:
            args = json.loads(arguments)
        except ValueError as e:
            args, problem = None, f"arguments are not valid JSON ({e})"
        else:
            problem = None if isinstance(args, dict) else "arguments must be a JSON object"
        if problem is not None:
            say(f"[tool error] {name}: {problem}")
            return json.dumps({"error": problem})
        refused = self.consent.decide(tool, arguments, ask)
        if refused is not None:
            why = "declined" if refused == DECLINED else "not in --allow-tools"
            say(f"[tool not run] {name}: {why}")
            return refused
        from .mcp_client import ToolCallError

        try:
            result = self.servers.call(tool.server, tool.tool, args)
        except ToolCallError as e:
            say(f"[tool error] {name}: {e}")
            return json.dumps({"error": str(e)}, ensure_ascii=False)
        text, note = result.text, ""
        if len(text) > MAX_RESULT_CHARS:
            cut = len(text) - MAX_RESULT_CHARS
            note = f" ({len(text)} characters: the last {cut} left out)"
            text = f"{text[:MAX_RESULT_CHARS]}\n[... {cut} more characters left out]"
        if result.is_error:
            say(f"[tool error] {name}: {_one_line(text)}{note}")
            return json.dumps({"error": text}, ensure_ascii=False)
        say(f"[tool result] {name}: {_one_line(text)}{note}")
        return text

    def limit(
        self, calls: list[dict[str, Any]], session: Any, say: Callable[[str], None]
    ) -> list[tuple[dict[str, Any], str]] | None:
        """The round limit (--max-tool-rounds) for this round of `calls`: [] within it; past it,
        an error for each call that tells the model to answer now; None (stop) if it still calls
        tools after that."""
        rounds = tool_rounds(session.messages)
        if rounds > self.max_rounds + 1:
            say(f"[stopped: still calling tools after the limit of {self.max_rounds} rounds]")
            return None
        if rounds > self.max_rounds:
            say(f"[tool limit] {self.max_rounds} rounds of tool calls: the model must answer now")
            limit = f"tool-call limit reached ({self.max_rounds} rounds); answer without tools"
            return [(c, json.dumps({"error": limit})) for c in calls]
        return []

    def run_rounds(self, session: Any, result: Any, on_event: Any, say: Callable[[str], None]):
        """generate's loop: answer tool calls until the model answers (or stops); the last
        turn's result. Usage is summed over the turns in `self.usage`."""
        self._count(result)
        while result.tool_calls:
            calls = session.pending_tool_calls()
            if not all(self.handles(c) for c in calls):
                break  # a --tools function: generate prints the call, as without --mcp
            answers = self.limit(calls, session, say)
            if answers is None:
                break
            if not answers:
                answers = [(c, self.answer(c, _no_prompt, say)) for c in calls]
            result = session.send_tool_results(answers, on_event)
            self._count(result)
        return result

    def json(self, result: Any, session: Any) -> dict[str, Any]:
        """generate --json after tool rounds: the last turn, usage summed over every turn, and
        the conversation (the calls and their results) as OpenAI-shaped messages."""
        return {**result.to_json(), "usage": dict(self.usage), "messages": session.messages}

    def _count(self, result: Any) -> None:
        for k, v in result.usage.items():
            self.usage[k] += v


def _no_prompt(_prompt: str) -> str:
    raise EOFError  # generate never asks: Consent is non-interactive there


def tool_rounds(messages: Sequence[dict[str, Any]]) -> int:
    """Assistant messages with tool calls since the last user message: this message's rounds."""
    n = 0
    for m in reversed(messages):
        if m.get("role") == "user":
            break
        if m.get("role") == "assistant" and m.get("tool_calls"):
            n += 1
    return n


def _allowed(values: Sequence[str]) -> set[str]:
    return {n.strip() for v in values for n in v.split(",") if n.strip()}


def _log_dir() -> Path:
    """Where servers' stderr goes: $GPTOSS_MLX_HOME/mcp-logs, or a temporary folder."""
    from gptoss_mlx.convert.resolve import home

    path = home() / "mcp-logs"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        return Path(tempfile.mkdtemp(prefix="gptoss-mlx-mcp-"))


@contextmanager
def mcp_tools(
    opts: dict[str, Any], *, interactive: bool, command: str, raw: bool = False
) -> Iterator[ToolRunner | None]:
    """Take the MCP options out of `opts`; with --mcp, check them (before any model loads), start
    the servers in the background and yield the runner; stop every server on the way out.
    `raw`: generate --raw, a plain completion with no tools to offer."""
    config_path = opts.pop("mcp_config", None)
    allowed = _allowed(opts.pop("allow_tools", ()) or ())
    yes_all = opts.pop("yes_tools", False)
    timeout = opts.pop("tool_timeout", None)
    start_timeout = opts.pop("mcp_start_timeout", None)
    max_rounds = opts.pop("max_tool_rounds", None)
    if config_path is None:
        given = [
            flag
            for flag, value in (
                ("--allow-tools", allowed),
                ("--yes-tools", yes_all),
                ("--tool-timeout", timeout),
                ("--mcp-start-timeout", start_timeout),
                ("--max-tool-rounds", max_rounds),
            )
            if value
        ]
        if given:
            raise UsageError(f"{given[0]} applies to MCP tools: pass --mcp FILE too")
        yield None
        return
    if raw:
        raise UsageError("--mcp does not apply to --raw (a plain completion has no tools)")
    if allowed and yes_all:
        raise UsageError("--allow-tools and --yes-tools: pass one or the other")
    if not interactive and not (allowed or yes_all):
        where = "generate" if command == "generate" else "chat with stdin not a terminal"
        raise UsageError(
            f"--mcp: {where} cannot ask before running a tool; "
            "pass --allow-tools NAME,... or --yes-tools"
        )
    from .mcp_client import McpServers
    from .mcp_config import load_mcp_config

    config = load_mcp_config(config_path)
    for key in config.ignored:
        click.echo(f"mcp: {config.path}: {key} ignored (not used by gptoss-mlx)", err=True)
    if not config.servers:
        click.echo(f"mcp: {config.path}: every server is disabled", err=True)
    servers = McpServers(
        config.servers,
        timeout=timeout or DEFAULT_TIMEOUT_S,
        start_timeout=start_timeout or DEFAULT_START_TIMEOUT_S,
        log_dir=_log_dir(),
    )
    consent = Consent(allowed, yes_all, interactive)
    previous = _exit_on_hangup()
    try:
        servers.start()
        yield ToolRunner(servers, consent, max_rounds or DEFAULT_MAX_ROUNDS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        servers.close()


def _exit_on_hangup() -> dict[int, Any]:
    """SIGTERM and SIGHUP (a closed terminal) end the command through its `finally`s, so the
    servers are stopped rather than left to notice their closed stdin. Returns what to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def leave(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    sigs = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    return {sig: signal.signal(sig, leave) for sig in sigs}


def echo_err(line: str) -> None:
    click.echo(line, err=True)
    sys.stderr.flush()
