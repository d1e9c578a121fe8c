"""`gptoss-mlx batch`: JSONL in, one record per line out, resumable.

On a tiny random model converted like a real one (synthetic byte-level tokenizer, real vocabulary
size so harmony's ids exist). The oracle for every result record is `run_turn`, the
single-sequence path `generate` uses, on the same rendered prompt. Most tests drive `BatchJob`
in-process; the command itself runs under click's runner, and in real processes for what only a
process shows (signals, kill -9).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import convert_chat_model
from gptoss_mlx.cli import main
from gptoss_mlx.cli.batch_files import InputLine, plan_output, read_lines
from gptoss_mlx.cli.batch_job import (
    BatchDefaults,
    BatchItem,
    BatchJob,
    LineFailure,
    line_seed,
    parse_line,
)
from gptoss_mlx.engine.chat import run_turn
from gptoss_mlx.engine.generate import SamplingParams
from gptoss_mlx.engine.runtime import load_for_inference
from gptoss_mlx.harmony.render import render_prompt
from gptoss_mlx.harmony.request import parse_chat_request
from vocabs import REAL_VOCAB, needs_real_vocab

DATE = "2025-01-01"
GREEDY = SamplingParams(temperature=0.0)
RESULT_KEYS = {"id", "line", "final", "reasoning", "tool_calls", "finish_reason", "usage"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "clear"}'},
]


# --------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(convert_chat_model(tmp_path_factory.mktemp("batch")))


@pytest.fixture(scope="module")
def loaded(folder):
    """(model, tokenizer, context limit), loaded once."""
    return load_for_inference(folder, 4096)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPTOSS_MLX_MODEL", raising=False)


def jsonl(*lines) -> bytes:
    """Dicts as JSON lines, bytes as they are."""
    out = [x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines]
    return b"\n".join(out) + b"\n"


def run_job(loaded, data: bytes, *, batch_size: int = 3, max_context=None, **defaults):
    """Run `data` through a BatchJob; returns ({line: record}, summary)."""
    model, tok, ctx = loaded
    defaults = {"sampling": GREEDY, "max_tokens": 4, **defaults}
    job = BatchJob(
        model,
        tok,
        defaults=BatchDefaults(**defaults),
        batch_size=batch_size,
        max_context=max_context or ctx,
        date=DATE,
    )
    records: list[dict] = []
    job.run(read_lines(io.BytesIO(data)), records.append)
    by_line = {r["line"]: r for r in records}
    assert len(by_line) == len(records)  # one record per line
    return by_line, job.summary


def prompt_of(loaded, obj: dict, instructions: str | None = None) -> list[int]:
    """What a line should render to, built independently of batch.py."""
    request = dict(obj)
    if "prompt" in request:
        request["messages"] = [{"role": "user", "content": request.pop("prompt")}]
    if instructions:
        request["messages"] = [{"role": "developer", "content": instructions}, *request["messages"]]
    request = {k: v for k, v in request.items() if k in ("messages", "tools", "reasoning_effort")}
    return render_prompt(parse_chat_request(request), loaded[1], date=DATE)


def single(loaded, prompt: list[int], max_tokens: int, max_context=None) -> dict:
    """The oracle: one sequence alone through `run_turn`, as `generate --json` prints it."""
    model, tok, ctx = loaded
    res = run_turn(
        model, tok, prompt, sampling=GREEDY, max_tokens=max_tokens, max_context=max_context or ctx
    )
    return res.to_json()


def without_place(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("id", "line")}


def cli(*args: str, input: bytes | str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def read_records(path: Path) -> list[dict]:
    """Parse a whole output file; every line must be a complete JSON object."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), data[-80:]
    return [json.loads(line) for line in data.splitlines()]


# --------------------------------------------------------------------------- inputs and records


