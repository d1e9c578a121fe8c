"""Run a command under `mlx.launch` from a test: the virtualenv's own launcher, the ring backend
over loopback on free ports, a time limit, and no process left behind.

mlx.launch starts its ranks in its own process group here (the test starts it in a new session),
so killing that group ends every rank whatever state they are in. Note that mlx.launch exits 0
even when a rank failed (MLX 0.32): tests look at what the ranks printed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# The launcher installed with MLX next to this interpreter (.venv/bin/mlx.launch), never one
# found on PATH: the ranks must run this virtualenv's MLX.
MLX_LAUNCH = Path(sys.executable).with_name("mlx.launch")
ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> int:
    """A base port such that base .. base+n-1 are free on 127.0.0.1 now (the ring backend
    listens on one port per rank, counting up from --starting-port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        taken = []
        try:
            for port in range(base, base + n):
                probe = socket.socket()
                taken.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in taken:
                probe.close()
    raise RuntimeError("no run of free ports found")


@dataclass
class Launched:
    returncode: int
    stdout: str
    stderr: str


def rank_env(**extra: str) -> dict[str, str]:
    """The ranks' environment: one CPU stream each (ranks share 2 cores), this checkout first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    env["GPTOSS_MLX_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env.update(extra)
    return env


def start(n: int, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `argv` on `n` ranks; stdin, stdout and stderr are pipes."""
    assert MLX_LAUNCH.is_file(), f"{MLX_LAUNCH} is missing: mlx is not installed in this venv"
    cmd = [str(MLX_LAUNCH), "-n", str(n), "--backend", "ring", "--starting-port"]
    cmd += [str(free_ports(n)), "--", *argv]
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or rank_env(),
        cwd=ROOT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float, stdin: str | None = None) -> Launched:
    """Wait for `proc` (at most `timeout` seconds), then make sure nothing of it is left.

    The launcher's stdin stays open until the end: at end of file mlx.launch (0.32) spins on it,
    taking most of a core from the ranks it runs."""
    chunks: dict[int, list[bytes]] = {1: [], 2: []}

    def drain(stream, key: int) -> None:
        fd = stream.fileno()
        while True:
            data = os.read(fd, 65536)
            if not data:
                return
            chunks[key].append(data)

    readers = [
        threading.Thread(target=drain, args=(proc.stdout, 1), daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, 2), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        if stdin:
            proc.stdin.write(stdin)
            proc.stdin.flush()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            proc.wait()
            for t in readers:
                t.join(5)
            out, err = (b"".join(chunks[k]).decode(errors="replace") for k in (1, 2))
            raise AssertionError(
                f"mlx.launch ran past {timeout} s\n--- stdout\n{out[-3000:]}\n"
                f"--- stderr\n{err[-3000:]}"
            ) from None
    finally:
        stop(proc)
        for t in readers:
            t.join(10)
        try:
            proc.stdin.close()
        except OSError:
            pass
    out, err = (b"".join(chunks[k]).decode(errors="replace") for k in (1, 2))
    return Launched(proc.returncode, out, err)


def finish_killed(proc: subprocess.Popen) -> Launched:
    """End a run that does not end by itself (a server): kill every rank, return the output."""
    stop(proc)
    return finish(proc, timeout=30)


def stop(proc: subprocess.Popen) -> None:
    """Kill the launcher's whole process group (every rank)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def launch(
    n: int, argv: list[str], *, timeout: float, stdin: str | None = None, env=None
) -> Launched:
    return finish(start(n, argv, env), timeout, stdin)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def cli(*args: str) -> list[str]:
    """`gptoss-mlx ARGS` as each rank runs it."""
    return [sys.executable, "-m", "gptoss_mlx.cli", *args]


def rank_pids(proc: subprocess.Popen, n: int, timeout: float = 60.0) -> list[int]:
    """The pids of the launcher's `n` rank processes, once they all run Python (Linux /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == proc.pid and b"python" in cmdline:
                kids.append(int(entry))
        if len(kids) == n:
            return sorted(kids)
        time.sleep(0.2)
    raise AssertionError(f"mlx.launch did not start {n} ranks within {timeout} s")
