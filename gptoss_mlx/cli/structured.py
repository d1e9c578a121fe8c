"""Structured-output options shared by `generate` and `batch`: --response-format, --json-object,
--tool-choice, --max-reasoning-tokens, --strict-tools.

Everything here is checked before the model loads (files, shapes, and whether llguidance can
enforce each schema, which needs no vocabulary), so a bad schema costs no model load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import click

from ..errors import UsageError

# Why --strict-tools is off by default, in one line for --help (the README says more).
STRICT_TOOLS_HELP = (
    "Hold every tool call's arguments to its parameters schema. [default: only tools that set "
    '"strict": true, as OpenAI does; tool schemas llguidance cannot enforce then stay usable]'
)


def structured_options(fn):
    """The options, added to a click command (their values arrive in **opts)."""
    opts = [
        click.option(
            "--response-format",
            "response_format_file",
            type=click.Path(dir_okay=False),
            default=None,
            metavar="FILE",
            help="JSON file: an OpenAI response_format object or a bare JSON schema. The final "
            "answer is guaranteed to be JSON matching it (a grammar constrains decoding).",
        ),
        click.option(
            "--json-object",
            is_flag=True,
            help="The final answer is guaranteed to be a JSON object (any keys).",
        ),
        click.option(
            "--tool-choice",
            default=None,
            metavar="auto|none|required|NAME",
            help="With --tools: let the model choose (auto), forbid calls (none), require a "
            "call (required), or require the function NAME.",
        ),
        click.option(
            "--max-reasoning-tokens",
            type=click.IntRange(min=0),
            default=None,
            metavar="N",
            help="Close the reasoning after N tokens and answer (0: answer at once).",
        ),
        click.option("--strict-tools", is_flag=True, help=STRICT_TOOLS_HELP),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@dataclass
class StructuredSettings:
    """The options, validated: `response_format` and `tool_choice` in OpenAI's request shape."""

    response_format: dict[str, Any] | None = None
    tool_choice: Any = None
    max_reasoning_tokens: int | None = None
    strict_tools: bool = False

    def session_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ChatSession."""
        return {
            "response_format": self.response_format,
            "tool_choice": self.tool_choice,
            "max_reasoning_tokens": self.max_reasoning_tokens,
            "strict_tools": self.strict_tools,
        }


def structured_from_options(opts: dict[str, Any], *, raw: bool = False) -> StructuredSettings:
    """Pop the options from a command's **opts and check them (UsageError naming the option).
    `raw`: generate --raw, a plain completion without harmony, which none of them applies to."""
    from ..engine.constraints import check_schema
    from ..harmony.response_format import response_format_from_file

    path = opts.pop("response_format_file", None)
    json_object = opts.pop("json_object", False)
    choice = opts.pop("tool_choice", None)
    settings = StructuredSettings(
        max_reasoning_tokens=opts.pop("max_reasoning_tokens", None),
        strict_tools=opts.pop("strict_tools", False),
    )
    given = {
        "--response-format": path is not None,
        "--json-object": json_object,
        "--tool-choice": choice is not None,
        "--max-reasoning-tokens": settings.max_reasoning_tokens is not None,
        "--strict-tools": settings.strict_tools,
    }
    named = [flag for flag, on in given.items() if on]
    if raw and named:
        one = len(named) == 1
        raise UsageError(
            f"--raw completes plain text without harmony: {', '.join(named)} "
            f"{'does' if one else 'do'} not apply to it; drop {'it' if one else 'them'} or drop --raw"
        )
    if path is not None and json_object:
        raise UsageError("--response-format and --json-object: give one of them")
    if json_object:
        settings.response_format = {"type": "json_object"}
    elif path is not None:
        fmt = response_format_from_file(_read_json(path), path)
        check_schema(fmt.json_schema, path)
        settings.response_format = fmt.to_openai()
    if choice is not None:
        named = choice not in ("auto", "none", "required")
        settings.tool_choice = (
            {"type": "function", "function": {"name": choice}} if named else choice
        )
    return settings


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