def test_prompt_messages_and_tool_lines_render_like_chat_requests(loaded):
    lines = [
        {"id": "p", "prompt": "Why is the sky blue?"},
        {"id": "m", "messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "low"},
        {"id": "t", "messages": TOOL_CHAT, "tools": [WEATHER]},
        {"prompt": "no id here", "model": "gpt-oss-20b"},  # "model" is ignored
    ]
    records, summary = run_job(loaded, jsonl(*lines), max_tokens=3)
    assert sorted(records) == [1, 2, 3, 4]
    assert [records[n]["id"] for n in (1, 2, 3, 4)] == ["p", "m", "t", 4]  # 4: its line number
    for n, obj in enumerate(lines, 1):
        rec = records[n]
        assert set(rec) == RESULT_KEYS, rec
        assert rec == {"id": rec["id"], "line": n, **single(loaded, prompt_of(loaded, obj), 3)}
    assert summary.records == 4 and summary.errors == 0
    assert summary.completion_tokens == sum(
        r["usage"]["completion_tokens"] for r in records.values()
    )


def test_text_mode_and_instructions(loaded):
    data = b"What is 2+2?\n\n  spaces kept  \n{not json, just text}\n"
    records, _ = run_job(loaded, data, text=True, instructions="Be brief.", max_tokens=2)
    assert sorted(records) == [1, 3, 4]  # the blank line 2 is skipped, but counted
    for n, text in [(1, "What is 2+2?"), (3, "  spaces kept  "), (4, "{not json, just text}")]:
        expected = single(loaded, prompt_of(loaded, {"prompt": text}, "Be brief."), 2)
        assert records[n] == {"id": n, "line": n, **expected}


def test_per_line_settings_override_the_defaults():
    defaults = BatchDefaults(
        reasoning_effort="high",
        tools=[WEATHER],
        sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=5),
        max_tokens=100,
    )
    plain = parse_line(InputLine(1, json.dumps({"id": "a", "prompt": "x"})), defaults)
    assert isinstance(plain, BatchItem)
    assert plain.max_tokens == 100 and plain.request.reasoning_effort == "high"
    assert [t.name for t in plain.request.tools] == ["get_weather"]
    assert plain.sampling == SamplingParams(0.7, 0.9, 0, 0.0, line_seed(5, "a"))
    line = {
        "id": "b",
        "prompt": "x",
        "max_tokens": 7,
        "reasoning_effort": "low",
        "tools": [],
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 40,
        "min_p": 0.05,
        "seed": 11,
    }
    item = parse_line(InputLine(2, json.dumps(line)), defaults)
    assert isinstance(item, BatchItem)
    assert item.max_tokens == 7 and item.request.reasoning_effort == "low"
    assert item.request.tools == ()
    assert item.sampling == SamplingParams(0.0, 0.5, 40, 0.05, 11)


def test_seed_option_gives_each_id_its_own_reproducible_seed():
    assert line_seed(5, "a") == line_seed(5, "a")
    assert len({line_seed(5, "a"), line_seed(5, "b"), line_seed(6, "a"), line_seed(5, 1)}) == 4
    assert line_seed(5, 1) != line_seed(5, "1")  # 1 and "1" are different ids
    assert all(0 <= line_seed(s, "x") < 2**64 for s in (0, 1, 2**63))


def test_per_line_max_tokens_and_seeded_sampling_end_to_end(loaded):
    lines = [
        {"id": "short", "prompt": "Hello", "max_tokens": 2},
        {"id": "long", "prompt": "Hello"},
        {"id": "s1", "prompt": "Hello", "temperature": 1.0, "seed": 3, "max_tokens": 6},
        {"id": "s2", "prompt": "Hello", "temperature": 1.0, "seed": 3, "max_tokens": 6},
    ]
    alone, _ = run_job(loaded, jsonl(*lines), batch_size=1, max_tokens=5)
    batched, _ = run_job(loaded, jsonl(*lines), batch_size=4, max_tokens=5)
    assert alone == batched  # sampled rows too: each row draws from its own seeded key
    assert alone[1]["usage"]["completion_tokens"] == 2
    assert alone[2]["usage"]["completion_tokens"] == 5
    assert without_place(alone[3]) == without_place(alone[4])  # same seed, same settings
    assert alone[3]["final"] != alone[1]["final"]  # sampled, not greedy


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_records_equal_single_runs(loaded, batch_size):
    prompts = ["a", "Tell me a story about a dragon and a knight.", "hi", "12345", "x y z"]
    budgets = [9, 3, 6, 1, 5]
    lines = [
        {"id": i, "prompt": p, "max_tokens": n}
        for i, (p, n) in enumerate(zip(prompts, budgets, strict=True))
    ]
    records, summary = run_job(loaded, jsonl(*lines), batch_size=batch_size)
    for n, obj in enumerate(lines, 1):
        expected = single(loaded, prompt_of(loaded, obj), obj["max_tokens"])
        assert records[n] == {"id": obj["id"], "line": n, **expected}
    assert summary.errors == 0


