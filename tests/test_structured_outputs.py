"""Structured outputs end to end on a tiny random-weight model with the real vocabulary.

The model's output is noise, which is the point: whatever it would write, the grammar alone must
make every answer parse and validate. The oracle is the `jsonschema` package (an independent
validator); reasoning is bounded with a small `max_reasoning_tokens` so the tests reach the JSON
quickly. Covered: a table of schemas through `ChatSession` (the path of `generate`) and through
the batch job, strict tool calls, the reasoning budget, cut-off answers, greedy batch == single
with constraints, matchers freed with their rows, and the `generate` / `batch` commands.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import convert_chat_model
from gptoss_mlx.cli import main
from gptoss_mlx.cli.batch_files import read_lines
from gptoss_mlx.cli.batch_job import BatchDefaults, BatchJob
from gptoss_mlx.engine.batching import BatchEngine, BatchRequest
from gptoss_mlx.engine.chat import ChatSession, run_turn
from gptoss_mlx.engine.constraints import GrammarSpec, compile_grammar
from gptoss_mlx.engine.generate import SamplingParams
from gptoss_mlx.engine.runtime import load_for_inference
from gptoss_mlx.harmony.render import render_prompt
from gptoss_mlx.harmony.request import parse_chat_request
from structured_cases import PARAMETERS, SCHEMAS, TIME, TOOLS, WEATHER, response_format, validate
from vocabs import REAL_VOCAB, needs_real_vocab

pytestmark = needs_real_vocab("llguidance masks the model's real o200k tokens")

DATE = "2025-01-01"
GREEDY = SamplingParams(temperature=0.0)
BUDGET = 2  # reasoning tokens: enough to exercise the analysis, few enough to stay fast
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A random 2-layer model of the real vocabulary size, with the real o200k vocabulary."""
    out = convert_chat_model(tmp_path_factory.mktemp("structured"))
    shutil.copy(REAL_VOCAB, out / "o200k_base.tiktoken")  # preferred over tokenizer.json
    return out


@pytest.fixture(scope="module")
def loaded(folder):
    return load_for_inference(folder, 4096)


def session(loaded, sampling=GREEDY, **kw) -> ChatSession:
    model, tok, ctx = loaded
    kw = {"max_reasoning_tokens": BUDGET, "max_tokens": MAX_TOKENS, **kw}
    return ChatSession(model, tok, sampling=sampling, max_context=ctx, date=DATE, **kw)


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_answer_validates(loaded, name):
    """Sampled here; greedy in the batch test below, which runs the same table."""
    sampling = SamplingParams(temperature=1.0, seed=7)
    result = session(loaded, sampling, response_format=response_format(name)).send("Go.")
    assert result.finish_reason == "stop", result.final
    validate(result.final, SCHEMAS[name])
    assert not result.tool_calls


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tool_calls_validate_against_their_tool(loaded, seed):
    s = session(
        loaded, SamplingParams(temperature=1.0, seed=seed), tools=TOOLS, tool_choice="required"
    )
    result = s.send("Weather in Paris, and the time there?")
    assert result.finish_reason == "tool_calls" and result.final == ""
    (call,) = result.tool_calls
    name = call["function"]["name"]
    validate(call["function"]["arguments"], PARAMETERS[name])


def test_a_named_tool_choice_calls_that_tool(loaded):
    choice = {"type": "function", "function": {"name": "get_time"}}
    result = session(loaded, tools=TOOLS, tool_choice=choice).send("What time is it in Oslo?")
    (call,) = result.tool_calls
    assert call["function"]["name"] == "get_time"
    validate(call["function"]["arguments"], TIME)


def test_strict_tools_option_holds_tools_without_strict(loaded):
    loose = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    s = session(loaded, tools=loose, tool_choice="required", strict_tools=True)
    (call,) = s.send("Weather?").tool_calls
    validate(call["function"]["arguments"], WEATHER)


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_the_reasoning_budget_bounds_the_analysis(loaded, budget):
    _, tok, _ = loaded
    fmt = response_format("enum")
    reasoned = 0
    # Sampled until a run reasons (after <|channel|> it may as well pick "final"); a noise model
    # rarely picks <|end|> among 200k tokens, so a run that reasons goes on to the limit.
    for seed in range(8 if budget else 2):
        sampling = SamplingParams(temperature=1.0, seed=seed)
        s = session(loaded, sampling, response_format=fmt, max_reasoning_tokens=budget)
        result = s.send("Think about it.")
        validate(result.final, SCHEMAS["enum"])
        tokens = result.tokens
        message = tokens.index(tok.message)  # the header may be spelled in any tokens
        if tok.decode(tokens[:message]) != "<|channel|>analysis":
            assert result.reasoning == "" and tok.end not in tokens
            continue
        assert budget > 0
        # <|channel|>analysis<|message|> TEXT <|end|>: closed after exactly `budget` tokens.
        assert tokens.index(tok.end) - message - 1 == budget
        assert tokens.count(tok.end) == 1  # one analysis message only
        reasoned += 1
        break
    assert reasoned == (1 if budget else 0)


