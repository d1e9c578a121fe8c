"""The structured-output grammar, its errors, the request fields and the `# Response Formats` text,
without a model: harmony turns written out token by token are fed to llguidance matchers built
from the grammar (over the byte-level synthetic vocabulary with the real harmony ids, so these
run everywhere), and masks are checked against llguidance's own numpy implementation.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from llguidance.numpy import apply_token_bitmask_inplace, fill_next_token_bitmask

from gptoss_mlx.convert.synthetic import write_byte_level_tokenizer_json
from gptoss_mlx.engine.constraints import (
    ConstraintError,
    GrammarSpec,
    allocate_masks,
    apply_masks,
    check_schema,
    compile_grammar,
    fill_masks,
)
from gptoss_mlx.errors import UsageError
from gptoss_mlx.harmony.render import render_text
from gptoss_mlx.harmony.request import FunctionTool, parse_chat_request
from gptoss_mlx.harmony.response_format import (
    ResponseFormat,
    ToolChoice,
    parse_response_format,
    parse_tool_choice,
    response_format_from_file,
)
from gptoss_mlx.harmony.tokenizer import load_tokenizer

VOCAB = 201088
POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "tag": {"enum": ["a", "b"]}},
    "required": ["x", "tag"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = (
    FunctionTool("get_weather", "Weather.", WEATHER, strict=True),
    FunctionTool("get_time", "Time.", None, strict=True),
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bytes")
    write_byte_level_tokenizer_json(folder / "tokenizer.json")
    return load_tokenizer(folder)


def ids(tok, *parts: str) -> list[int]:
    """Harmony as the model writes it: `<|name|>` parts are control tokens, others text."""
    out: list[int] = []
    for p in parts:
        out += [tok.special(p)] if p.startswith("<|") and p.endswith("|>") else tok.encode(p)
    return out


def grammar(tok, **spec):
    g = compile_grammar(GrammarSpec(**spec), tok, VOCAB)
    assert g is not None
    return g


def accepts(g, tokens: list[int]) -> bool:
    """Whether the grammar takes every token and is complete after the last."""
    c = g.constraint()
    try:
        for t in tokens:
            c.advance(t)
    except ConstraintError:
        return False
    return c.done


def allowed(c, vocab: int = VOCAB) -> set[int]:
    mask = allocate_masks(1, vocab)
    fill_next_token_bitmask(c.matcher, mask)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
    return set(np.nonzero(bits)[0].tolist())


def final(body: str, *header: str) -> tuple[str, ...]:
    return ("<|channel|>", "final", *header, "<|message|>", body, "<|return|>")


ANALYSIS = ("<|channel|>", "analysis", "<|message|>", "Think <|end|> hard.", "<|end|>")
NEXT = ("<|start|>", "assistant")
FMT = ResponseFormat("json_schema", POINT, "point")


# --------------------------------------------------------------------------- the answer


@pytest.mark.parametrize(
    "header", [(), (" ", "<|constrain|>", "json"), ("<|constrain|>", "json")], ids=str
)
def test_final_header_with_or_without_constrain_json(tok, header):
    g = grammar(tok, response_format=FMT)
    assert accepts(g, ids(tok, *final('{"x":-3,"tag":"b"}', *header)))
    assert accepts(g, ids(tok, *ANALYSIS, *NEXT, *ANALYSIS, *NEXT, *final('{"x":1,"tag":"a"}')))


@pytest.mark.parametrize(
    "turn",
    [
        ('{"x":1,"tag":"a"}', "<|return|>"),  # no header at all
        (*ANALYSIS, *NEXT, "<|message|>", '{"x":1,"tag":"a"}', "<|return|>"),  # channel skipped
        (*ANALYSIS, "<|channel|>", "final", "<|message|>", "{}"),  # <|start|>assistant skipped
        final('{"x":1,"tag":"a"}', " ", "<|constrain|>", "xml"),  # another content type
        final('{ "x":1,"tag":"a"}'),  # free whitespace (compact JSON only)
        final('{"x":1,"tag":"c"}'),  # not in the enum
        final('{"x":1}'),  # a required key missing
        final('{"x":1,"tag":"a","y":2}'),  # additionalProperties: false
        ("<|channel|>", "final", "<|message|>", '{"x":1,"tag":"a"}', "<|call|>"),  # wrong stop
        ("<|channel|>", "final", "<|message|>", '{"x":1,"tag":"a"}', "<|end|>"),
        (
            "<|channel|>",
            "commentary",
            "<|message|>",
            "Let me see.",
            "<|end|>",
        ),  # no tools: no preamble
    ],
)
def test_the_answer_cannot_escape_the_grammar(tok, turn):
    assert not accepts(grammar(tok, response_format=FMT), ids(tok, *turn))


def test_json_object_takes_any_object_but_nothing_else(tok):
    g = grammar(tok, response_format=ResponseFormat("json_object"))
    assert accepts(g, ids(tok, *final('{"any":[1,{"k":null}]}')))
    assert not accepts(g, ids(tok, *final("[1,2]")))
    assert not accepts(g, ids(tok, *final("Sure! {}")))


def test_a_schema_s_own_x_guidance_wins_over_compact_whitespace(tok):
    loose = {**POINT, "x-guidance": {"whitespace_flexible": True}}
    g = grammar(tok, response_format=ResponseFormat("json_schema", loose))
    assert accepts(g, ids(tok, *final('{ "x": 1, "tag": "a" }')))


# --------------------------------------------------------------------------- tool calls


def call_role(name: str, args: str, *constrain: str) -> tuple[str, ...]:
    """The recipient in the role header (openai-harmony's rendering)."""
    to = f" to=functions.{name}"
    return (to, "<|channel|>", "commentary", *constrain, "<|message|>", args, "<|call|>")


def call_channel(name: str, args: str, *constrain: str) -> tuple[str, ...]:
    """The recipient in the channel header (harmony's docs/format.md example)."""
    head = ("<|channel|>", f"commentary to=functions.{name}", *constrain, "<|message|>")
    return (*head, args, "<|call|>")


@pytest.mark.parametrize("placement", [call_role, call_channel])
@pytest.mark.parametrize(
    "constrain", [(), (" ", "<|constrain|>", "json"), ("<|constrain|>", "json")]
)
def test_tool_calls_in_both_recipient_placements(tok, placement, constrain):
    g = grammar(tok, tools=TOOLS)
    assert accepts(g, ids(tok, *placement("get_weather", '{"city":"Paris","days":2}', *constrain)))
    assert accepts(g, ids(tok, *ANALYSIS, *NEXT, *placement("get_time", "{}", *constrain)))
    # After a preamble, as the model writes before calling.
    preamble = ("<|channel|>", "commentary", "<|message|>", "Checking.", "<|end|>", *NEXT)
    assert accepts(g, ids(tok, *preamble, *placement("get_time", "{}", *constrain)))


@pytest.mark.parametrize(
    "turn",
    [
        call_role("get_weather", '{"days":2}'),  # a required argument missing
        call_role("get_weather", '{"city":"Paris","days":0}'),  # below its minimum
        call_role("get_time", '{"x":1}'),  # an arguments-less tool takes {}
        call_role("get_wether", '{"city":"Paris"}'),  # not a declared function
        ("<|channel|>", "commentary to=browser.search", "<|message|>", '{"city":"x"}', "<|call|>"),
        (" to=python", "<|channel|>", "analysis", "<|message|>", "print(1)", "<|call|>"),
        (" to=functions.get_time", "<|channel|>", "commentary", "<|message|>", "{}", "<|return|>"),
    ],
)
def test_tool_calls_are_held_to_declared_functions_and_their_parameters(tok, turn):
    assert not accepts(grammar(tok, tools=TOOLS), ids(tok, *turn))


def test_tool_choice_none_required_and_named(tok):
    weather = call_role("get_weather", '{"city":"Oslo"}')
    time_ = call_channel("get_time", "{}")
    answer = final("It is sunny.")
    none = grammar(tok, tools=TOOLS, tool_choice=ToolChoice("none"))
    assert accepts(none, ids(tok, *answer)) and not accepts(none, ids(tok, *weather))
    required = grammar(tok, tools=TOOLS, tool_choice=ToolChoice("required"))
    assert not accepts(required, ids(tok, *answer))
    assert accepts(required, ids(tok, *weather)) and accepts(required, ids(tok, *time_))
    named = grammar(tok, tools=TOOLS, tool_choice=ToolChoice("function", "get_time"))
    assert accepts(named, ids(tok, *time_))
    assert not accepts(named, ids(tok, *weather)) and not accepts(named, ids(tok, *answer))


def test_only_strict_tools_are_held_to_their_schema_unless_strict_tools(tok):
    loose = (FunctionTool("get_weather", "", WEATHER),)
    bad_args = ids(tok, *call_role("get_weather", "city=Paris"))
    # A response format alone brings the grammar; a tool that is not strict keeps free arguments.
    g = grammar(tok, tools=loose, response_format=FMT)
    assert accepts(g, bad_args)
    assert not accepts(g, ids(tok, *call_role("get_time", "{}")))  # but only declared names
    assert not accepts(grammar(tok, tools=loose, strict_tools=True), bad_args)
    # Free text answer when only the tools are constrained.
    assert accepts(grammar(tok, tools=loose, strict_tools=True), ids(tok, *final("Hi <|x|>")))


def test_nothing_to_constrain_means_no_grammar(tok):
    assert compile_grammar(GrammarSpec(), tok, VOCAB) is None
    assert compile_grammar(GrammarSpec(tools=(FunctionTool("f"),)), tok, VOCAB) is None
    needed = GrammarSpec(tools=(FunctionTool("f"),), tool_choice=ToolChoice("none"))
    assert compile_grammar(needed, tok, VOCAB) is not None


# --------------------------------------------------------------------------- reasoning budget


@pytest.mark.parametrize("budget", [1, 3, 8])
def test_reasoning_budget_closes_the_analysis_after_n_tokens(tok, budget):
    g = grammar(tok, response_format=FMT, max_reasoning_tokens=budget)
    c = g.constraint()
    for t in ids(tok, "<|channel|>", "analysis", "<|message|>"):
        c.advance(t)
    text = tok.encode("long thoughts that would go on and on")
    for t in text[:budget]:
        assert tok.end in allowed(c) and t in allowed(c)
        c.advance(t)
    assert allowed(c) == {tok.end}  # N tokens written: only <|end|> is left
    for t in ids(tok, "<|end|>", *NEXT):
        c.advance(t)
    assert allowed(c) == {tok.channel}
    for t in ids(tok, *final('{"x":0,"tag":"a"}')):
        c.advance(t)
    assert c.done
    # One analysis message only: a second one is refused, so the budget is a bound.
    again = (*ANALYSIS[:3], "ok", "<|end|>", *NEXT, *ANALYSIS[:3])
    assert not accepts(g, ids(tok, *again, "x", "<|end|>", *NEXT, *final('{"x":0,"tag":"a"}')))


def test_reasoning_budget_zero_answers_at_once(tok):
    g = grammar(tok, response_format=FMT, max_reasoning_tokens=0)
    c = g.constraint()
    assert allowed(c) == {tok.channel}
    c.advance(tok.channel)
    assert not accepts(g, ids(tok, *ANALYSIS, *NEXT, *final('{"x":0,"tag":"a"}')))
    assert accepts(g, ids(tok, *final('{"x":0,"tag":"a"}')))


def test_a_budget_alone_constrains_the_turn_and_leaves_the_answer_free(tok):
    g = grammar(tok, max_reasoning_tokens=2)
    assert accepts(g, ids(tok, "<|channel|>", "analysis", "<|message|>", "ab", "<|end|>", *NEXT,
                          *final("Anything, even {")))  # fmt: skip


# --------------------------------------------------------------------------- errors


UNSUPPORTED = [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if"),
    ({"type": "array", "contains": {"type": "string"}}, "contains"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ({"type": "string", "format": "colour"}, "Unknown format: colour"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum (5) is greater than maximum (2)"),
    ({"$ref": "https://example.com/s.json"}, "https://example.com/s.json"),
    ({"type": "bogus"}, "Invalid type: bogus"),
]


@pytest.mark.parametrize(("schema", "feature"), UNSUPPORTED, ids=[u[1] for u in UNSUPPORTED])
def test_a_schema_llguidance_cannot_enforce_is_refused_naming_the_feature(tok, schema, feature):
    fmt = ResponseFormat("json_schema", schema)
    with pytest.raises(UsageError, match="response_format.schema: cannot be enforced") as e:
        compile_grammar(GrammarSpec(response_format=fmt), tok, VOCAB)
    message = str(e.value)
    assert feature in message and "\n" not in message
    with pytest.raises(UsageError, match=r"^f\.json: cannot be enforced"):
        check_schema(schema, "f.json")  # the CLI's check, before any model or vocabulary loads


def test_a_strict_tool_s_schema_is_checked_and_named(tok):
    tools = (FunctionTool("ok", "", WEATHER, strict=True), FunctionTool("bad", "", {"not": {}}))
    assert compile_grammar(GrammarSpec(tools=tools), tok, VOCAB) is not None  # bad is not strict
    with pytest.raises(UsageError, match=r"tools\[1\]\.function\.parameters \(bad\).*not"):
        compile_grammar(GrammarSpec(tools=tools, strict_tools=True), tok, VOCAB)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec(max_reasoning_tokens=-1), "max_reasoning_tokens: expected an integer >= 0"),
        (GrammarSpec(tool_choice=ToolChoice("required")), "required needs a tool"),
        (GrammarSpec(tools=TOOLS, tool_choice=ToolChoice("function", "x")), "the tool 'x'"),
    ],
)
def test_specs_that_allow_no_answer_are_refused(tok, spec, message):
    with pytest.raises(UsageError, match=message):
        compile_grammar(spec, tok, VOCAB)