@needs_real_vocab("to decode multi-byte text the way real outputs are decoded")
def test_greedy_records_equal_single_runs_with_the_real_vocabulary(folder, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(folder, real)
    shutil.copy(REAL_VOCAB, real / "o200k_base.tiktoken")  # preferred over tokenizer.json
    real_loaded = load_for_inference(real, 4096)
    lines = [{"id": i, "prompt": p} for i, p in enumerate(["héllo wörld", "日本語で答えて", "ok"])]
    records, _ = run_job(real_loaded, jsonl(*lines), batch_size=3, max_tokens=8)
    for n, obj in enumerate(lines, 1):
        expected = single(real_loaded, prompt_of(real_loaded, obj), 8)
        assert records[n] == {"id": obj["id"], "line": n, **expected}


# --------------------------------------------------------------------------- bad lines


BAD_LINES = [
    (b"not json", "not valid JSON"),
    (b'{"id": "x", "prompt": "unterminated', "not valid JSON"),
    (b'["a", "list"]', "expected a JSON object, got list"),
    (b'{"id": "n1"}', 'expected "messages"'),
    (b'{"id": "n2", "prompt": "a", "messages": []}', 'expected "messages"'),
    (b'{"id": "n3", "prompt": 5}', "prompt: expected a string"),
    (b'{"id": "n4", "prompt": "   "}', "prompt: empty"),
    (b'{"id": "n5", "messages": [{"role": "bot", "content": "x"}]}', "messages[0].role"),
    (b'{"id": "n6", "messages": "hi"}', "messages: expected a non-empty list"),
    (b'{"id": "n7", "prompt": "a", "max_token": 3}', "max_token: unknown field"),
    (b'{"id": "n8", "prompt": "a", "max_tokens": 0}', "max_tokens: must be in [1"),
    (b'{"id": "n9", "prompt": "a", "max_tokens": 2.5}', "max_tokens: expected an integer"),
    (b'{"id": "n10", "prompt": "a", "temperature": "hot"}', "temperature: expected a number"),
    (b'{"id": "n11", "prompt": "a", "temperature": NaN}', "temperature: expected a finite"),
    (b'{"id": "n12", "prompt": "a", "top_p": 0}', "top_p: must be in (0, 1]"),
    (b'{"id": "n13", "prompt": "a", "seed": -1}', "seed: must be in [0"),
    (b'{"id": "n14", "prompt": "a", "reasoning_effort": "max"}', "reasoning_effort"),
    (b'{"id": "n15", "prompt": "a", "tools": [{"function": {"name": "a b"}}]}', "tools[0]"),
    (b'{"id": [1], "prompt": "a"}', "id: expected a string or an integer"),
    (b'{"id": true, "prompt": "a"}', "id: expected a string or an integer"),
    (b'{"id": "n16", "prompt": "\\ud800"}', "unpaired surrogate"),
    (b'{"id": "n17", "prompt": "caf\xe9"}', "not valid UTF-8 (byte 0xe9"),
    (b"\xef\xbb\xbf" + b'{"id": "n18", "prompt": "a"}', "not valid JSON"),  # a BOM mid-file
    (b'{"id": "n19", "prompt": "' + b"x" * (1 << 20) + b'"}', "longer than 1048576 bytes"),
]


def test_every_bad_line_gets_an_error_record_and_the_rest_still_run(loaded):
    good = [{"id": "g1", "prompt": "first"}, {"prompt": "missing id"}, {"id": 7, "prompt": "x"}]
    lines = [b"\xef\xbb\xbf" + json.dumps(good[0]).encode()]  # a BOM opening the file is fine
    lines += [b"", b"   \t"]  # blank lines: skipped, still counted
    lines += [bad for bad, _ in BAD_LINES]
    lines += [json.dumps(good[1]).encode(), json.dumps(good[2]).encode()]
    lines += [b'{"id": "g1", "prompt": "again"}', b'{"id": "7", "prompt": "a string id"}']
    records, summary = run_job(loaded, jsonl(*lines), max_tokens=2)
    first_bad = 4
    for k, (_, message) in enumerate(BAD_LINES):
        rec = records.pop(first_bad + k)
        assert set(rec) == {"id", "line", "error"} and message in rec["error"], (message, rec)
    n = first_bad + len(BAD_LINES)
    assert records.pop(n + 2) == {
        "id": "g1",
        "line": n + 2,
        "error": "duplicate id (first on line 1)",
    }
    assert records[1]["id"] == "g1" and records[n]["id"] == n and records[n + 1]["id"] == 7
    assert records[n + 3]["id"] == "7"  # "7" is not the id 7
    assert sorted(records) == [1, n, n + 1, n + 3]
    assert all(set(r) == RESULT_KEYS for r in records.values())
    assert summary.errors == len(BAD_LINES) + 1 and summary.records == len(BAD_LINES) + 5


def test_unreadable_lines_do_not_claim_ids():
    """A line not understood takes its line number as id for its record, but does not make a
    later line's own id a duplicate (0-based ids would otherwise collide with line numbers)."""
    data = jsonl(b"oops", {"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"})
    items = [parse_line(line, BatchDefaults()) for line in read_lines(io.BytesIO(data))]
    assert isinstance(items[0], LineFailure) and not items[0].id_known and items[0].id == 1
    assert isinstance(items[1], BatchItem) and items[1].id == 1


def test_context_overflow(loaded):
    fits = {"id": "fits", "prompt": "short", "max_tokens": 50}
    limit = len(prompt_of(loaded, fits)) + 3
    long = {"id": "long", "prompt": "a much longer prompt " * 5}
    records, summary = run_job(loaded, jsonl(fits, long), max_context=limit)
    assert records[1] == {
        "id": "fits",
        "line": 1,
        **single(loaded, prompt_of(loaded, fits), 50, limit),
    }
    assert records[1]["finish_reason"] == "length"
    assert records[1]["usage"]["completion_tokens"] == 3  # the context, not max_tokens, ended it
    assert "context limit is" in records[2]["error"] and summary.errors == 1


# --------------------------------------------------------------------------- the command


def write(path: Path, *lines) -> str:
    path.write_bytes(jsonl(*lines))
    return str(path)


def ok_lines(n: int, max_tokens: int = 3) -> list[dict]:
    return [{"id": f"q{i}", "prompt": f"question {i}", "max_tokens": max_tokens} for i in range(n)]


def test_command_writes_a_file_and_exits_0(folder, tmp_path):
    inp = write(tmp_path / "in.jsonl", *ok_lines(4))
    out = tmp_path / "out.jsonl"
    res = cli("batch", inp, "-o", str(out), "-m", folder, "-t", "0", "-b", "2", "--date", DATE)
    assert res.exit_code == 0, res.output
    records = read_records(out)
    assert sorted(r["id"] for r in records) == ["q0", "q1", "q2", "q3"]
    assert res.stdout == ""
    summary = res.stderr.strip().splitlines()[-1]
    assert summary.startswith("batch: 4 records (0 errors)") and "tokens/s" in summary


def test_command_writes_stdout_and_reads_stdin(folder, tmp_path):
    data = jsonl(*ok_lines(3, max_tokens=2))
    res = cli("batch", "-", "-m", folder, "-t", "0", "--date", DATE, input=data)
    assert res.exit_code == 0, res.output
    from_stdin = [json.loads(line) for line in res.stdout.splitlines()]
    inp = write(tmp_path / "in.jsonl", *ok_lines(3, max_tokens=2))
    from_file = cli("batch", inp, "-m", folder, "-t", "0", "--date", DATE, "-q")
    assert from_file.exit_code == 0 and from_file.stderr == ""
    assert sorted(from_stdin, key=str) == sorted(
        (json.loads(line) for line in from_file.stdout.splitlines()), key=str
    )
    assert len(from_stdin) == 3


def test_exit_code_1_when_a_line_fails(folder, tmp_path):
    inp = write(tmp_path / "in.jsonl", *ok_lines(2), b"{bad")
    out = tmp_path / "out.jsonl"
    res = cli("batch", inp, "-o", str(out), "-m", folder, "-t", "0")
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines()[-1] == "error: 1 of 3 lines failed (see their records)"
    assert [("error" in r) for r in sorted(read_records(out), key=lambda r: r["line"])] == [
        False,
        False,
        True,
    ]


def test_fail_fast_stops_at_the_first_failure(folder, tmp_path):
    inp = write(tmp_path / "in.jsonl", b"{bad", *ok_lines(5))
    out = tmp_path / "out.jsonl"
    res = cli("batch", inp, "-o", str(out), "-m", folder, "-t", "0", "--fail-fast")
    assert res.exit_code == 1
    assert "--fail-fast" in res.stderr and "line 1: not valid JSON" in res.stderr
    assert [r["line"] for r in read_records(out)] == [1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.jsonl"], "missing.jsonl: not found"),
        (["IN", "-o", "OUT"], "exists; pass --resume to finish it or --overwrite"),
        (["IN", "--resume"], "--resume needs an output file"),
        (["IN", "-o", "OUT", "--resume", "--overwrite"], "exclude each other"),
        (["IN", "-o", "IN", "--overwrite"], "is also the input"),
        (["IN", "--tools", "nope.json"], "nope.json: not found"),
        (["IN", "--date", "yesterday"], "date: expected YYYY-MM-DD"),
        (["IN", "--top-p", "0"], "top_p: must be in (0, 1]"),
    ],
)
def test_bad_usage_exits_2_before_loading_or_touching_anything(tmp_path, args, message):
    inp = write(tmp_path / "in.jsonl", *ok_lines(1))
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"precious\n")
    args = [inp if a == "IN" else str(out) if a == "OUT" else a for a in args]
    # No model exists: anything that got as far as loading would fail differently.
    res = cli("batch", *args, "-m", str(tmp_path / "no-model"))
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]  # one line
    assert message in res.stderr and "Traceback" not in res.stderr
    assert out.read_bytes() == b"precious\n"


