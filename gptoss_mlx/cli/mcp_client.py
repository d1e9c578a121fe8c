"""A synchronous facade over the official MCP SDK's asyncio client, for the synchronous chat.

The SDK is async and its transports are async context managers that must be entered and left by
the same task (a stdio server is a child process whose shutdown is part of leaving). So one
background thread runs an asyncio loop, and each server is held open by one task there that
enters `mcp.Client`, lists the tools, and waits for the order to stop. The chat thread submits
calls with `run_coroutine_threadsafe` and waits for them; Ctrl-C there cancels the call.

Nothing a server does raises past this module: a server that cannot start, exits, stops answering
(past its timeout) or answers with an error becomes a `ToolCallError` or a failure line, with the
last line it wrote to stderr. Servers' stderr and the SDK's own log go to files in `log_dir`, so
they never scribble over the chat. `close()` stops every server (stdin closed, then SIGTERM, then
SIGKILL to its process group: the SDK's shutdown sequence) before the thread ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import threading
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from .mcp_config import ServerSpec

# A server gets this long to stop cleanly after its tool call was answered with a timeout or after
# close(); the SDK's own escalation (close stdin, 2 s, SIGTERM, 2 s, SIGKILL) fits within it.
STOP_GRACE_S = 10.0
MAX_TOOL_PAGES = 100  # tools/list pages read from one server (a paginator that never ends)


class ToolCallError(Exception):
    """A call that produced no result: the server is down, too slow, or broke the protocol."""


@dataclass(frozen=True)
class ServerTool:
    """A tool as its server lists it."""

    server: str
    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class CallResult:
    """A tool's answer as text for the model; `is_error` when the tool itself reported failure."""

    text: str
    is_error: bool


class _Connection:
    """One server: the task that holds its `mcp.Client` open, and how to reach it."""

    def __init__(self, spec: ServerSpec, timeout: float, start_timeout: float, log_path: Path):
        self.spec = spec
        self.timeout = spec.timeout or timeout  # each call
        self.start_timeout = start_timeout  # starting (npx may download the server first)
        self.log_path = log_path
        self.client: Any = None
        self.task: asyncio.Task | None = None
        self.stop: asyncio.Event | None = None

    def transport(self, log: Any) -> Any:
        from mcp.client.sse import sse_client
        from mcp.client.stdio import StdioServerParameters, stdio_client

        spec = self.spec
        if spec.kind == "stdio":
            params = StdioServerParameters(
                command=spec.command, args=list(spec.args), env=spec.env or None, cwd=spec.cwd
            )
            return stdio_client(params, errlog=log)
        if spec.kind == "sse":
            return sse_client(spec.url, headers=spec.headers or None)
        return _streamable_http(spec.url, spec.headers)

    def stderr_tail(self) -> str:
        """The last line the server wrote to stderr, to say why it failed."""
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        lines = [line.strip() for line in lines if line.strip()]
        return lines[-1][:200] if lines else ""


@asynccontextmanager
async def _streamable_http(url: str, headers: dict[str, str]):
    """Streamable HTTP with the config's headers (the SDK takes them through its httpx client)."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    timeout = httpx2.Timeout(30.0, read=300.0)  # the SDK's defaults for MCP over HTTP
    async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            yield streams


def _leaf(e: BaseException) -> BaseException:
    """The first real error inside the exception groups the SDK's task groups wrap errors in."""
    while getattr(e, "exceptions", None):
        e = e.exceptions[0]
    return e


def _is_connection_lost(e: BaseException) -> bool:
    import anyio
    from mcp.shared.exceptions import MCPError
    from mcp_types import CONNECTION_CLOSED

    if isinstance(e, MCPError):
        return e.error.code == CONNECTION_CLOSED
    return isinstance(e, (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError))


