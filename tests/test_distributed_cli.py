"""`generate`, `chat` and `batch` with --shard under `mlx.launch -n 2` (ring backend, loopback):
the output rank 0 prints equals the unsharded command's, once; a rank that dies or stalls ends
every rank with one clear line; a split that does not fit is one line. Plus the single-process
cases: --shard without a launcher, a launcher without --shard.

Every launch is bounded in time and its whole process group is killed afterwards (launch.py).
"""

from __future__ import annotations

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

from conftest import make_tiny_config
from gptoss_mlx.cli import main
from gptoss_mlx.convert.convert import convert
from gptoss_mlx.convert.synthetic import write_hf_checkpoint
from launch import cli, finish, finish_killed, launch, rank_env, rank_pids, start


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A random 2-layer model with the real vocabulary size (harmony ids are ~200k), 4 experts
    and 64-wide heads (so that every mode splits it), converted with the default recipe."""
    root = tmp_path_factory.mktemp("shardcli")
    cfg = make_tiny_config(
        num_hidden_layers=2, head_dim=64, num_attention_heads=4, vocab_size=201088
    )
    out = root / "mlx"
    convert(write_hf_checkpoint(root / "hf", cfg, seed=0), out, progress=False)
    return str(out)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPTOSS_MLX_MODEL", raising=False)


def unsharded(*args: str, input: str | None = None):
    res = CliRunner().invoke(main, list(args), input=input)
    assert res.exit_code == 0, res.output
    return res


def no_trouble(stderr: str) -> None:
    assert "Traceback" not in stderr and "error" not in stderr and "WARN" not in stderr, stderr


def test_generate_expert_prints_rank_0s_answer_once(model):
    args = ("generate", "-m", model, "-p", "Hello", "-t", "0", "-n", "6", "--json")
    ref = unsharded(*args).stdout
    done = launch(2, cli(*args, "--shard", "expert"), timeout=240)
    no_trouble(done.stderr)
    assert done.stdout == ref  # one JSON line: rank 1 printed nothing
    assert json.loads(done.stdout)["usage"]["completion_tokens"] == 6


def test_chat_pipeline_reads_on_rank_0_and_reuses_the_cache(model):
    """Turns, a /effort change and a /reset, typed on rank 0 only (mlx.launch feeds every rank the
    same stdin; the other rank must not read it): the transcript equals the unsharded chat's."""
    args = ("chat", "-m", model, "-t", "0", "-n", "5", "-v")
    # /quit: mlx.launch never closes the ranks' stdin, so a chat under it never sees the end.
    lines = "Hello\nAnd then?\n/effort low\nOnce more\n/reset\nHello\n/quit\n"
    ref = unsharded(*args, input=lines)
    done = launch(2, cli(*args, "--shard", "pipeline"), timeout=300, stdin=lines)
    assert "Traceback" not in done.stderr and "error" not in done.stderr, done.stderr
    assert done.stdout == ref.stdout
    # -v: turn 2 reused turn 1's cache on both (same counts as unsharded, printed once).
    reuse = [ln for ln in done.stderr.splitlines() if ln.endswith(" reused")]
    assert reuse == [ln for ln in ref.stderr.splitlines() if ln.endswith(" reused")]
    assert len(reuse) == 4 and " 0 reused" not in reuse[1]


def test_batch_tensor_writes_each_record_once(model, tmp_path):
    prompts = tmp_path / "in.jsonl"
    rows = [{"id": i, "prompt": p, "max_tokens": 4} for i, p in enumerate(["Hi", "Why?", "Go"])]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("batch", str(prompts), "-m", model, "-t", "0", "-b", "2", "-q", "--date", "2026-01-02")
    ref = sorted(unsharded(*args).stdout.splitlines())
    done = launch(2, cli(*args, "--shard", "tensor"), timeout=240)
    no_trouble(done.stderr)
    assert sorted(done.stdout.splitlines()) == ref and len(ref) == 3