def test_overwrite_replaces_the_output(folder, tmp_path):
    inp = write(tmp_path / "in.jsonl", *ok_lines(2))
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"old stuff, not even JSON\n" * 3)
    res = cli("batch", inp, "-o", str(out), "-m", folder, "-t", "0", "--overwrite")
    assert res.exit_code == 0, res.output
    assert sorted(r["id"] for r in read_records(out)) == ["q0", "q1"]


def test_progress_bar_on_request(folder, tmp_path):
    inp = write(tmp_path / "in.jsonl", *ok_lines(3, max_tokens=2))
    res = cli("batch", inp, "-m", folder, "-t", "0", "--progress")
    assert res.exit_code == 0, res.output
    bar = [line for line in res.stderr.splitlines() if line.startswith("[")]
    assert bar and bar[-1].startswith("[####################] 3/3 | 0 errors |"), res.stderr
    assert "tokens/s" in bar[-1]


# --------------------------------------------------------------------------- resume


def test_resume_completes_a_partial_output(folder, tmp_path):
    lines = ok_lines(6)
    inp = write(tmp_path / "in.jsonl", *lines, b"{broken")
    full = tmp_path / "full.jsonl"
    base = ["-m", folder, "-t", "0", "--date", DATE, "-b", "3"]
    assert cli("batch", inp, "-o", str(full), *base).exit_code == 1  # the broken line
    reference = {r["id"]: r for r in read_records(full)}

    # An interrupted run: two results, an error record (to retry), half a record.
    out = tmp_path / "out.jsonl"
    kept = [reference["q3"], reference["q0"]]
    error = {"id": "q1", "line": 2, "error": "the model produced non-finite logits"}
    partial = json.dumps(reference["q5"]).encode()[:40]
    out.write_bytes(jsonl(kept[0], error, kept[1]) + partial)

    res = cli("batch", inp, "-o", str(out), *base, "--resume")
    assert res.exit_code == 1, res.output  # the broken line fails again
    assert "removed a partial last line (40 bytes)" in res.stderr
    assert "retrying 1 lines that failed before" in res.stderr
    assert "2 skipped (already done)" in res.stderr
    records = read_records(out)
    assert records[:2] == kept  # the completed records stay first, untouched
    assert sorted(map(str, (r["id"] for r in records))) == sorted(map(str, reference))  # once each
    assert {r["id"]: r for r in records} == reference

    again = cli("batch", inp, "-o", str(out), *base, "--resume")  # only the broken line left
    assert "batch: 1 records (1 errors), 6 skipped" in again.stderr
    assert {r["id"]: r for r in read_records(out)} == reference


