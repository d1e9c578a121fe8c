"""Helpers for the MCP tests (imported like `conftest`): config entries that start
tests/mcp_test_server.py, the same server over HTTP on 127.0.0.1, the pids those servers record,
and whether a process is still alive."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

SERVER = str(Path(__file__).with_name("mcp_test_server.py"))


def stdio_entry(name: str, *flags: str, pidfile: Path | None = None, **extra) -> dict:
    """A config entry running the test server NAME with FLAGS (e.g. "--tools", "echo")."""
    env = {"MCP_TEST_PIDFILE": str(pidfile)} if pidfile else {}
    env.update(extra.pop("env", {}))
    return {"command": sys.executable, "args": [SERVER, name, *flags], "env": env, **extra}


def pids(pidfile: Path) -> list[int]:
    return [int(p) for p in pidfile.read_text().split()] if pidfile.exists() else []


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def wait_gone(pid_list: list[int], within: float = 10.0) -> list[int]:
    """The pids still alive after `within` seconds (an exited server's reaping can lag a little)."""
    deadline = time.monotonic() + within
    while True:
        left = [p for p in pid_list if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_http(transport: str, name: str, *flags: str) -> tuple[subprocess.Popen, int]:
    """The test server NAME over `transport` ("streamable-http" or "sse") on a free port, once
    it accepts connections: (the process, its port). Stop it with terminate()."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, SERVER, name, *flags, "--transport", transport, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the {transport} test server did not listen on {port}")
