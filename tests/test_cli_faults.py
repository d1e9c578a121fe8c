"""Faults found by using the CLI as a demanding user would (issue 17, and issue 16's --top-k), each
built on purpose: sampling settings at their edges, prompts that leave no room, chat /save and
/load of odd things, bytes that are not UTF-8, output that cannot be written, Ctrl-C while the
command starts, and batch memory sized for the lines there are.

The commands run on the tiny random model of `convert_chat_model`: in-process with click's runner
where the exit code and the streams are enough, in real processes for what only a process shows
(a locale's strict decoding, /dev/full, a closed stdout, a full disk, a pipe closed by `head`).
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
from dataclasses import replace

import mlx.core as mx
import pytest
from click.testing import CliRunner

from conftest import convert_chat_model
from gptoss_mlx.cli import main
from gptoss_mlx.cli.batch_files import InputLine
from gptoss_mlx.cli.batch_job import BatchDefaults, BatchItem, LineFailure, parse_line
from gptoss_mlx.cli.repl import ChatLoop
from gptoss_mlx.engine import memory
from gptoss_mlx.engine.batching import RowSampling, sample_rows
from gptoss_mlx.engine.generate import MIN_TEMPERATURE, SamplingParams
from gptoss_mlx.engine.memory import MemoryPreflightError, choose_max_context, plan_memory
from gptoss_mlx.errors import UsageError
from gptoss_mlx.weights.loading import default_dtype
from scripted_chat import final_answer, make_tokenizer, session
from vocabs import REAL_VOCAB

VOCAB = 201088  # convert_chat_model's vocabulary: gpt-oss's


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    out = convert_chat_model(tmp_path_factory.mktemp("faults"))
    if REAL_VOCAB is not None:
        shutil.copy(REAL_VOCAB, out / "o200k_base.tiktoken")
    return str(out)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPTOSS_MLX_MODEL", raising=False)
    monkeypatch.delenv("GPTOSS_MLX_THREADS", raising=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def cli(*args: str, input: str | bytes | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def one_error_line(stderr: str) -> str:
    """The stderr of a failure: exactly one `error: ...` line, no traceback. Returns it."""
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def failed(res, code: int) -> str:
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception
    return one_error_line(res.stderr)


def process(args: list, *, stdin: bytes = b"", env: dict | None = None, **popen):
    """`python -m gptoss_mlx.cli ARGS` in a real process: (rc, stdout, stderr)."""
    full = {k: v for k, v in os.environ.items() if k != "GPTOSS_MLX_MODEL"}
    full.update(env or {})
    popen.setdefault("stdout", subprocess.PIPE)
    p = subprocess.Popen(
        [sys.executable, "-m", "gptoss_mlx.cli", *args],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full,
        **popen,
    )
    out, err = p.communicate(stdin, timeout=180)
    return p.returncode, (out or b"").decode(), err.decode()


def jsonl(*objs) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def records(text: str) -> dict:
    return {r["id"]: r for r in map(json.loads, text.splitlines())}


# --------------------------------------------------------------------------- sampling settings


def test_top_k_at_or_above_the_vocabulary_keeps_every_token(folder, tmp_path):
    """Issue 16 item 4: one rule in generate, chat and batch: such a k is "off" (there is nothing
    to cut), so it samples exactly what --top-k 0 samples with the same seed."""
    k = VOCAB
    base = ("-m", folder, "-n", "4", "--seed", "7")
    gen = ("generate", "-p", "Hello", "--json", *base)
    off = json.loads(cli(*gen, "--top-k", "0").stdout)["final"]
    for on in (cli(*gen, "--top-k", str(k)), cli(*gen, "--top-k", str(10**6))):
        assert on.exit_code == 0, on.output
        assert json.loads(on.stdout)["final"] == off
    chat_off = cli("chat", *base, "--top-k", "0", input="Hello\n")
    chat_on = cli("chat", *base, "--top-k", str(k), input="Hello\n")
    assert chat_on.exit_code == 0 and chat_on.stdout == chat_off.stdout, chat_on.output
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(
        jsonl(
            {"id": "off", "prompt": "Hello", "top_k": 0, "seed": 3},
            {"id": "on", "prompt": "Hello", "top_k": k, "seed": 3},
            {"id": "over", "prompt": "Hello", "top_k": k + 1, "seed": 3},
        )
    )
    res = cli("batch", str(inp), "-m", folder, "-n", "4", "-q")
    assert res.exit_code == 0, res.output
    recs = records(res.stdout)
    assert recs["on"]["final"] == recs["off"]["final"] == recs["over"]["final"]


@pytest.mark.parametrize(
    "opt, field",
    [
        (["--seed", "-1"], "seed"),
        (["--seed", str(2**64)], "seed"),
        (["--top-k", str(2**31)], "top_k"),
        (["--temp", "nan"], "temperature"),
        (["--top-p", "inf"], "top_p"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat", "batch"])
def test_out_of_range_sampling_is_one_line_exit_2_before_loading(tmp_path, command, opt, field):
    """Issue 17 item 5: --seed -1 or 2**64 was a TypeError traceback after loading."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl({"prompt": "hi"}))
    args = {"generate": ["-p", "Hi"], "chat": [], "batch": [str(inp)]}[command]
    # No model exists: a command that got as far as loading would fail another way.
    res = cli(command, "-m", str(tmp_path / "no-model"), *args, *opt, input="Hi\n")
    assert failed(res, 2).startswith(f"error: {field}: ")