def test_resume_without_an_output_yet_starts_fresh(folder, tmp_path):
    inp = write(tmp_path / "in.jsonl", *ok_lines(2))
    out = tmp_path / "out.jsonl"
    res = cli("batch", inp, "-o", str(out), "-m", folder, "--resume")
    assert res.exit_code == 0, res.output
    assert len(read_records(out)) == 2


def test_resume_refuses_a_file_that_is_not_batch_output(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": 1, "final": "x"}\nhello world\n{"id": 2, "final": "y"}\n')
    with pytest.raises(Exception, match="line 2 is not a batch record"):
        plan_output(str(out), resume=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(), st.text(max_size=5)), st.booleans(), st.text(max_size=8)
        ),
        max_size=6,
    ),
    st.integers(min_value=0, max_value=10**6),
)
def test_resume_keeps_exactly_the_complete_result_records(tmp_path_factory, recs, cut):
    """Any output cut at any byte (a kill -9 mid-write) resumes to its complete result records."""
    records = [
        {"id": i, "line": n, "error": t} if failed else {"id": i, "line": n, "final": t}
        for n, (i, failed, t) in enumerate(recs, 1)
    ]
    data = b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in records)
    cut = cut % (len(data) + 1)
    path = tmp_path_factory.mktemp("cut") / "out.jsonl"
    path.write_bytes(data[:cut])
    plan = plan_output(str(path), resume=True)
    complete = data[:cut].count(b"\n")
    whole = records[:complete]
    results = [r for r in whole if "error" not in r]
    assert plan.done == {json.dumps(r["id"]) for r in results}
    assert plan.dropped_errors == len(whole) - len(results)
    plan.open().close()
    assert read_records(path) == (results if plan.dropped_errors else whole)