def test_a_split_that_does_not_fit_is_one_line(tmp_path):
    """Tensor parallelism needs every split tensor to halve: with 16-wide heads the 8-bit
    o_proj has one scale group per row. Every rank refuses; rank 0 alone says so."""
    cfg = make_tiny_config(num_hidden_layers=2, vocab_size=201088)
    out = tmp_path / "mlx"
    convert(write_hf_checkpoint(tmp_path / "hf", cfg, seed=0), out, progress=False)
    done = launch(2, cli("generate", "-m", str(out), "-p", "Hi", "--shard", "tensor"), timeout=240)
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "--shard tensor over 2 ranks" in errors[0], done.stderr
    assert "o_proj" in errors[0] and "Traceback" not in done.stderr
    assert done.stdout == ""


def _read_some(proc: subprocess.Popen, timeout: float) -> bytes:
    """The first bytes the ranks print (waits for them, at most `timeout` seconds)."""
    fd = proc.stdout.fileno()
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "no output from the ranks in time"
    return os.read(fd, 64)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_dies_ends_every_rank(model, rank):
    """kill -9 of one rank mid-generation: the others end within seconds, each with at most
    one line saying why (mlx.launch stops them with SIGTERM, or their collective finds the
    connection gone), never a hang."""
    args = ("generate", "-m", model, "-p", "Hi", "--raw", "-t", "0", "-n", "100000")
    proc = start(2, cli(*args, "--shard", "expert"))
    try:
        pids = rank_pids(proc, 2)
        _read_some(proc, 180)  # generating
        os.kill(pids[rank], signal.SIGKILL)
        t0 = time.monotonic()
        done = finish(proc, timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not any(_alive(p) for p in pids)
    ours = [ln for ln in done.stderr.splitlines() if ln.startswith("error")]
    assert "Traceback" not in done.stderr
    assert len(ours) <= 1, done.stderr
    if rank == 1:  # the survivor, rank 0, says why it stops
        assert len(ours) == 1, done.stderr
        assert "SIGTERM" in ours[0] or "lost contact" in ours[0], ours


def test_a_stalled_rank_times_out_on_every_rank(model):
    """SIGSTOP of rank 1 mid-generation: rank 0's collective would wait forever; its watchdog
    ends it after --shard-timeout with one line, and mlx.launch then stops rank 1."""
    args = ("generate", "-m", model, "-p", "Hi", "--raw", "-t", "0", "-n", "100000")
    proc = start(2, cli(*args, "--shard", "tensor", "--shard-timeout", "3"))
    try:
        pids = rank_pids(proc, 2)
        _read_some(proc, 180)
        os.kill(pids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        while _alive(pids[0]) and time.monotonic() - t0 < 60:
            time.sleep(0.2)
        waited = time.monotonic() - t0
        os.kill(pids[1], signal.SIGCONT)  # so that mlx.launch's SIGTERM can end it
        done = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 3 <= waited < 30, waited
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error")]
    assert lines[0].startswith("error: rank 0: no progress from the other ranks for 3 s"), lines
    # Rank 1, resumed, finds its own deadline long past: at most one line from it too.
    assert len(lines) <= 2 and all(ln.startswith("error: rank 1: ") for ln in lines[1:]), lines
    assert not any(_alive(p) for p in pids)


def test_shard_in_a_single_process_runs_unsharded(model):
    args = ("generate", "-m", model, "-p", "Hello", "-t", "0", "-n", "3", "--json")
    plain = unsharded(*args)
    res = CliRunner().invoke(main, [*args, "--shard", "expert"])
    assert res.exit_code == 0, res.output
    assert res.stdout == plain.stdout
    assert "single process: running unsharded" in res.stderr


def test_ranks_without_shard_are_refused(model):
    """Started by a launcher (MLX_RANK set) without --shard: N processes would each run the
    whole model and print; one line says what to pass instead."""
    env = rank_env(MLX_RANK="0")
    cmd = cli("generate", "-m", model, "-p", "Hello")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and "--shard" in p.stderr
    assert len(p.stderr.splitlines()) == 1
    # The other ranks exit the same way, silently: the launcher shows one line, not N.
    other = subprocess.run(cmd, capture_output=True, text=True, env=rank_env(MLX_RANK="1"))
    assert other.returncode == 2 and other.stderr == ""


def test_shard_help_teaches():
    res = CliRunner().invoke(main, ["generate", "--help"])
    assert "--shard [expert|tensor|pipeline]" in res.stdout and "mlx.launch" in res.stdout
    assert "--shard-timeout" in res.stdout
    assert sys.executable  # the ranks run this interpreter (launch.cli)


def test_stdin_input_under_mlx_launch_is_refused(monkeypatch):
    """mlx.launch forwards its stdin but never closes the ranks' stdin: a prompt or a batch read
    to its end would wait forever, so it is refused with what to pass instead."""
    from gptoss_mlx.cli.sharded import refuse_piped_stdin
    from gptoss_mlx.errors import UsageError

    a_cluster = object()  # any cluster: only whether there is one matters here
    refuse_piped_stdin(None, "the prompt", "pass it with -p")  # not sharded: fine
    monkeypatch.delenv("MLX_RANK", raising=False)
    refuse_piped_stdin(a_cluster, "the prompt", "pass it with -p")  # mpirun closes stdin
    monkeypatch.setenv("MLX_RANK", "0")
    with pytest.raises(UsageError, match="cannot come from stdin .*: pass it with -p$"):
        refuse_piped_stdin(a_cluster, "the prompt", "pass it with -p")


# --------------------------------------------------------------------------- serve


def _chat(url: str, text: str, **kw) -> str:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], temperature=0, **kw
    )
    return r.choices[0].message.content or ""


