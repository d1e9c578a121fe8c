"""McpServers, the synchronous facade over the MCP SDK, against real servers: stdio processes of
tests/mcp_test_server.py (written with the SDK's MCPServer) and the same server over Streamable
HTTP and SSE on 127.0.0.1. Failures must come back as one line or a ToolCallError, never hang
past their timeout, and no server process may outlive `close()`."""

from __future__ import annotations

import threading
import time

import pytest

from gptoss_mlx.cli.mcp_client import CallResult, McpServers, ToolCallError
from gptoss_mlx.cli.mcp_config import parse_mcp_config
from mcp_helpers import free_port, pids, serve_http, stdio_entry, wait_gone

ALL_TOOLS = ["echo", "add", "fail", "slow", "crash", "big", "who", "header"]


@pytest.fixture(scope="module")
def pidfile(tmp_path_factory):
    return tmp_path_factory.mktemp("pids") / "pids"


@pytest.fixture(scope="module")
def servers(tmp_path_factory, pidfile):
    """alpha (every tool), beta (echo, who), and two that cannot start."""
    config = parse_mcp_config(
        {
            "mcpServers": {
                "alpha": stdio_entry("alpha", pidfile=pidfile, env={"MCP_TEST_VALUE": "v1"}),
                "beta": stdio_entry("beta", "--tools", "echo,who", pidfile=pidfile),
                "dead": stdio_entry("dead", "--start", "exit", pidfile=pidfile),
                "nocmd": {"command": "gptoss-no-such-command"},
            }
        }
    )
    logs = tmp_path_factory.mktemp("logs")
    s = McpServers(config.servers, timeout=4, start_timeout=60, log_dir=logs)
    s.start()
    yield s
    s.close()
    assert wait_gone(pids(pidfile)) == [], "a server outlived close()"


def test_tools_are_listed_and_start_failures_are_one_line_each(servers):
    tools, failures = servers.wait_ready()
    assert [(t.server, t.name) for t in tools] == [("alpha", n) for n in ALL_TOOLS] + [
        ("beta", "echo"),
        ("beta", "who"),
    ]
    add = tools[1]
    assert add.description == "Add two integers."
    assert add.input_schema["properties"]["a"]["type"] == "integer"
    log = servers.log_dir
    assert failures == [
        "server 'dead' did not start: it exited (stderr: dead: cannot start, missing API key); "
        f"log: {log / 'dead.log'}",
        "server 'nocmd' did not start: command not found: gptoss-no-such-command; "
        f"log: {log / 'nocmd.log'}",
    ]


def test_a_server_that_never_answers_fails_at_the_start_timeout(tmp_path):
    pidfile = tmp_path / "pids"
    config = parse_mcp_config(
        {"mcpServers": {"hang": stdio_entry("hang", "--start", "hang", pidfile=pidfile)}}
    )
    started = time.monotonic()
    with McpServers(config.servers, timeout=60, start_timeout=2, log_dir=tmp_path) as s:
        s.start()
        tools, failures = s.wait_ready()
    assert time.monotonic() - started < 30  # 2 s, then its shutdown (close stdin, SIGTERM)
    assert tools == []
    assert failures == [
        f"server 'hang' did not start: no answer within 2 s; log: {tmp_path / 'hang.log'}"
    ]
    assert len(pids(pidfile)) == 1 and wait_gone(pids(pidfile)) == []


def test_calls_reach_their_server_with_the_config_env(servers):
    servers.wait_ready()
    assert servers.call("alpha", "add", {"a": 2, "b": 3}) == CallResult("5", False)
    assert servers.call("alpha", "who", {}) == CallResult("alpha:v1", False)
    assert servers.call("beta", "who", {}) == CallResult("beta:", False)


def test_a_tool_that_raises_is_an_error_result(servers):
    servers.wait_ready()
    result = servers.call("alpha", "fail", {"why": "testing"})
    assert result.is_error
    assert "failed on purpose: testing" in result.text
    bad_args = servers.call("alpha", "add", {"a": "many"})
    assert bad_args.is_error and "validation error" in bad_args.text