# --------------------------------------------------------------------------- real processes


def start_batch(folder: str, out: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_MLX_MODEL"}
    cmd = [sys.executable, "-m", "gptoss_mlx.cli", "batch", "-", "-o", str(out), "-m", folder]
    return subprocess.Popen(
        [*cmd, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def wait_for_records(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"no {n} records in {timeout} s")


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"]
)
def test_killed_run_leaves_valid_jsonl_that_resume_completes(folder, tmp_path, sig):
    """The first lines go in through a pipe left open, so the run cannot have finished when the
    signal lands: the quick line's record is written while the long lines generate or wait for
    more input."""
    lines = [{"id": "quick", "prompt": "a", "max_tokens": 1}, *ok_lines(5, max_tokens=16)]
    out = tmp_path / "out.jsonl"
    proc = start_batch(folder, out, "-t", "0", "-b", "2", "--date", DATE)
    proc.stdin.write(jsonl(*lines[:3]))
    proc.stdin.flush()
    wait_for_records(out, 1, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # closed cleanly: summary and a hint, exit 130
        assert proc.returncode == 130, err.decode()
        assert "--resume" in err.decode() and err.decode().rstrip().endswith("interrupted")
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    before = [json.loads(line) for line in complete.splitlines()]
    assert before and before[0]["id"] == "quick"
    if sig != signal.SIGKILL:
        assert data == complete  # nothing partial after a clean stop

    inp = write(tmp_path / "in.jsonl", *lines)
    res = cli(
        "batch", inp, "-o", str(out), "-m", folder, "-t", "0", "-b", "4", "--date", DATE, "--resume"
    )
    assert res.exit_code == 0, res.output
    after = read_records(out)
    assert after[: len(before)] == before
    assert sorted(r["id"] for r in after) == sorted(o["id"] for o in lines)
    assert all(set(r) == RESULT_KEYS for r in after)