# --------------------------------------------------------------------------- request fields


def test_response_format_shapes():
    nested = {"type": "json_schema", "json_schema": {"name": "p", "schema": POINT, "strict": True}}
    flat = {"type": "json_schema", "name": "p", "schema": POINT, "strict": True}
    expected = ResponseFormat("json_schema", POINT, "p", None, True)
    assert parse_response_format(nested) == parse_response_format(flat) == expected
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}).json_schema == {"type": "object"}
    assert parse_response_format(expected.to_openai()) == expected
    request = parse_chat_request({"messages": [{"role": "user", "content": "x"}],
                                  "response_format": nested})  # fmt: skip
    assert request.response_format == expected and "response_format" not in request.extra


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("json", "response_format: expected an object"),
        ({"type": "xml"}, "response_format.type: expected 'json_schema'"),
        ({"type": "json_schema"}, r"response_format.schema: expected a JSON schema object"),
        ({"type": "json_schema", "json_schema": []}, "response_format.json_schema: expected"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, r"\.name"),
        ({"type": "json_schema", "schema": {}, "strict": "yes"}, r"response_format\.strict"),
        ({"type": "json_schema", "schema": {}, "description": 3}, r"\.description"),
    ],
)
def test_bad_response_formats_name_the_field(value, message):
    with pytest.raises(UsageError, match=message):
        parse_chat_request(
            {"messages": [{"role": "user", "content": "x"}], "response_format": value}
        )


