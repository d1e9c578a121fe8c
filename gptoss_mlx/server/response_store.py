"""Stored responses: what `store: true` keeps for GET /v1/responses/{id} and for a later
request's `previous_response_id`.

An in-memory LRU bounded by entries and by (approximate JSON) bytes: the oldest response goes
first. A response that has been evicted, deleted, or never stored is unknown, and a request that
names it gets a 404, never a silent fresh start. Lost on restart, like every KV cache here;
clients that must survive restarts send their whole history (`store: false`, as Codex does).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoredResponse:
    """`response`: the response object as returned. `messages`: the conversation it closes, in
    the chat shape harmony/request.py takes (its input history, then its own output), without
    the request's `instructions` (OpenAI does not carry those over to the next response)."""

    response: dict[str, Any]
    messages: list[dict[str, Any]]
    size: int


class ResponseStore:
    def __init__(self, max_entries: int = 1024, max_bytes: int = 256 * 1024 * 1024):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # routes run on one loop; tests may read from others

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        size = len(json.dumps(response)) + len(json.dumps(messages))
        entry = StoredResponse(response, messages, size)
        with self._lock:
            old = self._items.pop(response["id"], None)
            if old is not None:
                self._bytes -= old.size
            self._items[response["id"]] = entry
            self._bytes += size
            while self._items and (
                len(self._items) > self.max_entries or self._bytes > self.max_bytes
            ):
                _, gone = self._items.popitem(last=False)
                self._bytes -= gone.size

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            entry = self._items.get(response_id)
            if entry is not None:
                self._items.move_to_end(response_id)
            return entry

    def delete(self, response_id: str) -> bool:
        with self._lock:
            entry = self._items.pop(response_id, None)
            if entry is not None:
                self._bytes -= entry.size
            return entry is not None

    def __len__(self) -> int:
        return len(self._items)