def test_the_largest_seed_runs(folder):
    res = cli("generate", "-m", folder, "-p", "Hi", "-n", "2", "--seed", str(2**64 - 1))
    assert res.exit_code == 0, res.output


def test_sampling_fields_are_checked_as_request_fields():
    """The one check the CLI, batch lines and the server share: field named, types too."""
    base = SamplingParams(temperature=0.5, seed=4)
    assert SamplingParams.from_fields({}, base) == base
    assert SamplingParams.from_fields({"temperature": None, "top_k": 5}, base).top_k == 5
    for fields, message in [
        ({"temperature": "hot"}, "temperature: expected a number"),
        ({"temperature": True}, "temperature: expected a number"),
        ({"top_p": 10**400}, "top_p: expected a finite number"),
        ({"top_k": 1.5}, "top_k: expected an integer"),
        ({"seed": -1}, "seed: must be in [0, 2**64)"),
        ({"min_p": 1}, "min_p: must be in [0, 1)"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            SamplingParams.from_fields(fields, base)


def test_tiny_temperatures_are_greedy_everywhere(folder, tmp_path):
    """Issue 17 item 8: -t 1e-39 sampled random tokens (1/T overflowed to inf and the logits to
    NaN) while 1e-37 was greedy. Below MIN_TEMPERATURE it is greedy, in every command."""
    t = "1e-39"
    gen = ("generate", "-m", folder, "-p", "Hello", "-n", "6", "--json")
    greedy = json.loads(cli(*gen, "-t", "0").stdout)["final"]
    res = cli(*gen, "-t", t, "--seed", "1")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["final"] == greedy
    chat = cli("chat", "-m", folder, "-n", "6", "-t", t, input="Hello\n")
    assert chat.stdout == cli("chat", "-m", folder, "-n", "6", "-t", "0", input="Hello\n").stdout
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(
        jsonl(
            {"id": "greedy", "prompt": "Hello", "temperature": 0},
            {"id": "tiny", "prompt": "Hello", "temperature": float(t)},
            {"id": "tiny-seeded", "prompt": "Hello", "temperature": 1e-6, "seed": 9},
        )
    )
    res = cli("batch", str(inp), "-m", folder, "-n", "6", "-q")
    recs = records(res.stdout)
    assert recs["tiny"]["final"] == recs["greedy"]["final"] == recs["tiny-seeded"]["final"]
    assert recs["greedy"]["final"] == greedy


def test_the_temperature_floor_in_the_samplers():
    """The floor itself, in both samplers: below it the argmax, even of a near tie."""
    assert SamplingParams(temperature=1e-39).greedy
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy
    # A row whose top two log-probabilities differ by a hair: still the argmax below the floor.
    logprobs = mx.log(mx.softmax(mx.array([[0.0, 1e-3, -1.0, -50.0]]), axis=-1))
    for t in (1e-39, 1e-38, 1e-6):
        p = SamplingParams(temperature=t, seed=0)
        assert p.sampler()(logprobs).item() == 1
        tokens, _ = sample_rows(logprobs, RowSampling.of([p]))
        assert tokens.item() == 1


# --------------------------------------------------------------------------- the context limit


def test_a_prompt_with_no_room_is_bad_input_in_every_mode(folder):
    """Issue 17 item 9: exit 0 with an error, `prompt_tokens: 0` in --json, exit 2 with --raw:
    now one behaviour, exit 2 and nothing on stdout; a prompt that exactly fills the context
    says no room is left to generate."""
    base = ("generate", "-m", folder, "-p", "word " * 20)
    n = json.loads(cli(*base, "-n", "1", "--json").stdout)["usage"]["prompt_tokens"]
    for extra in ((), ("--json",)):
        over = cli(*base, "--max-context", str(n - 1), *extra)
        assert f"the prompt has {n} tokens; the context limit is {n - 1}" in failed(over, 2)
        assert over.stdout == ""
        full = cli(*base, "--max-context", str(n), *extra)
        assert "no room is left to generate" in failed(full, 2) and full.stdout == ""
    from gptoss_mlx.harmony.tokenizer import load_tokenizer

    raw_n = len(load_tokenizer(folder).encode("word " * 20))
    for limit, needle in [(raw_n - 1, "context limit is"), (raw_n, "no room is left")]:
        for extra in ((), ("--json",)):
            res = cli(*base, "--raw", "--max-context", str(limit), *extra)
            assert needle in failed(res, 2) and res.stdout == ""


def test_a_conversation_with_no_room_left_says_so_and_the_chat_goes_on(tok):
    s, _ = session(tok, [final_answer(tok, "a", "Ok.")], max_context=40)
    out, err = run_loop(s, ["Hello", "/stats"])
    assert "error: the prompt has" in err and "context limit is 40" in err
    assert "no turn yet" in err


# --------------------------------------------------------------------------- chat /save, /load


def run_loop(sess, lines, stdin=None, **kw) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    stdin = stdin or io.StringIO("".join(line + "\n" for line in lines))
    ChatLoop(sess, stdin=stdin, out=out, err=err, **kw).run()
    return out.getvalue(), err.getvalue()


def test_save_to_a_folder_is_one_line_and_the_chat_goes_on(tok, tmp_path, monkeypatch):
    """Issue 17 item 2: `/save .` crashed the chat (ValueError), losing the conversation."""
    monkeypatch.chdir(tmp_path)
    s, _ = session(tok, [final_answer(tok, "a", "One."), final_answer(tok, "b", "Two.")])
    out, err = run_loop(s, ["First", "/save .", "/save /", f"/save {tmp_path}", "Second"])
    assert out == "One.\nTwo.\n"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and all("is a folder; save to a file name" in e for e in errors)
    assert len(s.messages) == 4
    assert list(tmp_path.iterdir()) == []  # no temporary file left anywhere


def test_bytes_that_are_not_utf8_are_refused_where_they_come_in(tok, tmp_path):
    """Issue 17 item 3: such a line was answered, then /save died on UnicodeEncodeError and left
    an empty `.s.json.tmp`. Now the line is refused as batch refuses it; the rest goes on."""
    s, model = session(tok, [final_answer(tok, "a", "One.")])
    saved = tmp_path / "s.json"
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\nHello\n/save " + bytes(saved) + b"\n"))
    out, err = run_loop(s, [], stdin=stdin)
    assert "error: input line 1: not valid UTF-8 (byte 0xe9 at offset 3); not sent" in err
    assert out == "One.\n" and len(model.prompts) == 1
    assert json.loads(saved.read_text())["messages"][0] == {"role": "user", "content": "Hello"}
    # Text that reached the conversation some other way (a library caller): one line, no file.
    s.messages.append({"role": "user", "content": "bad \udcff"})
    with pytest.raises(UsageError, match="not valid UTF-8"):
        s.save(tmp_path / "t.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_a_strict_utf8_locale_does_not_crash_on_input(folder, tmp_path, command):
    """Issue 17 item 3: under PYTHONIOENCODING=utf-8:strict (macOS's usual setting) chat and
    generate crashed reading the bytes (UnicodeDecodeError)."""
    env = {"PYTHONIOENCODING": "utf-8:strict", "GPTOSS_MLX_HOME": str(tmp_path)}
    if command == "chat":
        saved = tmp_path / "s.json"
        stdin = b"caf\xe9\nHello\n/save " + bytes(saved) + b"\n"
        rc, out, err = process(["chat", "-m", folder, "-n", "2"], stdin=stdin, env=env)
        assert rc == 0, err
        assert "error: input line 1: not valid UTF-8 (byte 0xe9 at offset 3); not sent" in err
        assert "Traceback" not in err and len(json.loads(saved.read_text())["messages"]) == 2
        assert not list(tmp_path.glob(".*.tmp"))
    else:
        rc, out, err = process(["generate", "-m", folder, "-n", "2"], stdin=b"caf\xe9", env=env)
        assert rc == 2 and out == ""
        assert one_error_line(err) == "error: stdin: not valid UTF-8 (byte 0xe9 at offset 3)"
        # The same bytes through argv (decoded with surrogateescape, always).
        rc, out, err = process(["generate", "-m", folder, "-p", b"caf\xe9"], env=env)
        assert rc == 2 and "--prompt: not valid UTF-8 (byte 0xe9" in one_error_line(err)


@pytest.mark.parametrize(
    "content", ['{"a": 1}', '{"messages": "hi"}', '{"format": "gptoss-mlx-chat", "version": 1}']
)
def test_loading_what_is_not_a_saved_chat_keeps_the_conversation(tok, tmp_path, content):
    """Issue 17 item 4: any JSON object without `messages` wiped the conversation."""
    s, model = session(tok, [final_answer(tok, "a", "One."), final_answer(tok, "b", "Two.")])
    other = tmp_path / "other.json"
    other.write_text(content)
    out, err = run_loop(s, ["First", f"/load {other}", "Second"])
    assert f'error: {other}: not a saved chat (no "messages" list)' in err
    assert out == "One.\nTwo.\n" and len(s.messages) == 4
    assert s.messages[0]["content"] == "First"


def test_piped_input_ending_inside_a_block_says_so(folder, tok):
    s, model = session(tok, [final_answer(tok, "a", "One.")])
    with pytest.raises(UsageError, match='ended inside a """ block \\(2 lines after'):
        run_loop(s, ["Hi", '"""', "first line", "second line"])
    assert len(model.prompts) == 1  # "Hi" was answered; the block was not sent
    res = cli("chat", "-m", folder, "-n", "2", input='Hi\n"""\nunfinished\n')
    assert res.exit_code == 2
    assert 'error: the input ended inside a """ block' in res.stderr


# --------------------------------------------------------------------------- output failures


@pytest.mark.parametrize("command", ["generate", "chat", "info", "verify"])
def test_output_to_a_full_device_is_one_line(folder, tmp_path, command):
    """Issue 17 item 6: `> /dev/full` was an ENOSPC traceback."""
    args = {
        "generate": ["generate", "-m", folder, "-n", "3", "-t", "0", "-p", "Hello"],
        "chat": ["chat", "-m", folder, "-n", "3", "-t", "0"],
        "info": ["info", folder],
        "verify": ["verify", str(tmp_path / "m")],
    }[command]
    # verify writes to stdout only for an intact folder: the one without the copied vocabulary.
    shutil.copytree(folder, tmp_path / "m", ignore=shutil.ignore_patterns("o200k_base.tiktoken"))
    with open("/dev/full", "wb") as full:
        rc, _, err = process(
            args,
            stdin=b"Hello\n",
            env={"GPTOSS_MLX_HOME": str(tmp_path)},
            stdout=full,
        )
    assert rc == 1
    assert one_error_line(err) == (
        "error: stdout: cannot write the output (No space left on device)"
    )


@pytest.mark.parametrize("command", ["generate", "chat", "batch", "prompt"])
def test_a_closed_stdout_is_one_line(folder, tmp_path, command):
    """Issue 17 item 6: `>&-` was an AttributeError traceback."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl({"prompt": "hi"}))
    args = {
        "generate": ["generate", "-m", folder, "-p", "Hi"],
        "chat": ["chat", "-m", folder],
        "batch": ["batch", str(inp), "-m", folder],
        "prompt": ["prompt"],
    }[command]
    rc, _, err = process(
        args,
        stdin=b'[{"role": "user", "content": "Hi"}]',
        stdout=None,
        preexec_fn=lambda: os.close(1),
    )
    assert rc == 2
    assert "stdout is closed" in one_error_line(err)


def test_batch_to_devices_and_fifos_fsyncs_only_regular_files(folder, tmp_path):
    """Issue 17 item 6: -o /dev/null, /dev/stdout or a FIFO wrote everything, then fsync raised
    EINVAL. Nothing there is replaced, so they need no --overwrite either."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl(*({"id": i, "prompt": f"q{i}", "max_tokens": 2} for i in range(3))))
    res = cli("batch", str(inp), "-m", folder, "-o", "/dev/null", "-q")
    assert res.exit_code == 0 and res.stderr == "", res.output
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    res = cli("batch", str(inp), "-m", folder, "-o", str(fifo), "-q")
    reader.join(timeout=60)
    assert res.exit_code == 0, res.output
    assert sorted(json.loads(line)["id"] for line in got[0].splitlines()) == [0, 1, 2]
    rc, out, err = process(["batch", str(inp), "-m", folder, "-o", "/dev/stdout", "-q"])
    assert rc == 0 and err == "", err
    assert sorted(json.loads(line)["id"] for line in out.splitlines()) == [0, 1, 2]
    res = cli("batch", str(inp), "-m", folder, "-o", str(fifo), "--resume")
    assert "is not a regular file, so --resume cannot read it back" in failed(res, 2)


def _file_size_limit(limit: int):
    def preexec():  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_batch_to_a_full_disk_is_one_line_and_resume_finishes(folder, tmp_path):
    """Issue 17 item 6: three chained tracebacks. The disk is "full" after 1000 bytes (a file
    size limit): the run stops with one error line, keeps its records, and --resume repairs the
    partial last line and finishes every id exactly once."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl(*({"id": f"q{i}", "prompt": f"q{i}", "max_tokens": 2} for i in range(6))))
    out = tmp_path / "out.jsonl"
    args = ["batch", str(inp), "-m", folder, "-o", str(out), "-b", "1", "--date", "2025-01-01"]
    rc, _, err = process(args, preexec_fn=_file_size_limit(1000))
    assert rc == 1 and "Traceback" not in err, err
    lines = err.splitlines()
    assert lines[-1].startswith(f"error: {out}: cannot write (File too large) after ")
    assert lines[-1].endswith("records; the records written so far are kept")
    assert "interrupted: to finish, run the same command with --resume" in err
    assert 0 < out.stat().st_size <= 1000
    rc, _, err = process([*args, "--resume"])
    assert rc == 0, err
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == [f"q{i}" for i in range(6)]


def test_batch_into_a_full_device_is_one_line(folder, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl({"prompt": "hi", "max_tokens": 2}))
    with open("/dev/full", "wb") as full:
        rc, _, err = process(["batch", str(inp), "-m", folder, "-q"], stdout=full)
    assert rc == 1
    assert one_error_line(err) == (
        "error: stdout: cannot write (No space left on device) after 0 records"
    )


def test_batch_into_head_stops_as_interrupted(folder, tmp_path):
    """`batch ... | head -1` exited 0 after 2 of 30 records, as if it had finished."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl(*({"id": i, "prompt": f"q{i}", "max_tokens": 2} for i in range(30))))
    script = (
        f'"{sys.executable}" -m gptoss_mlx.cli batch "{inp}" -m "{folder}" -b 1'
        ' | head -1 >/dev/null; exit "${PIPESTATUS[0]}"'
    )
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=180)
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
    assert "--resume needs -o FILE" in p.stderr
    assert "error: stdout: its reader closed it after" in p.stderr.splitlines()[-1]


# --------------------------------------------------------------------------- Ctrl-C at start-up

# The console script's body, with an import that Ctrl-C interrupts halfway through the commands.
_INTERRUPTED_START = """
import importlib.abc, sys

class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "gptoss_mlx.cli.generate":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupt())
from gptoss_mlx.cli import main
sys.exit(main())
"""


def test_ctrl_c_while_the_commands_import_is_one_line_exit_130():
    """Issue 17 item 7: a KeyboardInterrupt traceback through the imports."""
    p = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_START, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 130
    assert p.stderr == "interrupted\n" and p.stdout == ""


# --------------------------------------------------------------------------- batch memory


def test_batch_plans_memory_for_the_lines_there_are(folder, tmp_path, monkeypatch):
    """Issue 17 item 10: -b 3000 sized the KV cache for 3000 sequences with 6 lines in the file,
    and its advice was to convert with q4 rather than lower -b or --max-context."""
    from gptoss_mlx.weights.loading import inspect_folder

    cfg = inspect_folder(folder).config
    plan = plan_memory(folder, cfg, default_dtype())
    budget = plan.total(4096, 6) + 10**6  # 6 sequences fit at 4096 tokens, 3000 do not
    assert not replace(plan, budget=budget).fits(4096, 3000)
    monkeypatch.setattr(memory, "device_budget", lambda: (budget, "the machine's RAM"))
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl(*({"id": i, "prompt": f"q{i}", "max_tokens": 2} for i in range(6))))
    args = ("batch", "-m", folder, "-b", "3000", "--max-context", "4096", "-q")
    res = cli(*args, str(inp))
    assert res.exit_code == 0, res.output
    assert len(res.stdout.splitlines()) == 6
    # From stdin the lines cannot be counted first: the advice says what to lower.
    line = failed(cli(*args, "-", input=inp.read_bytes()), 1)
    assert "lower --batch-size (" in line and "fit at 4096 tokens)" in line


def test_memory_advice_for_a_batch_names_the_batch_size_first():
    plan = memory.MemoryPlan(
        weights=12 * 10**9,
        kv_per_token=24576,
        kv_fixed=10**7,
        working=10**9,
        budget=16 * 10**9,
        budget_source="the machine's RAM",
    )
    with pytest.raises(MemoryPreflightError) as e:
        choose_max_context(plan, 4096, 131072, batch=3000)
    message = str(e.value)
    fit = plan.largest_batch(4096)
    assert plan.fits(4096, fit) and not plan.fits(4096, fit + 1)
    assert f"lower --batch-size ({fit} fit at 4096 tokens)" in message
    assert message.index("--batch-size") < message.index("mxfp4-q4")
    with pytest.raises(MemoryPreflightError, match="lower --max-context"):
        choose_max_context(plan, None, 131072, batch=3000)


# --------------------------------------------------------------------------- smaller ones


def test_a_lone_surrogate_keeps_the_lines_own_id():
    """The error record of a line with a "\\ud800" escape carried the line number as its id."""
    defaults = BatchDefaults()
    item = parse_line(InputLine(4, '{"id": "x", "prompt": "a \\ud800"}'), defaults)
    assert isinstance(item, LineFailure) and item.id == "x" and item.id_known
    assert "unpaired surrogate" in item.error
    # An id that is itself a lone surrogate cannot be written back: the line number stands in.
    item = parse_line(InputLine(5, '{"id": "\\udc00", "prompt": "a"}'), defaults)
    assert isinstance(item, LineFailure) and item.id == 5 and not item.id_known
    assert isinstance(
        parse_line(InputLine(6, '{"id": "\\ud83d\\ude00", "prompt": "a"}'), defaults), BatchItem
    )


@pytest.mark.parametrize(
    "opts, named",
    [
        (["--system", "Be brief."], "--system"),
        (["--developer", "x"], "--developer"),
        (["--tools", "tools.json"], "--tools"),
        (["-r", "low"], "-r/--reasoning-effort"),
        (["--show-reasoning"], "--show-reasoning"),
    ],
)
def test_raw_refuses_the_options_it_would_ignore(tmp_path, opts, named):
    res = cli("generate", "--raw", "-m", str(tmp_path / "no-model"), "-p", "def f():", *opts)
    line = failed(res, 2)
    assert line.startswith("error: --raw completes plain text without harmony: ")
    assert named in line


def test_verify_names_files_once_refuses_missing_folders_and_bars_only_terminals(folder, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("o200k_base.tiktoken"))
    intact = cli("verify", f"{copy}/")
    assert intact.exit_code == 0 and intact.stderr == ""  # not a terminal: no progress line
    assert intact.stdout.startswith(f"{copy}: ok (")
    (copy / "notes.txt").write_text("x")
    res = cli("verify", f"{copy}/")
    assert res.exit_code == 1
    assert f"{copy}/notes.txt: not in the manifest" in res.stderr.splitlines()
    assert "//" not in res.stderr and "verifying" not in res.stderr
    missing = cli("verify", "/nonexistent/model")
    assert failed(missing, 2) == "error: /nonexistent/model: no such folder"


@pytest.mark.parametrize("value", ["1000", "0", "all", "257"])
def test_threads_variable_is_checked_alike_by_every_command(folder, monkeypatch, value):
    monkeypatch.setenv("GPTOSS_MLX_THREADS", value)
    message = f"error: GPTOSS_MLX_THREADS='{value}': expected a whole number from 1 to 256"
    for args in (
        ["info", folder],
        ["generate", "-m", folder, "-p", "Hi"],
        ["bench", "-m", folder, "--prompt-tokens", "8", "--gen-tokens", "2", "--runs", "1"],
    ):
        res = cli(*args)
        assert failed(res, 2).startswith(message), args
        assert res.stdout == ""


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="matmuls are split on the CPU only")
def test_threads_variable_empty_is_unset_and_info_reports_what_runs(folder, monkeypatch):
    from gptoss_mlx.engine.runtime import load
    from gptoss_mlx.model.cpu_streams import default_threads, threads_of

    monkeypatch.setenv("GPTOSS_MLX_THREADS", "")
    assert cli("info", folder).exit_code == 0
    monkeypatch.setenv("GPTOSS_MLX_THREADS", "3")
    assert default_threads() == 3
    assert "matmuls split across 3 CPU threads" in cli("info", folder).stdout
    model, _ = load(folder)
    assert threads_of(model) == 3  # what bench reports: the streams the loaded model uses