def test_response_format_files_take_an_openai_object_or_a_bare_schema():
    assert response_format_from_file({**POINT, "title": "point"}, "f") == ResponseFormat(
        "json_schema", {**POINT, "title": "point"}, "point"
    )
    assert response_format_from_file(POINT, "f").name == "response"
    assert response_format_from_file({"type": "json_object"}, "f").type == "json_object"
    flat = {"type": "json_schema", "name": "p", "schema": POINT}
    assert response_format_from_file(flat, "f") == ResponseFormat("json_schema", POINT, "p")
    with pytest.raises(UsageError, match="asks for no format"):
        response_format_from_file({"type": "text"}, "f")
    with pytest.raises(UsageError, match="f: expected a JSON schema object, got list"):
        response_format_from_file([POINT], "f")


def test_tool_choice_shapes_and_errors():
    names = ["get_weather", "get_time"]
    assert parse_tool_choice(None, names) == ToolChoice("auto")
    assert parse_tool_choice("none", names) == ToolChoice("none")
    chat = {"type": "function", "function": {"name": "get_time"}}
    responses = {"type": "function", "name": "get_time"}
    assert parse_tool_choice(chat, names) == parse_tool_choice(responses, names)
    assert parse_tool_choice(chat, names) == ToolChoice("function", "get_time")
    for value, message in [
        ("any", "expected 'auto', 'none', 'required' or a function"),
        ({"type": "function", "function": {"name": "nope"}}, "no tool named 'nope'"),
        ({"type": "web_search"}, "expected a string or"),
        ({"type": "function"}, "needs the function's name"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_tool_choice(value, names)
    with pytest.raises(UsageError, match="'required' needs at least one tool"):
        parse_tool_choice("required", [])


def test_strict_is_read_from_function_tools():
    tool = {"type": "function", "function": {"name": "f", "parameters": WEATHER, "strict": True}}
    request = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "tools": [tool]})
    assert request.tools[0].strict
    tool["function"]["strict"] = "true"
    with pytest.raises(UsageError, match=r"tools\[0\]\.function\.strict: expected true or false"):
        parse_chat_request({"messages": [{"role": "user", "content": "x"}], "tools": [tool]})