def test_a_slow_call_times_out_and_the_server_goes_on(servers):
    servers.wait_ready()
    started = time.monotonic()
    with pytest.raises(ToolCallError, match="^server 'alpha' gave no answer within 4 s$"):
        servers.call("alpha", "slow", {"seconds": 60})
    assert time.monotonic() - started < 30  # not the 60 s the tool wanted
    assert servers.call("alpha", "echo", {"text": "still here"}) == CallResult("still here", False)


def test_a_server_that_never_started_is_an_error_at_each_call(servers):
    servers.wait_ready()
    with pytest.raises(ToolCallError) as e:
        servers.call("dead", "echo", {"text": "x"})
    assert str(e.value) == (
        "server 'dead' is not running: it exited (stderr: dead: cannot start, missing API key)"
    )


def test_a_crashed_server_is_an_error_then_restarts(servers):
    servers.wait_ready()
    before = servers.call("alpha", "echo", {"text": "a"})
    assert before == CallResult("a", False)
    with pytest.raises(ToolCallError, match=r"^server 'alpha' stopped: it exited \(stderr: crash"):
        servers.call("alpha", "crash", {})
    # The next call starts it again.
    assert servers.call("alpha", "who", {}) == CallResult("alpha:v1", False)


def test_close_during_start_and_during_a_call_leaves_no_process(tmp_path):
    pidfile = tmp_path / "pids"
    config = parse_mcp_config(
        {
            "mcpServers": {
                "alpha": stdio_entry("alpha", "--tools", "slow", pidfile=pidfile),
                "hang": stdio_entry("hang", "--start", "hang", pidfile=pidfile),
            }
        }
    )
    s = McpServers(config.servers, timeout=30, start_timeout=60, log_dir=tmp_path / "logs")
    s.start()
    deadline = time.monotonic() + 20
    while len(pids(pidfile)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # both processes running; hang will never answer, so is still starting
    caller = threading.Thread(target=lambda: _call_quietly(s, "alpha", "slow", {"seconds": 60}))
    while s.conns["alpha"].client is None and time.monotonic() < deadline:
        time.sleep(0.05)
    caller.start()
    time.sleep(0.5)  # the slow call is on its server
    started = time.monotonic()
    s.close()
    assert time.monotonic() - started < 30  # not the 60 s the call wanted
    caller.join(timeout=15)
    assert len(pids(pidfile)) == 2
    assert wait_gone(pids(pidfile)) == []


def _call_quietly(s, server, tool, args):
    try:
        s.call(server, tool, args)
    except BaseException:
        pass


# --------------------------------------------------------------------------- HTTP transports


@pytest.fixture(scope="module")
def http_servers():
    procs = [serve_http("streamable-http", "web"), serve_http("sse", "web")]
    yield [port for _, port in procs]
    for proc, _ in procs:
        proc.terminate()
        proc.wait(timeout=10)


def test_streamable_http_and_sse_servers_with_headers(http_servers, tmp_path):
    http_port, sse_port = http_servers
    config = parse_mcp_config(
        {
            "mcpServers": {
                "web": {"url": f"http://127.0.0.1:{http_port}/mcp", "headers": {"X-Key": "k1"}},
                "old": {
                    "url": f"http://127.0.0.1:{sse_port}/sse",
                    "type": "sse",
                    "headers": {"X-Key": "k2"},
                },
                "closed": {"url": f"http://127.0.0.1:{free_port()}/mcp"},
                "wrong": {"url": f"http://127.0.0.1:{http_port}/nope"},
            }
        }
    )
    with McpServers(config.servers, timeout=10, start_timeout=60, log_dir=tmp_path) as s:
        s.start()
        tools, failures = s.wait_ready()
        assert {t.server for t in tools} == {"web", "old"}
        closed = config.servers[2].url
        assert failures == [
            f"server 'closed' did not start: cannot reach {closed} "
            "(ConnectError: All connection attempts failed)",
            f"server 'wrong' did not start: error from {config.servers[3].url}: Not Found",
        ]
        assert s.call("web", "echo", {"text": "over http"}) == CallResult("over http", False)
        assert s.call("old", "echo", {"text": "over sse"}) == CallResult("over sse", False)
        assert s.call("web", "header", {"name": "X-Key"}) == CallResult("k1", False)
        assert s.call("old", "header", {"name": "X-Key"}) == CallResult("k2", False)
