"""Structured-output requests: `response_format`, `tool_choice`, and the `# Response Formats` text.

OpenAI's request shapes, parsed into plain dataclasses (every problem is a UsageError naming the
field):
  Chat Completions  {"type": "json_schema", "json_schema": {"name", "description"?, "schema",
                     "strict"?}} | {"type": "json_object"} | {"type": "text"}
  Responses API     text.format: the same, with name/description/schema/strict flat in it
  tool_choice       "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
                    (Chat Completions) | {"type": "function", "name"} (Responses)

The prompt side is harmony's (docs/format.md, "Structured output"): the schema goes at the end of
the developer message as

    # Response Formats

    ## {name}

    // {description}
    {schema}

openai-harmony has no way to render it, so `render_response_formats` writes the documented text
itself. The prompt only asks; the grammar (engine/constraints) is what guarantees the answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

# OpenAI's rule for response format names (the same as for function names).
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_CHOICES = ("auto", "none", "required")
# The Responses API's flat text.format keys, next to "type".
_FLAT_KEYS = ("name", "description", "schema", "strict")


@dataclass(frozen=True)
class ResponseFormat:
    """What the final answer must be: JSON matching `schema` ("json_schema") or any JSON object
    ("json_object"). `strict` is kept as sent; the schema is enforced either way."""

    type: str  # "json_schema" | "json_object"
    schema: dict[str, Any] | None = None
    name: str = "response"
    description: str | None = None
    strict: bool | None = None

    @property
    def json_schema(self) -> dict[str, Any]:
        """The schema the answer is held to (any object for json_object)."""
        return self.schema if self.schema is not None else {"type": "object"}

    def to_openai(self) -> dict[str, Any]:
        """This format as a Chat Completions `response_format` object."""
        if self.type == "json_object":
            return {"type": "json_object"}
        spec: dict[str, Any] = {"name": self.name, "schema": self.schema}
        if self.description is not None:
            spec["description"] = self.description
        if self.strict is not None:
            spec["strict"] = self.strict
        return {"type": "json_schema", "json_schema": spec}


@dataclass(frozen=True)
class ToolChoice:
    """Which tools the model may or must call: mode "auto" (its choice), "none" (no call),
    "required" (at least a call, no final answer) or "function" (exactly the tool `name`)."""

    mode: str = "auto"
    name: str | None = None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_response_format(obj: Any, where: str = "response_format") -> ResponseFormat | None:
    """An OpenAI response format (Chat Completions' nested or the Responses API's flat shape);
    None for {"type": "text"} or a missing one (no constraint on the answer)."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected an object with a 'type', got {_kind(obj)}")
    kind = obj.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind != "json_schema":
        raise UsageError(
            f"{where}.type: expected 'json_schema', 'json_object' or 'text', got {kind!r}"
        )
    if "json_schema" in obj:  # Chat Completions
        spec, at = obj["json_schema"], f"{where}.json_schema"
        if not isinstance(spec, dict):
            raise UsageError(f"{at}: expected an object with name and schema, got {_kind(spec)}")
    else:  # the Responses API's text.format
        spec, at = {k: obj[k] for k in _FLAT_KEYS if k in obj}, where
    name = spec.get("name", "response")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"{at}.name: expected 1-64 characters of a-z, A-Z, 0-9, _ or -")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise UsageError(f"{at}.description: expected a string, got {_kind(description)}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise UsageError(f"{at}.strict: expected true or false, got {_kind(strict)}")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise UsageError(f"{at}.schema: expected a JSON schema object, got {_kind(schema)}")
    return ResponseFormat("json_schema", schema, name, description, strict)


def response_format_from_file(obj: Any, source: str) -> ResponseFormat:
    """What `--response-format FILE` holds: an OpenAI response format object (either shape), or
    a bare JSON schema (named after its "title", else "response")."""
    if isinstance(obj, dict) and obj.get("type") in ("json_schema", "json_object", "text"):
        if obj["type"] == "json_schema" or "json_schema" in obj or "schema" in obj:
            fmt = parse_response_format(obj, source)
            if fmt is not None:
                return fmt
        elif obj["type"] == "json_object" and len(obj) == 1:
            return ResponseFormat("json_object")
        elif obj["type"] == "text" and len(obj) == 1:
            raise UsageError(f'{source}: {{"type": "text"}} asks for no format; drop the option')
    if not isinstance(obj, dict):
        raise UsageError(f"{source}: expected a JSON schema object, got {_kind(obj)}")
    title = obj.get("title")
    name = title if isinstance(title, str) and _NAME.fullmatch(title) else "response"
    return ResponseFormat("json_schema", obj, name)


def parse_tool_choice(obj: Any, tool_names: list[str], where: str = "tool_choice") -> ToolChoice:
    """An OpenAI tool_choice, checked against the declared tools."""
    if obj is None:
        return ToolChoice()
    if isinstance(obj, str):
        if obj not in TOOL_CHOICES:
            raise UsageError(
                f"{where}: expected 'auto', 'none', 'required' or a function, got {obj!r}"
            )
        if obj == "required" and not tool_names:
            raise UsageError(f"{where}: 'required' needs at least one tool in 'tools'")
        return ToolChoice(obj)
    if not isinstance(obj, dict) or obj.get("type") != "function":
        raise UsageError(f'{where}: expected a string or {{"type": "function", ...}}')
    fn = obj.get("function")
    name = fn.get("name") if isinstance(fn, dict) else obj.get("name")
    if not isinstance(name, str):
        raise UsageError(f"{where}: a function choice needs the function's name")
    if name not in tool_names:
        known = ", ".join(tool_names) or "none declared"
        raise UsageError(f"{where}: no tool named {name!r} in 'tools' ({known})")
    return ToolChoice("function", name)


def render_response_formats(fmt: ResponseFormat | None) -> str | None:
    """The `# Response Formats` section of the developer message (None: nothing to render).

    Only a json_schema format has a schema to show; json_object is asked for in the messages
    themselves, as OpenAI requires. The schema is written as compact JSON, like the example in
    harmony's docs/format.md."""
    if fmt is None or fmt.type != "json_schema":
        return None
    lines = ["# Response Formats", "", f"## {fmt.name}", ""]
    if fmt.description:
        lines += [f"// {line}" for line in fmt.description.splitlines()]
    schema = json.dumps(fmt.schema, ensure_ascii=False, separators=(",", ":"))
    return "\n".join([*lines, schema])