# --------------------------------------------------------------------------- # Response Formats

SHOPPING = {
    "properties": {
        "items": {"type": "array", "description": "entries on the shopping list",
                  "items": {"type": "string"}},
    },
    "type": "object",
}  # fmt: skip


def test_response_formats_close_the_developer_message_as_harmony_documents_it():
    """harmony's docs/format.md ("Structured output"): at the end of the developer message,
    `# Response Formats`, `## {format name}`, `// {description or context}`, `{schema}`; the
    doc's example schema is compact JSON."""
    request = parse_chat_request(
        {
            "messages": [
                {"role": "developer", "content": "You are a helpful shopping assistant"},
                {"role": "user", "content": "I need to buy coffee, soda and eggs"},
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "shopping_list",
                    "description": "The items to buy",
                    "schema": SHOPPING,
                },
            },
        }
    )
    schema = (
        '{"properties":{"items":{"type":"array","description":"entries on the shopping list",'
        '"items":{"type":"string"}}},"type":"object"}'
    )
    documented = (
        "<|start|>developer<|message|># Instructions\n\nYou are a helpful shopping assistant\n\n"
        "# Response Formats\n\n## shopping_list\n\n// The items to buy\n" + schema + "<|end|>"
        "<|start|>user<|message|>I need to buy coffee, soda and eggs<|end|><|start|>assistant"
    )
    assert render_text(request, date="2025-06-28").endswith(documented)


