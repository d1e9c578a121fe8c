"""A `gptoss-mlx serve` subprocess for the server scripts (soak_server.py, bench_server.py): start it
on a free port, wait until it answers, read its memory, stop it with Ctrl-C."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str, timeout: float = 10) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


class ServeProcess:
    """`gptoss-mlx serve -m MODEL --port P ARGS...`, its log in `log_path`."""

    def __init__(self, model: str, *args: str, log_path: str | Path | None = None):
        self.port = free_port()
        exe = Path(sys.executable).parent / "gptoss-mlx"
        cmd = [str(exe), "serve", "-m", model, "--port", str(self.port), *args]
        self.log_path = Path(log_path or f"/tmp/gptoss-serve-{self.port}.log")
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: see {self.log_path}")
            try:
                status, body = get_json(self.port, "/health", timeout=2)
                if status == 200:
                    return body
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"serve did not answer within {timeout} s")

    def model_id(self, api_key: str | None = None) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        conn.request("GET", "/v1/models", headers=headers)
        body = json.loads(conn.getresponse().read())
        conn.close()
        return body["data"][0]["id"]

    def health(self) -> dict:
        return get_json(self.port, "/health")[1]

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc; `ps` elsewhere)."""
        status = Path(f"/proc/{self.proc.pid}/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        out = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(self.proc.pid)], capture_output=True, text=True
        )
        return int(out.stdout.strip() or 0) * 1024

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def log_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if "prompt=" in line]


if os.name != "posix":  # pragma: no cover
    raise SystemExit("these scripts need a POSIX system (signals, /proc or ps)")