def _why(conn: _Connection, e: BaseException, timeout: float) -> str:
    """One line saying what went wrong with a server, with its last stderr line if any."""
    e = _leaf(e)
    spec = conn.spec
    if isinstance(e, FileNotFoundError) and spec.kind == "stdio":
        return f"command not found: {spec.command}"
    if isinstance(e, PermissionError) and spec.kind == "stdio":
        return f"cannot run {spec.command}: permission denied"
    import httpx2
    from mcp.shared.exceptions import MCPError

    if isinstance(e, TimeoutError):
        text = f"no answer within {timeout:g} s"
    elif isinstance(e, httpx2.HTTPStatusError):
        text = f"{spec.url} answered HTTP {e.response.status_code}"
    elif isinstance(e, httpx2.TransportError):
        text = f"cannot reach {spec.url} ({type(e).__name__}: {e})"
    elif _is_connection_lost(e):
        text = "it exited" if spec.kind == "stdio" else f"connection to {spec.url} lost"
    elif isinstance(e, MCPError):
        text = f"error from {spec.url if spec.kind != 'stdio' else 'the server'}: {e.error.message}"
    else:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    tail = conn.stderr_tail() if spec.kind == "stdio" else ""
    if spec.kind == "http" and spec.url.rstrip("/").endswith("/sse"):
        text += ' (an SSE server? set "type": "sse" in the config)'
    return f"{text} (stderr: {tail})" if tail else text