def test_an_answer_cut_off_by_max_tokens_is_length_never_valid(loaded):
    s = session(loaded, response_format=response_format("nested"), max_tokens=9)
    result = s.send("Go.")
    assert result.finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(result.final)


def test_the_prompt_carries_the_response_format(loaded):
    _, tok, _ = loaded
    s = session(loaded, response_format=response_format("enum"))
    s.send("Go.")
    prompt = render_prompt(s.request(s.messages[:1]), tok, date=DATE)
    assert "# Response Formats\n\n## enum\n\n" + json.dumps(
        SCHEMAS["enum"], separators=(",", ":")
    ) in tok.decode(prompt)


# --------------------------------------------------------------------------- batch


def batch_records(loaded, lines: list[dict], batch_size: int = 4, **defaults) -> dict:
    model, tok, ctx = loaded
    defaults = {"sampling": GREEDY, "max_tokens": MAX_TOKENS, "max_reasoning_tokens": BUDGET}
    job = BatchJob(
        model,
        tok,
        defaults=BatchDefaults(**defaults),
        batch_size=batch_size,
        max_context=ctx,
        date=DATE,
    )
    records: list[dict] = []
    data = "\n".join(json.dumps(x) for x in lines).encode() + b"\n"
    job.run(read_lines(io.BytesIO(data)), records.append)
    return {r["id"]: r for r in records}


def single(loaded, line: dict) -> dict:
    """The oracle of a batch record: the same request alone through `run_turn`."""
    model, tok, ctx = loaded
    request = parse_chat_request(
        {"messages": [{"role": "user", "content": line["prompt"]}], **_fields(line)}
    )
    spec = GrammarSpec.of(request, max_reasoning_tokens=line.get("max_reasoning_tokens", BUDGET))
    grammar = compile_grammar(spec, tok, model.config.vocab_size)
    prompt = render_prompt(request, tok, date=DATE)
    res = run_turn(
        model,
        tok,
        prompt,
        sampling=GREEDY,
        max_tokens=MAX_TOKENS,
        max_context=ctx,
        functions=[t.name for t in request.tools],
        constraint=grammar.constraint(),
    )
    return res.to_json()


def _fields(line: dict) -> dict:
    return {k: line[k] for k in ("response_format", "tools", "tool_choice") if k in line}


def test_batch_lines_validate_and_equal_single_greedy_runs(loaded):
    lines = [
        {"id": name, "prompt": f"Give me {name}.", "response_format": response_format(name)}
        for name in SCHEMAS
    ]
    lines.append({"id": "tool", "prompt": "Weather?", "tools": TOOLS, "tool_choice": "required"})
    lines.append({"id": "budget", "prompt": "Hm.", "max_reasoning_tokens": 0,
                  "response_format": response_format("array")})  # fmt: skip
    records = batch_records(loaded, lines)
    for line in lines:
        record = records[line["id"]]
        assert record["finish_reason"] in ("stop", "tool_calls"), record
        if line["id"] == "tool":
            (call,) = record["tool_calls"]
            validate(call["function"]["arguments"], PARAMETERS[call["function"]["name"]])
        else:
            validate(record["final"], line["response_format"]["json_schema"]["schema"])
    # Greedy batch == single with constraints, on a few of them (each costs a single run).
    for line in [lines[0], lines[3], lines[-2], lines[-1]]:
        record, expected = records[line["id"]], single(loaded, line)
        assert {k: record[k] for k in expected} == expected


def test_batch_line_errors_name_the_schema_feature(loaded):
    lines = [
        {"id": "bad", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
            "name": "u", "schema": {"type": "array", "uniqueItems": True}}}},
        {"id": "negative", "prompt": "x", "max_reasoning_tokens": -1},
        {"id": "unknown_tool", "prompt": "x", "tools": TOOLS,
         "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"id": "ok", "prompt": "x", "response_format": response_format("enum")},
    ]  # fmt: skip
    records = batch_records(loaded, lines)
    assert "uniqueItems" in records["bad"]["error"]
    assert "response_format.schema: cannot be enforced" in records["bad"]["error"]
    assert records["negative"]["error"].startswith("max_reasoning_tokens: must be in [0")
    assert "no tool named 'nope'" in records["unknown_tool"]["error"]
    validate(records["ok"]["final"], SCHEMAS["enum"])


def test_batch_cut_off_answers_report_length(loaded):
    lines = [
        {"id": "cut", "prompt": "x", "max_tokens": 6, "response_format": response_format("nested")}
    ]
    (record,) = batch_records(loaded, lines).values()
    assert record["finish_reason"] == "length"


