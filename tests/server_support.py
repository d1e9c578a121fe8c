"""Helpers for the server tests (imported like `conftest`): a live uvicorn server on a free local
port, and a tiny real model whose greedy output follows scripts.

`ScriptedModel` wraps a real (tiny, random) GptOss and goes through the real scheduler, batch
caches and prompt store like any model; only its logits are overridden where a script applies.
Its caches carry one extra layer that records each row's token ids, so that whatever the batch
does (merging, filtering, restoring a cached prefix) every row can read back its own history:
the script is the one whose trigger (a token sequence, e.g. a user message's text) appears last
in that history, and the next token is the script's entry at the number of tokens generated since
the first `<|start|>assistant` after the trigger. Rows with no trigger keep the random model's
logits. A script entry `NAN` makes that row's logits NaN (the engine must fail it alone).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import socket
import threading
import time
from collections.abc import Iterator

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

NAN = -1  # a script entry: NaN logits at that step


class ScriptedModel:
    def __init__(self, inner, tokenizer, scripts: dict[str, list[int]] | None = None):
        self.inner = inner
        self.config = inner.config
        self.tokenizer = tokenizer
        self.gen_prompt = [tokenizer.start, *tokenizer.encode("assistant")]
        self.scripts: list[tuple[list[int], list[int]]] = []
        self.prompts: list[list[int]] = []  # every prompt prefilled, whole (cached part included)
        for trigger, script in (scripts or {}).items():
            self.add(trigger, script)

    def add(self, trigger: str, script: list[int]) -> None:
        self.scripts.append((self.tokenizer.encode(trigger), list(script)))

    # -- the GptOss interface the engine uses

    @property
    def layers(self):
        return self.inner.layers

    @property
    def layer_types(self):
        return self.inner.layer_types

    def make_cache(self) -> list:
        return [*self.inner.make_cache(), KVCache()]

    def hidden(self, tokens: mx.array, cache=None) -> mx.array:
        if cache is not None:
            self._record(tokens, cache[-1])
            cache = cache[:-1]
        return self.inner.hidden(tokens, cache)

    def __call__(self, tokens: mx.array, cache=None, last_only: bool = False) -> mx.array:
        if cache is None:
            return self.inner(tokens, last_only=last_only)
        history = self._record(tokens, cache[-1])
        if last_only:
            self.prompts += history
        logits = self.inner(tokens, cache[:-1], last_only=last_only)
        targets = [self._next(row) for row in history]
        if all(t is None for t in targets):
            return logits
        V = logits.shape[-1]
        rows = []
        for b, t in enumerate(targets):
            row = logits[b, -1]
            if t == NAN:
                row = mx.full((V,), float("nan"), dtype=logits.dtype)
            elif t is not None:
                row = mx.where(mx.arange(V) == t, 100.0, -100.0).astype(logits.dtype)
            rows.append(row)
        last = mx.stack(rows)[:, None, :]
        return mx.concatenate([logits[:, :-1], last], axis=1) if logits.shape[1] > 1 else last

    # -- scripts

    @staticmethod
    def _record(tokens: mx.array, ids_cache) -> list[list[int]]:
        k = (tokens.astype(mx.float32) + 1)[:, None, :, None]  # (B, 1, T, 1); 0 is padding
        keys, _ = ids_cache.update_and_fetch(k, k)
        arr = np.array(keys[:, 0, :, 0]).astype(np.int64)
        return [[int(v) - 1 for v in row if v > 0] for row in arr]

    def _next(self, history: list[int]) -> int | None:
        best = None
        for trigger, script in self.scripts:
            at = _rfind(history, trigger)
            if at is not None and (best is None or at > best[0]):
                best = (at, script)
        if best is None:
            return None
        at, script = best
        g = _find(history, self.gen_prompt, at)
        if g is None:
            return None
        k = len(history) - (g + len(self.gen_prompt))
        return script[k] if 0 <= k < len(script) else None


def _find(seq: list[int], sub: list[int], start: int = 0) -> int | None:
    n = len(sub)
    for i in range(start, len(seq) - n + 1):
        if seq[i : i + n] == sub:
            return i
    return None


def _rfind(seq: list[int], sub: list[int]) -> int | None:
    n = len(sub)
    for i in range(len(seq) - n, -1, -1):
        if seq[i : i + n] == sub:
            return i
    return None


# ---------------------------------------------------------------------------- oracle


def harmony_prompt(hx, messages, effort="medium", tools=(), instructions=None):
    """openai-harmony's rendering (the independent oracle) of a conversation for completion.

    `messages`: (kind, text, extra) with kind user / analysis / commentary / final / call (extra:
    the function name) / tool (extra: the function name); `tools` in the Chat Completions shape."""
    system = hx.SystemContent.new().with_conversation_start_date(_dt.date.today().isoformat())
    system = system.with_reasoning_effort(getattr(hx.ReasoningEffort, effort.upper()))
    msgs = [hx.Message.from_role_and_content(hx.Role.SYSTEM, system)]
    if tools or instructions:
        dev = hx.DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools(
                [
                    hx.ToolDescription.new(
                        t["function"]["name"],
                        t["function"].get("description", ""),
                        t["function"].get("parameters"),
                    )
                    for t in tools
                ]
            )
        msgs.append(hx.Message.from_role_and_content(hx.Role.DEVELOPER, dev))
    for role, text, extra in messages:
        if role == "user":
            msgs.append(hx.Message.from_role_and_content(hx.Role.USER, text))
        elif role in ("analysis", "final", "commentary"):
            m = hx.Message.from_role_and_content(hx.Role.ASSISTANT, text).with_channel(role)
            msgs.append(m)
        elif role == "call":
            m = hx.Message.from_role_and_content(hx.Role.ASSISTANT, text)
            m = m.with_channel("commentary").with_recipient(f"functions.{extra}")
            msgs.append(m.with_content_type("<|constrain|>json"))
        elif role == "tool":
            author = hx.Author.new(hx.Role.TOOL, f"functions.{extra}")
            m = hx.Message.from_author_and_content(author, text)
            msgs.append(m.with_recipient("assistant").with_channel("commentary"))
    enc = hx.load_harmony_encoding(hx.HarmonyEncodingName.HARMONY_GPT_OSS)
    config = hx.RenderConversationConfig(auto_drop_analysis=False)
    return enc.render_conversation_for_completion(
        hx.Conversation.from_messages(msgs), hx.Role.ASSISTANT, config
    )


def last_prompt_with(model, tok, text: str) -> list[int]:
    needle = tok.encode(text)
    for prompt in reversed(model.prompts):
        if any(prompt[i : i + len(needle)] == needle for i in range(len(prompt))):
            return prompt
    raise AssertionError(f"no prompt contained {text!r}")


# ---------------------------------------------------------------------------- live server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1 on a free port in a thread; yield its base URL
    (`http://127.0.0.1:PORT`); always shut it down."""
    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


