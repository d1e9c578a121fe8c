"""Function tools as harmony's TypeScript-like `namespace functions { ... }` block.

gpt-oss was trained on tool schemas rendered this way by openai-harmony, quirks included (the
indentation of nested objects, an object's description repeated inside its type, `anyOf` shown as
`any`, integer enums shown as `number`). We reproduce that output character for character, since
the model is most reliable on exactly what it saw; tests compare against openai-harmony.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from .request import FunctionTool


def rust_lines(text: str) -> list[str]:
    """Split like Rust's `str::lines`: on "\\n", dropping one trailing "\\r" and a final empty line."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def render_functions_namespace(tools: Sequence[FunctionTool]) -> str:
    """The `## functions` section (without the `# Tools` title) for the developer message."""
    parts = ["## functions\n", "namespace functions {\n"]
    for tool in tools:
        parts.extend(f"// {line}" for line in rust_lines(tool.description))
        if tool.parameters is None:
            parts.append(f"type {tool.name} = () => any;\n")
        else:
            parts.append(
                f"type {tool.name} = (_: {schema_to_typescript(tool.parameters)}) => any;\n"
            )
    parts.append("} // namespace functions")
    return "\n".join(parts)


def _json_value(value: Any) -> str:
    """JSON text the way serde_json prints a value: compact, UTF-8, shortest float form."""
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        if "e" not in text:
            return text
        # Python writes 1e+16 / 1.5e-07 / 1e-05; serde_json (ryu) 1e16 / 1.5e-7 / 0.00001.
        mantissa, exponent = text.split("e")
        if int(exponent) == -5:  # ryu only switches to exponents below 1e-5
            sign, digits = ("-", mantissa[1:]) if mantissa.startswith("-") else ("", mantissa)
            return f"{sign}0.0000{digits.replace('.', '')}"
        return f"{mantissa}e{int(exponent)}"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _get(schema: Any, key: str) -> Any:
    return schema.get(key) if isinstance(schema, dict) else None


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and bool(values)


def _has(schema: Any, key: str) -> bool:
    return isinstance(schema, dict) and key in schema


def _default_text(schema: Any, enum_as_json: bool = False) -> str | None:
    """ "default: ..." for a schema with one: strings quoted, enum values bare, JSON otherwise.

    harmony prints an enum's string default as JSON only for the variants of a top-level oneOf.
    """
    if not _has(schema, "default"):
        return None
    default = schema["default"]
    if isinstance(default, str) and not _is_enum(schema):
        return f'default: "{default}"'
    if isinstance(default, str) and not enum_as_json:
        return f"default: {default}"
    return f"default: {_json_value(default)}"


def _with_nullable(schema: Any, type_text: str) -> str:
    if _get(schema, "nullable") is True and "null" not in type_text:
        return f"{type_text} | null"
    return type_text


def _string_of(schema: Any, key: str) -> str | None:
    value = _get(schema, key)
    return value if isinstance(value, str) else None


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """One JSON schema as a TypeScript type, in openai-harmony's layout."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | " + _with_nullable(
                variant, schema_to_typescript(variant, indent + "   ")
            )
            comments = [
                _string_of(variant, "description"),
                _default_text(variant, enum_as_json=True),
            ]
            comments = [c for c in comments if c is not None]
            if comments:
                out += " // " + " ".join(comments)
        return out
    kind = _get(schema, "type")
    if isinstance(kind, list):
        names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
        if names:
            return " | ".join(names)
        kind = None
    if not isinstance(kind, str):
        return "any"
    if kind == "object":
        return _object_to_typescript(schema, indent)
    if kind == "string":
        values = _get(schema, "enum")
        names = [f'"{v}"' for v in values if isinstance(v, str)] if isinstance(values, list) else []
        return " | ".join(names) if names else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        items = schema.get("items")
        return f"{schema_to_typescript(items, indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _object_to_typescript(schema: dict, indent: str) -> str:
    out = ""
    description = _string_of(schema, "description")
    if description is not None:
        out += f"{indent}// {description}\n"
    out += "{\n"
    props = schema.get("properties")
    if isinstance(props, dict):
        required = schema.get("required")
        required = (
            {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
        )
        for key, prop in props.items():
            mark = "" if key in required else "?"
            out += _property_comments(prop, indent)
            if isinstance(_get(prop, "oneOf"), list):
                out += _one_of_property(key, mark, prop, indent)
                continue
            type_text = _with_nullable(prop, schema_to_typescript(prop, indent + "    "))
            out += f"{indent}{key}{mark}: {type_text},"
            if not _has(prop, "oneOf") and _default_text(prop):
                out += f" // {_default_text(prop)}"
            out += "\n"
    return out + f"{indent}}}"


def _property_comments(prop: Any, indent: str) -> str:
    """Title, description (unless oneOf renders its own) and examples, as comment lines."""
    out = ""
    title = _string_of(prop, "title")
    if title is not None:
        out += f"{indent}// {title}\n{indent}//\n"
    description = _string_of(prop, "description")
    if description is not None and not _has(prop, "oneOf"):
        out += f"{indent}// {description}\n"
    examples = _get(prop, "examples")
    if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
    return out


def _one_of_property(key: str, mark: str, prop: dict, indent: str) -> str:
    """A property whose schema is a oneOf: one `| variant` line each, comments deduplicated."""
    variants = prop["oneOf"]
    description = _string_of(prop, "description")
    first_description = _string_of(variants[0], "description") if variants else None
    described_above = description is not None and description != first_description
    out = f"{indent}// {description}\n" if described_above else ""
    if _default_text(prop):
        out += f"{indent}// {_default_text(prop)}\n"
    out += f"{indent}{key}{mark}:\n"
    for i, variant in enumerate(variants):
        out += f"{indent} | " + _with_nullable(
            variant, schema_to_typescript(variant, indent + "   ")
        )
        comments = []
        variant_description = _string_of(variant, "description")
        if not (i == 0 and described_above) and variant_description is not None:
            if variant_description != description:
                comments.append(variant_description)
        if _default_text(variant):
            comments.append(_default_text(variant))
        if comments:
            out += " // " + " ".join(comments)
        out += "\n"
    return out + f"{indent},\n"
