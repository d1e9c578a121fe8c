"""The `--mcp FILE` config: the `{"mcpServers": {...}}` file that LM Studio, Claude Desktop,
Cursor and most agent apps share, read into plain `ServerSpec`s.

Each entry is a stdio server (`command`, `args`, `env`, `cwd`) or an HTTP one (`url`, `headers`;
Streamable HTTP unless `"type": "sse"`). `disabled: true` skips an entry and `timeout` (seconds)
overrides `--tool-timeout` for that server. Keys other apps define for themselves (`autoApprove`,
`alwaysAllow`, ...) are reported as ignored rather than honoured: approvals come from this
command line only. VS Code's `{"servers": {...}}` spelling is accepted too.

Every problem is a UsageError naming the file and the field, e.g.
`mcp.json: mcpServers.files.args: expected a list of strings`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

# The spellings apps use for the transport; a missing `type` is stdio with `command`, else HTTP.
TRANSPORTS = {
    "stdio": "stdio",
    "http": "http",
    "streamable-http": "http",
    "streamable_http": "http",
    "streamableHttp": "http",
    "sse": "sse",
}
KNOWN_KEYS = {"command", "args", "env", "cwd", "url", "headers", "type", "transport"}
KNOWN_KEYS |= {"timeout", "disabled"}


@dataclass(frozen=True)
class ServerSpec:
    """One MCP server to start: `kind` is "stdio", "http" (Streamable HTTP) or "sse"."""

    name: str
    kind: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None  # seconds; None: the command line's --tool-timeout

    def describe(self) -> str:
        """What to show the user: the command line or the URL."""
        if self.kind == "stdio":
            return " ".join([self.command or "", *self.args])
        return f"{self.url} ({'SSE' if self.kind == 'sse' else 'Streamable HTTP'})"


@dataclass(frozen=True)
class McpConfig:
    """The servers to start, and one line per config key this program does not use."""

    path: str
    servers: tuple[ServerSpec, ...]
    ignored: tuple[str, ...] = ()


def load_mcp_config(path: str) -> McpConfig:
    """Read and validate an MCP config file; raises UsageError naming the file and field."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: not found (--mcp expects a JSON file with mcpServers)") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder (--mcp expects a JSON file)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise UsageError(f"{path}: JSON nested too deeply") from None
    return parse_mcp_config(obj, path)


def parse_mcp_config(obj: Any, path: str = "mcp config") -> McpConfig:
    """Validate a decoded config object (see the module docstring for the accepted shape)."""
    if not isinstance(obj, dict):
        raise UsageError(f'{path}: expected a JSON object {{"mcpServers": {{...}}}}')
    key = "mcpServers" if "mcpServers" in obj or "servers" not in obj else "servers"
    servers = obj.get(key)
    if servers is None:
        raise UsageError(f'{path}: no "mcpServers" object (expected {{"mcpServers": {{...}}}})')
    if not isinstance(servers, dict):
        raise UsageError(f"{path}: {key}: expected an object of servers by name")
    if not servers:
        raise UsageError(f"{path}: {key}: no servers listed")
    base = Path(path).expanduser().parent
    specs, ignored = [], []
    for name, entry in servers.items():
        where = f"{path}: {key}.{name}"
        if not name.strip():
            raise UsageError(f"{path}: {key}: a server needs a non-empty name")
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected an object with command or url")
        ignored += [f"{key}.{name}.{k}" for k in entry if k not in KNOWN_KEYS]
        disabled = entry.get("disabled", False)
        if not isinstance(disabled, bool):
            raise UsageError(f"{where}.disabled: expected true or false")
        if not disabled:
            specs.append(_server(name, entry, where, base))
    return McpConfig(path, tuple(specs), tuple(ignored))


def _server(name: str, entry: dict, where: str, base: Path) -> ServerSpec:
    kind_key = "type" if "type" in entry else "transport"
    kind_raw = entry.get(kind_key)
    if kind_raw is not None and kind_raw not in TRANSPORTS:
        raise UsageError(
            f"{where}.{kind_key}: unknown transport {kind_raw!r} (expected stdio, http or sse)"
        )
    has_command, has_url = "command" in entry, "url" in entry
    if has_command and has_url:
        raise UsageError(f"{where}: has both command and url; a server is one or the other")
    if not has_command and not has_url:
        raise UsageError(f"{where}: needs command (a local server) or url (a remote one)")
    kind = TRANSPORTS[kind_raw] if kind_raw is not None else ("stdio" if has_command else "http")
    if (kind == "stdio") != has_command:
        needs = "command" if kind == "stdio" else "url"
        raise UsageError(f"{where}: a {kind_raw} server needs {needs}")
    timeout = entry.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise UsageError(f"{where}.timeout: expected a number of seconds above 0")
    if kind == "stdio":
        for key in ("url", "headers"):
            if key in entry:
                raise UsageError(f"{where}.{key}: only for HTTP servers (this one has command)")
        command = _string(entry["command"], f"{where}.command")
        cwd = entry.get("cwd")
        if cwd is not None:
            cwd = str(base / Path(_string(cwd, f"{where}.cwd")).expanduser())
        return ServerSpec(
            name,
            "stdio",
            command=command,
            args=tuple(_strings(entry.get("args", []), f"{where}.args")),
            env=_string_map(entry.get("env", {}), f"{where}.env"),
            cwd=cwd,
            timeout=timeout,
        )
    for key in ("args", "env", "cwd"):
        if key in entry:
            raise UsageError(f"{where}.{key}: only for stdio servers (this one has url)")
    url = _string(entry["url"], f"{where}.url")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{where}.url: expected an http:// or https:// URL, got {url!r}")
    headers = _string_map(entry.get("headers", {}), f"{where}.headers")
    return ServerSpec(name, kind, url=url, headers=headers, timeout=timeout)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: expected a non-empty string")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: expected a list of strings")
    return value


def _string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise UsageError(f'{where}: expected an object of strings, e.g. {{"KEY": "value"}}')
    return dict(value)