@contextlib.contextmanager
def serving(model, tokenizer, *, max_context: int = 1024, app_kwargs=None, **kw) -> Iterator[tuple]:
    """A started Scheduler over `model` and a live server around it: yields (base_url, state)."""
    from gptoss_mlx.engine.scheduler import Scheduler
    from gptoss_mlx.server.app import create_app
    from gptoss_mlx.server.state import ServerState

    api_key = kw.pop("api_key", None)
    model_id = kw.pop("model_id", "gpt-oss-20b")
    strict_tools = kw.pop("strict_tools", False)
    scheduler = Scheduler(model, tokenizer, max_context=max_context, **kw)
    state = ServerState(
        scheduler=scheduler,
        tokenizer=tokenizer,
        model_id=model_id,
        max_context=max_context,
        vocab_size=model.config.vocab_size,
        api_key=api_key,
        strict_tools=strict_tools,
    )
    scheduler.start()
    try:
        with live_server(create_app(state, **(app_kwargs or {}))) as url:
            yield url, state
    finally:
        scheduler.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ---------------------------------------------------------------------------- raw HTTP
# The standard library's http.client, for what the openai client hides (status lines, headers,
# raw SSE lines) and for clients that leave mid-answer.


def _conn(base: str, timeout: float):
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(base)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def request(
    base: str,
    method: str,
    path: str,
    body: bytes | dict | None = None,
    headers: dict | None = None,
    timeout: float = 60,
):
    """(status, headers dict (lower-case names), body parsed as JSON when it is JSON)."""
    conn = _conn(base, timeout)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        out_headers = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return resp.status, out_headers, parsed


@contextlib.contextmanager
def sse_stream(base: str, path: str, body: dict, headers: dict | None = None, timeout=60):
    """Open a streamed POST; yield an iterator of its SSE lines (without line ends); closing the
    block closes the connection (a client that leaves)."""
    conn = _conn(base, timeout)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=hdrs)
        resp = conn.getresponse()
        assert resp.status == 200, (resp.status, resp.read())
        assert resp.getheader("content-type", "").startswith("text/event-stream")

        def lines():
            while True:
                line = resp.readline()
                if not line:
                    return
                yield line.decode("utf-8").rstrip("\r\n")

        yield lines()
    finally:
        conn.close()


def sse_payloads(base: str, path: str, body: dict, headers: dict | None = None) -> list:
    """Every `data:` payload of a stream, JSON-decoded ("[DONE]" kept as a string), after
    checking each non-data line is an `event:` line or blank."""
    out = []
    with sse_stream(base, path, body, headers) as lines:
        for line in lines:
            if line.startswith("data: "):
                payload = line[6:]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
            else:
                assert line == "" or line.startswith("event: "), f"unexpected SSE line {line!r}"
    return out