def _stream_and_leave(url: str, text: str) -> None:
    """A streamed request the client drops after its first chunk: the server cancels it."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], max_tokens=500, stream=True
    )
    next(iter(stream))
    stream.close()


def _serving(proc, url: str, timeout: float = 240) -> None:
    from server_support import request, wait_until

    def up() -> bool:
        assert proc.poll() is None, "the server exited"
        try:
            return request(url, "GET", "/health", timeout=2)[0] == 200
        except OSError:
            return False

    assert wait_until(up, timeout=timeout), "the server did not come up"


def test_serve_expert_answers_as_unsharded(model, tmp_path):
    """The OpenAI client against `serve --shard expert` on 2 ranks: the same greedy answers as
    an unsharded server, a chat's next turn (prompt-cache reuse), two requests at once, and a
    streamed request the client drops (the cancellation is agreed by every rank)."""
    pytest.importorskip("openai")
    from server_support import free_port
    from vocabs import REAL_VOCAB

    if REAL_VOCAB is None:
        pytest.skip("needs the o200k_harmony vocabulary (set TIKTOKEN_ENCODINGS_BASE)")
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    shutil.copy(REAL_VOCAB, folder / "o200k_base.tiktoken")
    turns = ["Hello", "Why is the sky blue?"]

    def exercise(url: str) -> list[str]:
        out = [_chat(url, t, max_tokens=6) for t in turns]
        out.append(_chat(url, turns[0] + " again", max_tokens=6))  # shares the prompt's start
        with ThreadPoolExecutor(2) as pool:
            out += list(pool.map(lambda t: _chat(url, t, max_tokens=5), ["One", "Two"]))
        _stream_and_leave(url, "Tell me a long story")
        out.append(_chat(url, "After that", max_tokens=4))
        return out

    args = ("serve", "-m", str(folder), "--max-context", "1024", "--max-concurrency", "2")
    port = free_port()
    plain = subprocess.Popen(
        cli(*args, "--port", str(port)),
        env=rank_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _serving(plain, f"http://127.0.0.1:{port}")
        ref = exercise(f"http://127.0.0.1:{port}")
    finally:
        plain.kill()
        plain.wait()
    port = free_port()
    proc = start(2, cli(*args, "--port", str(port), "--shard", "expert"))
    try:
        _serving(proc, f"http://127.0.0.1:{port}")
        got = exercise(f"http://127.0.0.1:{port}")
    finally:
        done = finish_killed(proc)
    assert any(ref) and got == ref
    assert "Traceback" not in done.stderr and "error" not in done.stderr, done.stderr[-2000:]