def result_text(result: Any) -> CallResult:
    """An MCP CallToolResult as text: text parts joined, other parts named (the model reads text
    only), structured content as JSON when the server sent nothing else."""
    parts = []
    for block in result.content:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {block.mime_type}: not shown, this model reads text only]")
        elif kind == "resource":
            res = block.resource
            text = getattr(res, "text", None)
            parts.append(text if text is not None else f"[binary resource {res.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}: {block.name}]")
        else:
            parts.append(f"[{kind or 'unknown'} content]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return CallResult("\n".join(parts), bool(result.is_error))


def _log_name(server: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", server)[:64] + ".log"


class McpServers:
    """The servers of an MCP config, run from a background thread, used synchronously.

    `start()` begins starting them (in parallel, while the caller loads the model), `wait_ready()`
    returns their tools and one line per server that failed, `call()` runs a tool, `close()` stops
    everything. A server found dead at a call is restarted once for that call.
    """

    def __init__(
        self, specs: Sequence[ServerSpec], *, timeout: float, start_timeout: float, log_dir: Path
    ):
        self.log_dir = Path(log_dir)
        self.conns = {
            s.name: _Connection(s, timeout, start_timeout, self.log_dir / _log_name(s.name))
            for s in specs
        }
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mcp", daemon=True)
        self._starting: Any = None
        self._log_handler: logging.Handler | None = None
        self._closed = False
        self._ending: set[asyncio.Task] = set()  # servers shutting down

    # ---- the chat thread's side

    def start(self) -> None:
        """Begin starting every server; returns at once."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for conn in self.conns.values():
            conn.log_path.write_text("", encoding="utf-8")  # this session's stderr only
        handler = logging.FileHandler(self.log_dir / "mcp-client.log", mode="w", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        sdk_log = logging.getLogger("mcp")
        sdk_log.addHandler(handler)
        sdk_log.propagate = False  # the SDK logs server faults; the user gets our one line
        self._log_handler = handler
        self._thread.start()
        self._starting = self._submit(self._start_all())

    def wait_ready(self) -> tuple[list[ServerTool], list[str]]:
        """Block until every server is up or has failed: (their tools, one line per failure)."""
        if not self.conns:
            return [], []
        limit = max(c.start_timeout for c in self.conns.values()) + 2 * STOP_GRACE_S
        outcomes = self._wait(self._starting, limit)
        tools, failures = [], []
        for conn, outcome in zip(self.conns.values(), outcomes, strict=True):
            if isinstance(outcome, ToolCallError):
                log = f"; log: {conn.log_path}" if conn.spec.kind == "stdio" else ""
                failures.append(f"server {conn.spec.name!r} did not start: {outcome}{log}")
            else:
                tools += outcome
        return tools, failures

    def call(self, server: str, tool: str, arguments: dict[str, Any]) -> CallResult:
        """Run one tool on its server; raises ToolCallError when there is no result."""
        conn = self.conns[server]
        limit = conn.start_timeout + conn.timeout + 2 * STOP_GRACE_S  # a restart, then the call
        return self._wait(self._submit(self._call(conn, tool, arguments)), limit)

    def close(self) -> None:
        """Stop every server and the thread. Safe to call twice; Ctrl-C does not cut it short."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            done = self._submit(self._stop_all())
            for _ in range(3):  # a second Ctrl-C must not orphan servers mid-shutdown
                try:
                    done.result(timeout=2 * STOP_GRACE_S)
                    break
                except KeyboardInterrupt:
                    continue
                except Exception:
                    break
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=STOP_GRACE_S)
        if not self._loop.is_running():
            self._loop.close()
        if self._log_handler is not None:
            logging.getLogger("mcp").removeHandler(self._log_handler)
            self._log_handler.close()

    def __enter__(self) -> McpServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    @staticmethod
    def _wait(future: Any, limit: float) -> Any:
        try:
            return future.result(timeout=limit)
        except KeyboardInterrupt:
            future.cancel()  # cancels the task in the loop: the SDK tells the server
            raise
        except concurrent.futures.TimeoutError:  # the loop is stuck past its own bounded waits
            future.cancel()
            raise ToolCallError(f"no answer within {limit:g} s") from None

    # ---- the loop thread's side

    async def _start_all(self) -> list[Any]:
        outcomes = await asyncio.gather(
            *(self._connect(c) for c in self.conns.values()), return_exceptions=True
        )
        for o in outcomes:
            if isinstance(o, BaseException) and not isinstance(o, ToolCallError):
                raise o
        return outcomes

    async def _connect(self, conn: _Connection) -> list[ServerTool]:
        conn.stop = asyncio.Event()
        ready: asyncio.Future = self._loop.create_future()
        conn.task = asyncio.create_task(self._hold(conn, ready), name=f"mcp {conn.spec.name}")
        try:
            tools = await asyncio.wait_for(asyncio.shield(ready), conn.start_timeout)
        except asyncio.CancelledError:
            self._detach(conn)
            raise
        except Exception as e:
            self._detach(conn)  # its shutdown goes on in the background; close() waits for it
            e = TimeoutError() if _timed_out(e) else e
            raise ToolCallError(_why(conn, e, conn.start_timeout)) from None
        return [
            ServerTool(conn.spec.name, t.name, t.description or t.title or "", t.input_schema)
            for t in tools
        ]

    async def _hold(self, conn: _Connection, ready: asyncio.Future) -> None:
        from mcp import Client
        from mcp_types import Implementation

        info = Implementation(name="gptoss-mlx", version=__version__)
        try:
            with open(conn.log_path, "a", encoding="utf-8") as log:
                async with Client(conn.transport(log), client_info=info) as client:
                    tools, cursor = [], None
                    for _ in range(MAX_TOOL_PAGES):
                        page = await client.list_tools(cursor=cursor)
                        tools += page.tools
                        cursor = page.next_cursor
                        if not cursor:
                            break
                    conn.client = client
                    ready.set_result(tools)
                    await conn.stop.wait()
        except asyncio.CancelledError:
            if not ready.done():
                ready.cancel()
            raise
        except BaseException as e:  # reported through `ready`, or at the next call
            if not ready.done():
                ready.set_exception(e)

    def _detach(self, conn: _Connection) -> None:
        """Forget the server's connection now and let its task shut the server down (a restart
        may begin at once; `close()` waits for every shutdown)."""
        task, stop, up = conn.task, conn.stop, conn.client is not None
        conn.task, conn.client = None, None
        if task is None:
            return
        if not up:
            task.cancel()  # still starting: nothing to leave cleanly
        stop.set()
        ending = asyncio.create_task(self._await_end(task))
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    @staticmethod
    async def _await_end(task: asyncio.Task) -> None:
        _, pending = await asyncio.wait([task], timeout=STOP_GRACE_S)
        if pending:
            task.cancel()
            await asyncio.wait([task], timeout=STOP_GRACE_S)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: it was reported already

    async def _stop_all(self) -> None:
        for conn in self.conns.values():
            self._detach(conn)
        if self._ending:
            await asyncio.wait(list(self._ending), timeout=3 * STOP_GRACE_S)

    async def _call(self, conn: _Connection, tool: str, arguments: dict[str, Any]) -> CallResult:
        import anyio

        if conn.client is None:  # it exited earlier, or never started: one more try
            try:
                await self._connect(conn)
            except ToolCallError as e:
                raise ToolCallError(f"server {conn.spec.name!r} is not running: {e}") from None
        try:
            with anyio.fail_after(conn.timeout):
                result = await conn.client.call_tool(tool, arguments)
        except TimeoutError:
            raise ToolCallError(
                f"server {conn.spec.name!r} gave no answer within {conn.timeout:g} s"
            ) from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            lost = _is_connection_lost(_leaf(e))
            why = _why(conn, e, conn.timeout)
            if lost:
                self._detach(conn)
                raise ToolCallError(f"server {conn.spec.name!r} stopped: {why}") from None
            raise ToolCallError(f"server {conn.spec.name!r} failed: {why}") from None
        return result_text(result)


def _timed_out(e: BaseException) -> bool:
    return isinstance(e, (TimeoutError, asyncio.TimeoutError))