def test_response_formats_after_the_tools_and_without_instructions():
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "integer"}}}
    tool = {"type": "function", "function": {"name": "f"}}
    base = {"messages": [{"role": "user", "content": "x"}], "response_format": fmt}
    text = render_text(parse_chat_request(base), date="2025-06-28")
    assert (
        "<|start|>developer<|message|># Response Formats\n\n## p\n\n" + '{"type":"integer"}<|end|>'
        in text
    )
    with_tools = render_text(parse_chat_request({**base, "tools": [tool]}), date="2025-06-28")
    assert "} // namespace functions\n\n# Response Formats\n\n## p\n\n{" in with_tools
    # json_object has no schema to show: the messages ask for JSON, as OpenAI requires.
    plain = render_text(parse_chat_request({**base, "response_format": {"type": "json_object"}}))
    assert "Response Formats" not in plain and "<|start|>developer" not in plain


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("vocab", [1001, 4096])
def test_apply_masks_equals_llguidance_numpy(vocab):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    mask = rng.integers(-(2**31), 2**31, (3, (vocab + 31) // 32), dtype=np.int64)
    mask = mask.astype(np.int32)
    expected = logits.copy()
    apply_token_bitmask_inplace(expected, mask)
    got = np.array(apply_masks(mx.array(logits), mask))
    assert np.array_equal(got, expected)


def test_fill_masks_in_parallel_equals_one_by_one(tok):
    g = grammar(tok, response_format=FMT, tools=TOOLS)
    states = [(), ("<|channel|>",), ("<|channel|>", "final", "<|message|>", '{"x":1')]
    constraints = []
    for prefix in states:
        c = g.constraint()
        for t in ids(tok, *prefix):
            c.advance(t)
        constraints.append(c)
    together = allocate_masks(4, VOCAB)
    fill_masks([(c, i) for i, c in enumerate(constraints)], together)
    for i, c in enumerate(constraints):
        alone = allocate_masks(1, VOCAB)
        c.fill(alone, 0)
        assert np.array_equal(together[i], alone[0])
    assert (together[3] == -1).all()  # a row with no constraint keeps everything allowed


def test_a_complete_or_closed_constraint(tok):
    g = grammar(tok, response_format=FMT)
    c = g.constraint()
    for t in ids(tok, *final('{"x":1,"tag":"a"}')):
        assert not c.done
        c.advance(t)
    assert c.done and not c.failed
    mask = allocate_masks(1, VOCAB)
    mask[0] = 0
    fill_masks([(c, 0)], mask)
    assert (mask == -1).all()  # its row ends this step: nothing to mask
    c.close()
    assert c.closed
    with pytest.raises(ConstraintError, match="closed"):
        c.advance(1)
    with pytest.raises(ConstraintError, match="left the grammar"):
        g.constraint().advance(tok.encode("x")[0])


def test_a_grammar_with_several_json_bodies_compiles(tok):
    """Each %json sits behind its own header, which llguidance's Earley parser tells apart."""
    g = grammar(tok, response_format=FMT, tools=TOOLS, tool_choice=ToolChoice("auto"))
    assert g.lark.count("%json") == 3
    assert json.loads(g.lark.split("%json ", 1)[1].split("\n")[0])["x-guidance"] == {
        "whitespace_flexible": False
    }