def test_matchers_are_freed_with_their_rows(loaded):
    model, tok, ctx = loaded
    request = parse_chat_request(
        {"messages": [{"role": "user", "content": "x"}], "response_format": response_format("enum")}
    )
    grammar = compile_grammar(GrammarSpec.of(request, max_reasoning_tokens=1), tok, 201088)
    prompt = render_prompt(request, tok, date=DATE)
    constraints = [grammar.constraint() for _ in range(5)]
    budgets = [MAX_TOKENS, 3, MAX_TOKENS, 1, MAX_TOKENS]  # two rows end early, by length
    engine = BatchEngine(model, batch_size=3, max_context=ctx)
    reqs = [
        BatchRequest(prompt, n, GREEDY, id=i, constraint=c)
        for i, (n, c) in enumerate(zip(budgets, constraints, strict=True))
    ]
    seen = []
    for result in engine.run(reqs):
        seen.append(result.id)
        assert constraints[result.id].closed  # freed as its row left
    assert sorted(seen) == [0, 1, 2, 3, 4]
    # A consumer that stops early still frees every row's matcher.
    constraints = [grammar.constraint() for _ in range(3)]
    run = engine.run(BatchRequest(prompt, MAX_TOKENS, GREEDY, constraint=c) for c in constraints)
    next(run, None)
    run.close()
    assert all(c.closed for c in constraints)


# --------------------------------------------------------------------------- the commands


def cli(*args: str, input: bytes | str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPTOSS_MLX_MODEL", raising=False)


def common(folder) -> list[str]:
    return ["-m", str(folder), "-t", "0", "--max-reasoning-tokens", str(BUDGET), "-n", "160"]


def test_generate_with_a_response_format_file(folder, tmp_path, home):
    """A bare schema here; the OpenAI object shapes are read by the same function (unit tests)
    and by the batch command below."""
    schema = SCHEMAS["nested"]
    path = tmp_path / "format.json"
    path.write_text(json.dumps(schema))
    res = cli("generate", "-p", "A user?", "--response-format", str(path), *common(folder))
    assert res.exit_code == 0, res.output
    validate(res.stdout, schema)  # stdout is the answer alone, ready for a pipe


def test_generate_json_object_and_tools(folder, tmp_path, home):
    # Keys and values are free under json_object, so a noise model need not close the object
    # within -n; what it writes is still the start of one (unit tests: only objects complete).
    args = ["-m", str(folder), "-t", "0", "--max-reasoning-tokens", "0", "-n", "12", "--json"]
    res = cli("generate", "-p", "JSON please", "--json-object", *args)
    record = json.loads(res.stdout)
    assert record["final"].startswith("{")
    assert res.exit_code == (0 if record["finish_reason"] == "stop" else 1)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{k: v for k, v in t.items()} for t in TOOLS]))
    args = ["--tools", str(tools), "--tool-choice", "get_weather", "--json"]
    res = cli("generate", "-p", "Weather?", *args, *common(folder))
    assert res.exit_code == 0, res.output
    (call,) = json.loads(res.stdout)["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    validate(call["function"]["arguments"], WEATHER)


def test_generate_cut_off_answer_exits_1(folder, tmp_path, home):
    path = tmp_path / "format.json"
    path.write_text(json.dumps(SCHEMAS["nested"]))
    args = ["-m", str(folder), "-t", "0", "--max-reasoning-tokens", "0", "-n", "6"]
    res = cli("generate", "-p", "x", "--response-format", str(path), *args)
    assert res.exit_code == 1
    assert "cut off before its JSON closed" in res.stderr and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ({"type": "array", "uniqueItems": True}, [], "cannot be enforced: Unimplemented keys"),
        ("not json", [], "not valid JSON"),
        ({"type": "object"}, ["--json-object"], "give one of them"),
        ({"type": "object"}, ["--raw"], "--response-format"),
        ({"type": "json_schema", "json_schema": {"name": "x y", "schema": {}}}, [], ".name"),
    ],
)
def test_generate_bad_structured_options_exit_2(folder, tmp_path, home, content, extra, message):
    path = tmp_path / "format.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    res = cli("generate", "-p", "x", "--response-format", str(path), *extra, "-m", str(folder))
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.output


def test_generate_bad_tool_choice_exits_2(folder, home):
    res = cli("generate", "-p", "x", "--tool-choice", "required", "-m", str(folder))
    assert res.exit_code == 2 and "'required' needs at least one tool" in res.stderr


def test_batch_command_with_structured_lines(folder, tmp_path, home):
    lines = [
        {"id": "a", "prompt": "x", "response_format": response_format("pattern")},
        {"id": "b", "prompt": "y", "max_reasoning_tokens": 0},  # answer text is free
        {"id": "c", "prompt": "z", "response_format": {"type": "json_schema",
                                                       "json_schema": {"name": "n", "schema": {"not": {}}}}},
    ]  # fmt: skip
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    default = tmp_path / "default.json"
    default.write_text(json.dumps(response_format("enum")))  # an OpenAI object this time
    args = ["--response-format", str(default), *common(folder), "--date", DATE]
    res = cli("batch", str(inp), "-o", str(out), *args)
    assert res.exit_code == 1, res.output  # line c failed
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    validate(records["a"]["final"], SCHEMAS["pattern"])
    validate(records["b"]["final"], SCHEMAS["enum"])  # the command's default format
    assert "Unimplemented keys" in records["c"]["error"]
