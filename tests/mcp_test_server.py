"""A small MCP server for the tests, written with the official SDK's MCPServer (FastMCP in mcp 1.x).

    python tests/mcp_test_server.py NAME [--tools echo,add,...] [--start exit|hang]
                                         [--transport stdio|streamable-http|sse --port N]

Tools: echo (text back), add (two integers), fail (raises: the SDK answers isError), slow (sleeps
`seconds`), crash (the process exits mid-call), big (n characters), who (the server's NAME and $MCP_TEST_VALUE, to
see the config's env arrive), header (an HTTP request header, to see the config's headers
arrive). `--start exit` dies before answering, `--start hang` never answers.
With $MCP_TEST_PIDFILE set, the server appends its pid there first, so tests can check that no
server outlives the client.
"""

import argparse
import os
import sys
import time


def build(name: str, tools: set[str]):
    # Imported here so the servers that never start (--start exit|hang) cost no SDK import.
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer(name)

    def register(fn):
        if fn.__name__ in tools:
            server.tool()(fn)
        return fn

    @register
    def echo(text: str) -> str:
        """Echo the text back."""
        return text

    @register
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @register
    def fail(why: str) -> str:
        """Always fails."""
        raise ToolError(f"failed on purpose: {why}")

    @register
    def slow(seconds: float) -> str:
        """Sleep, then answer."""
        time.sleep(seconds)
        return f"slept {seconds} s"

    @register
    def crash() -> str:
        """Exit the process in the middle of the call."""
        print("crashing now", file=sys.stderr, flush=True)
        os._exit(3)

    @register
    def big(n: int) -> str:
        """A text of n characters."""
        return "x" * n

    @register
    def who() -> str:
        """The server's name and the MCP_TEST_VALUE environment variable."""
        return f"{name}:{os.environ.get('MCP_TEST_VALUE', '')}"

    @register
    def header(name: str, ctx: Context) -> str:
        """An HTTP request header the server received (HTTP transports only)."""
        return (ctx.headers or {}).get(name.lower(), "")

    return server


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--tools", default="echo,add,fail,slow,crash,big,who,header")
    p.add_argument("--start", choices=["ok", "exit", "hang"], default="ok")
    p.add_argument("--transport", default="stdio")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    if os.environ.get("MCP_TEST_PIDFILE"):
        with open(os.environ["MCP_TEST_PIDFILE"], "a") as f:
            f.write(f"{os.getpid()}\n")
    if a.start == "exit":
        print(f"{a.name}: cannot start, missing API key", file=sys.stderr, flush=True)
        sys.exit(1)
    if a.start == "hang":
        time.sleep(3600)
    server = build(a.name, set(a.tools.split(",")))
    if a.transport == "stdio":
        server.run()
    else:
        server.run(a.transport, host="127.0.0.1", port=a.port)


if __name__ == "__main__":
    main()
