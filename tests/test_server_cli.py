"""`gptoss-mlx serve` as a user runs it: a subprocess on a converted folder, the key from
GPTOSS_MLX_API_KEY, one log line per request, a clean Ctrl-C; the warning for a public address
without a key."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import convert_chat_model
from server_support import free_port, request, wait_until
from vocabs import REAL_VOCAB

openai = pytest.importorskip("openai")
KEY = "cli-key-123"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if REAL_VOCAB is None:
        pytest.skip("needs the o200k_harmony vocabulary (set TIKTOKEN_ENCODINGS_BASE)")
    out = convert_chat_model(tmp_path_factory.mktemp("serve"))
    shutil.copy(REAL_VOCAB, out / "o200k_base.tiktoken")
    return out


def serve(*args: str, env_extra=None, tmp_path=None) -> subprocess.Popen:
    env = {
        **os.environ,
        "GPTOSS_MLX_HOME": str(tmp_path or "/nonexistent-home"),
        **(env_extra or {}),
    }
    env.pop("GPTOSS_MLX_MODEL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "gptoss_mlx.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    raise AssertionError(f"no {needle!r} from serve; it said:\n" + "".join(lines))


def _reachable(url: str) -> bool:
    try:
        return request(url, "GET", "/health", timeout=2)[0] == 200
    except OSError:
        return False


def test_serve_end_to_end(folder, tmp_path):
    port = free_port()
    proc = serve(
        "-m", str(folder), "--port", str(port), "--max-context", "512",
        env_extra={"GPTOSS_MLX_API_KEY": KEY}, tmp_path=tmp_path,
    )  # fmt: skip
    try:
        banner = wait_for_line(proc, "serving")
        assert f"http://127.0.0.1:{port}/v1" in banner[-1] and "warning" not in "".join(banner)
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _reachable(url), timeout=30)
        assert request(url, "GET", "/v1/models")[0] == 401  # the key came from the environment
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        (served,) = [m.id for m in client.models.list().data]
        assert served == folder.name  # not a gpt-oss-20b shape: the folder's name
        r = client.chat.completions.create(
            model=served, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
        out = client.responses.create(model=served, input="Hi", max_output_tokens=3)
        assert out.status == "incomplete"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    log = [line for line in err.splitlines() if "prompt=" in line]
    assert len(log) == 2
    assert "chat.completions ok" in log[0] and "finish=length" in log[0]
    assert "responses ok" in log[1]


def test_a_public_address_without_a_key_is_warned_about(tmp_path):
    proc = serve("--host", "0.0.0.0", "-m", str(tmp_path / "missing"), tmp_path=tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.startswith("warning: listening on 0.0.0.0 without --api-key")
    assert "error: --model" in err and "Traceback" not in err
