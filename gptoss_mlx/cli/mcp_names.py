"""The names and schemas the model sees for MCP tools.

A tool keeps its own name when it is unique and valid for harmony (OpenAI's function-name rule,
`[A-Za-z0-9_-]{1,64}`, which harmony/request.py enforces; other characters become `_`). Tools
whose names collide, across servers or with a `--tools` function, are all renamed `SERVER_TOOL`
(then `_2`, `_3`... if that still collides), so no server's tool shadows another's.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_INVALID = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class McpTool:
    """An MCP tool as the model sees it (`name`) and as its server knows it (`server`, `tool`)."""

    name: str
    server: str
    tool: str
    description: str
    parameters: dict[str, Any]

    def function_tool(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": inline_refs(self.parameters),
            },
        }


def _clean(name: str) -> str:
    return _INVALID.sub("_", name)[:64] or "_"


def assign_names(tools: Sequence[Any], reserved: set[str] = frozenset()) -> list[McpTool]:
    """Harmony-valid, unique names for `tools` (ServerTool-like: server, name, description,
    input_schema), avoiding `reserved` (the --tools functions). See the module docstring."""
    base = [_clean(t.name) for t in tools]
    counts = Counter(base)
    keep = [counts[b] == 1 and b not in reserved for b in base]
    taken = set(reserved) | {b for b, k in zip(base, keep, strict=True) if k}
    names = []
    for t, b, k in zip(tools, base, keep, strict=True):
        if k:
            names.append(b)
            continue
        want = _clean(f"{t.server}_{t.name}")
        name, n = want, 1
        while name in taken:
            n += 1
            name = f"{want[: 64 - len(str(n)) - 1]}_{n}"
        taken.add(name)
        names.append(name)
    return [
        McpTool(name, t.server, t.name, t.description, t.input_schema or {"type": "object"})
        for name, t in zip(names, tools, strict=True)
    ]


def inline_refs(schema: Any, defs: dict | None = None, depth: int = 0) -> Any:
    """The schema with local `$ref`s to `$defs` replaced by their targets (pydantic-made MCP
    schemas use them; the TypeScript rendering would show each as `any`). Recursive types stop
    at a depth of 8 references."""
    if isinstance(schema, list):
        return [inline_refs(s, defs, depth) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if defs is None:
        defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
        target = defs.get(ref.rsplit("/", 1)[1])
        if isinstance(target, dict) and depth < 8:
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return inline_refs({**target, **rest}, defs, depth + 1)
        return {k: v for k, v in schema.items() if k != "$ref"}  # unknown or too deep: any
    return {
        k: inline_refs(v, defs, depth)
        for k, v in schema.items()
        if k not in ("$defs", "definitions")
    }
