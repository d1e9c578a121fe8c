"""The MCP pieces that need no server: the config file, the names the model sees, schema
`$ref`s, consent answers, round counting and how a tool result becomes text.

Expected values are written out by hand from the config formats LM Studio / Claude Desktop /
VS Code document and from the harmony function-name rule; results are built as real `mcp_types`
objects (the SDK's own models), not as stand-ins.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import mcp_types
import pytest

from gptoss_mlx.cli.mcp_client import result_text
from gptoss_mlx.cli.mcp_config import ServerSpec, load_mcp_config, parse_mcp_config
from gptoss_mlx.cli.mcp_names import McpTool, assign_names, inline_refs
from gptoss_mlx.cli.mcp_tools import DECLINED, Consent, tool_rounds
from gptoss_mlx.errors import UsageError
from gptoss_mlx.harmony.request import parse_chat_request

# --------------------------------------------------------------------------- config


def test_a_claude_desktop_style_config(tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "files": {
                        "command": "npx",
                        "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
                        "env": {"DEBUG": "1"},
                        "cwd": "work",
                    },
                    "remote": {"url": "https://example.com/mcp", "headers": {"X-Key": "k"}},
                    "old": {"url": "http://127.0.0.1:9/sse", "type": "sse", "timeout": 5},
                    "off": {"command": "x", "disabled": True},
                }
            }
        )
    )
    cfg = load_mcp_config(str(path))
    assert cfg.servers == (
        ServerSpec(
            "files",
            "stdio",
            command="npx",
            args=("-y", "@modelcontextprotocol/server-filesystem", "/tmp"),
            env={"DEBUG": "1"},
            cwd=str(tmp_path / "work"),  # relative to the config file
        ),
        ServerSpec("remote", "http", url="https://example.com/mcp", headers={"X-Key": "k"}),
        ServerSpec("old", "sse", url="http://127.0.0.1:9/sse", timeout=5),
    )
    assert cfg.ignored == ()


def test_vs_code_servers_key_and_transport_spellings():
    cfg = parse_mcp_config(
        {
            "servers": {
                "a": {"type": "stdio", "command": "a"},
                "b": {"type": "streamableHttp", "url": "http://h/mcp"},
                "c": {"transport": "streamable-http", "url": "http://h/mcp"},
                "d": {"type": "http", "url": "http://h/mcp"},
            }
        }
    )
    assert [s.kind for s in cfg.servers] == ["stdio", "http", "http", "http"]


def test_keys_of_other_apps_are_reported_not_honoured():
    cfg = parse_mcp_config(
        {"mcpServers": {"a": {"command": "a", "autoApprove": ["x"], "alwaysAllow": ["y"]}}}
    )
    assert cfg.ignored == ("mcpServers.a.autoApprove", "mcpServers.a.alwaysAllow")


@pytest.mark.parametrize(
    "obj,message",
    [
        ([], 'f.json: expected a JSON object {"mcpServers": {...}}'),
        ({"tools": []}, 'f.json: no "mcpServers" object'),
        ({"mcpServers": []}, "f.json: mcpServers: expected an object of servers by name"),
        ({"mcpServers": {}}, "f.json: mcpServers: no servers listed"),
        ({"mcpServers": {"a": "npx x"}}, "f.json: mcpServers.a: expected an object"),
        ({"mcpServers": {"a": {}}}, "f.json: mcpServers.a: needs command (a local server) or url"),
        (
            {"mcpServers": {"a": {"command": "x", "url": "http://h"}}},
            "f.json: mcpServers.a: has both command and url",
        ),
        (
            {"mcpServers": {"a": {"command": "x", "args": "-y"}}},
            "f.json: mcpServers.a.args: expected a list of strings",
        ),
        (
            {"mcpServers": {"a": {"command": "x", "env": {"N": 1}}}},
            "f.json: mcpServers.a.env: expected an object of strings",
        ),
        ({"mcpServers": {"a": {"command": ""}}}, "f.json: mcpServers.a.command: expected a non"),
        (
            {"mcpServers": {"a": {"url": "ftp://h"}}},
            "f.json: mcpServers.a.url: expected an http:// or https:// URL",
        ),
        (
            {"mcpServers": {"a": {"url": "http://h", "type": "websocket"}}},
            "f.json: mcpServers.a.type: unknown transport 'websocket'",
        ),
        (
            {"mcpServers": {"a": {"type": "sse", "command": "x"}}},
            "f.json: mcpServers.a: a sse server needs url",
        ),
        (
            {"mcpServers": {"a": {"url": "http://h", "args": []}}},
            "f.json: mcpServers.a.args: only for stdio servers",
        ),
        (
            {"mcpServers": {"a": {"command": "x", "headers": {}}}},
            "f.json: mcpServers.a.headers: only for HTTP servers",
        ),
        (
            {"mcpServers": {"a": {"command": "x", "timeout": 0}}},
            "f.json: mcpServers.a.timeout: expected a number of seconds above 0",
        ),
        (
            {"mcpServers": {"a": {"command": "x", "disabled": "yes"}}},
            "f.json: mcpServers.a.disabled: expected true or false",
        ),
    ],
)
def test_bad_configs_name_the_file_and_field(obj, message):
    with pytest.raises(UsageError) as e:
        parse_mcp_config(obj, "f.json")
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(UsageError, match=r"nope.json: not found \(--mcp expects"):
        load_mcp_config(str(tmp_path / "nope.json"))
    with pytest.raises(UsageError, match="is a folder"):
        load_mcp_config(str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text('{"mcpServers": {')
    with pytest.raises(UsageError, match=r"bad.json: not valid JSON \("):
        load_mcp_config(str(bad))


# --------------------------------------------------------------------------- names

HARMONY_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's function-name rule


def tools_of(*pairs):
    return [SimpleNamespace(server=s, name=n, description="", input_schema={}) for s, n in pairs]


def test_unique_names_are_kept_collisions_get_the_server_prefix():
    tools = tools_of(("alpha", "echo"), ("alpha", "add"), ("beta", "echo"), ("beta", "who"))
    assert [t.name for t in assign_names(tools)] == ["alpha_echo", "add", "beta_echo", "who"]


def test_names_avoid_the_tools_file_functions_and_each_other():
    # "alpha_echo" exists already on gamma, so alpha's renamed echo needs a suffix.
    tools = tools_of(("alpha", "echo"), ("beta", "echo"), ("gamma", "alpha_echo"), ("g", "add"))
    names = [t.name for t in assign_names(tools, reserved={"add"})]
    assert names == ["alpha_echo_2", "beta_echo", "alpha_echo", "g_add"]


def test_names_are_valid_harmony_function_names():
    tools = tools_of(
        ("my server", "files.read"), ("s", "x" * 100), ("s", "x" * 100), ("s", "ünï/cødé")
    )
    named = assign_names(tools)
    assert [t.name for t in named][0] == "files_read"
    assert all(HARMONY_NAME.fullmatch(t.name) for t in named), [t.name for t in named]
    assert len({t.name for t in named}) == 4
    # and the request parser, which renders them, accepts every one
    parse_chat_request(
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [t.function_tool() for t in named],
        }
    )


def test_refs_are_inlined_and_recursion_stops():
    schema = {
        "type": "object",
        "properties": {"p": {"$ref": "#/$defs/Point"}, "t": {"$ref": "#/$defs/Tree"}},
        "$defs": {
            "Point": {"type": "object", "properties": {"x": {"type": "number"}}},
            "Tree": {"type": "object", "properties": {"kids": {"items": {"$ref": "#/$defs/Tree"}}}},
        },
    }
    out = inline_refs(schema)
    assert out["properties"]["p"] == {"type": "object", "properties": {"x": {"type": "number"}}}
    assert "$defs" not in out and "$ref" not in json.dumps(out)
    depth, node = 0, out["properties"]["t"]
    while "properties" in node:
        node, depth = node["properties"]["kids"]["items"], depth + 1
    assert depth == 8  # eight levels of the recursive type, then `any`


# --------------------------------------------------------------------------- consent

TOOL = McpTool("echo", "alpha", "echo", "", {})


def asker(*answers):
    asked = []
    it = iter(answers)

    def ask(prompt):
        asked.append(prompt)
        return next(it)

    return ask, asked


def test_consent_yes_once_always_and_no():
    c = Consent(interactive=True)
    ask, asked = asker("y", "n", "maybe", "a")
    assert c.decide(TOOL, "{}", ask) is None  # y: this call
    assert c.decide(TOOL, "{}", ask) == DECLINED  # asked again: n
    assert c.decide(TOOL, "{}", ask) is None  # "maybe" is asked again, then a
    assert c.decide(TOOL, "{}", ask) is None  # always: not asked any more
    assert asked == ["run echo({}) on alpha? [y]es, [a]lways, [n]o: "] * 4


def test_consent_answers_stay_out_of_the_readline_history():
    readline = pytest.importorskip("readline", reason="no readline on this platform")
    readline.clear_history()
    readline.add_history("what is 2+2?")

    def typed(prompt):  # input() on a terminal adds each line it reads to the history
        readline.add_history("a")
        return "a"

    assert Consent(interactive=True).decide(TOOL, "{}", typed) is None
    n = readline.get_current_history_length()
    assert [readline.get_history_item(i) for i in range(1, n + 1)] == ["what is 2+2?"]
    readline.clear_history()


def test_consent_options_and_non_interactive_refusal():
    never = asker()[0]
    assert Consent({"echo"}).decide(TOOL, "{}", never) is None
    assert Consent(yes_all=True).decide(TOOL, "{}", never) is None
    refused = json.loads(Consent({"add"}).decide(TOOL, "{}", never))
    assert refused == {"error": "not allowed: this tool was not approved for this session"}


def test_tool_rounds_count_since_the_last_user_message():
    call = {"role": "assistant", "tool_calls": [{"id": "1"}]}
    msgs = [{"role": "user"}, call, {"role": "tool"}, {"role": "assistant", "content": "x"}]
    msgs += [{"role": "user"}, call, {"role": "tool"}, call, {"role": "tool"}]
    assert tool_rounds(msgs) == 2
    assert tool_rounds(msgs + [{"role": "user"}]) == 0


# --------------------------------------------------------------------------- results


def test_results_become_text():
    r = mcp_types.CallToolResult(
        content=[
            mcp_types.TextContent(type="text", text="line one"),
            mcp_types.ImageContent(type="image", data="AAAA", mime_type="image/png"),
            mcp_types.EmbeddedResource(
                type="resource",
                resource=mcp_types.TextResourceContents(uri="file:///a.txt", text="inside"),
            ),
        ],
    )
    out = result_text(r)
    assert out.text == "line one\n[image image/png: not shown, this model reads text only]\ninside"
    assert not out.is_error
    only_structured = mcp_types.CallToolResult(content=[], structured_content={"t": 21})
    assert result_text(only_structured).text == '{"t": 21}'
    failed = mcp_types.CallToolResult(content=[mcp_types.TextContent(text="no")], is_error=True)
    assert result_text(failed).is_error
