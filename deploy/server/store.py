"""Stored responses (/v1/responses with `store`): what `previous_response_id`, `GET` and `DELETE
/v1/responses/{id}` and background responses read.

Every Serve replica of the app opens the same store, so a chain of responses may continue on any of
them and survives a replica's restart: a SQLite file (the default; one file per node, shared by the
replicas on it) or Redis (`redis://host:port/db`: shared by every node, what a multi-node cluster
needs). A record is the response object and the input items it answered (the earlier turns' items
included), so that a next turn renders the whole conversation from the newest record alone. Records
live at most `ttl_s` seconds and at most `max_items` of them are kept (the oldest go first).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

OFF = "off"
MEMORY = "memory"  # this process only: tests, and servers that need no sharing


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object, as the API returns it
    context: list[dict[str, Any]]  # the input items it answered, earlier turns' included (Responses API form)

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def decode(text: str | bytes) -> StoredResponse:
        data = json.loads(text)
        return StoredResponse(data["response"], data["context"])


class ResponseStore(Protocol):
    def put(self, response_id: str, record: StoredResponse) -> None: ...

    def get(self, response_id: str) -> StoredResponse | None: ...

    def delete(self, response_id: str) -> bool: ...


def default_store_path() -> str:
    return str(Path.home() / ".cache" / "gptoss" / "responses.sqlite")


def open_store(where: str, ttl_s: float, max_items: int) -> ResponseStore | None:
    """`where`: "off" (None: nothing is stored), "memory", redis://..., or a SQLite file (a path, or
    sqlite:///path)."""
    if where == OFF:
        return None
    if where == MEMORY:
        return MemoryStore(ttl_s, max_items)
    if where.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(where, ttl_s, max_items)
    return SqliteStore(where.removeprefix("sqlite://"), ttl_s, max_items)


class MemoryStore:
    def __init__(self, ttl_s: float, max_items: int) -> None:
        self.ttl_s, self.max_items = ttl_s, max_items
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()  # id -> (created, encoded record)
        self._lock = threading.Lock()

    def put(self, response_id: str, record: StoredResponse) -> None:
        with self._lock:
            created = self._items[response_id][0] if response_id in self._items else time.time()
            self._items[response_id] = (created, record.encode())
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            found = self._items.get(response_id)
        if found is None or found[0] < time.time() - self.ttl_s:
            return None
        return StoredResponse.decode(found[1])

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._items.pop(response_id, None) is not None


class SqliteStore:
    """One file, safe for several processes (WAL, a busy timeout); a connection per call, so any thread
    may use it."""

    def __init__(self, path: str, ttl_s: float, max_items: int) -> None:
        self.path, self.ttl_s, self.max_items = os.path.expanduser(path), ttl_s, max_items
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created REAL NOT NULL, "
                       "body TEXT NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS responses_created ON responses (created)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def put(self, response_id: str, record: StoredResponse) -> None:
        now = time.time()
        with self._connect() as db:
            db.execute("INSERT INTO responses (id, created, body) VALUES (?, ?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET body = excluded.body", (response_id, now, record.encode()))
            db.execute("DELETE FROM responses WHERE created < ?", (now - self.ttl_s,))
            db.execute("DELETE FROM responses WHERE id NOT IN (SELECT id FROM responses ORDER BY created DESC "
                       "LIMIT ?)", (self.max_items,))

    def get(self, response_id: str) -> StoredResponse | None:
        with self._connect() as db:
            row = db.execute("SELECT body FROM responses WHERE id = ? AND created >= ?",
                             (response_id, time.time() - self.ttl_s)).fetchone()
        return StoredResponse.decode(row[0]) if row else None

    def delete(self, response_id: str) -> bool:
        with self._connect() as db:
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0


class RedisStore:
    """A key per record with the TTL, and a sorted set of ids by creation time that bounds their number."""

    PREFIX = "gptoss:response:"
    INDEX = "gptoss:responses"

    def __init__(self, url: str, ttl_s: float, max_items: int) -> None:
        import redis  # only when a Redis store is asked for

        self.ttl_s, self.max_items = ttl_s, max_items
        self._db = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
        self._db.ping()  # a store that cannot be reached fails the server's start, not its first request

    def put(self, response_id: str, record: StoredResponse) -> None:
        key = self.PREFIX + response_id
        pipe = self._db.pipeline()
        pipe.set(key, record.encode(), px=max(1, int(self.ttl_s * 1000)))
        pipe.zadd(self.INDEX, {response_id: time.time()}, nx=True)
        pipe.zremrangebyscore(self.INDEX, "-inf", time.time() - self.ttl_s)
        pipe.zcard(self.INDEX)
        count = pipe.execute()[-1]
        if count > self.max_items:
            old = [m.decode() for m, _ in self._db.zpopmin(self.INDEX, count - self.max_items)]
            if old:
                self._db.delete(*(self.PREFIX + i for i in old))

    def get(self, response_id: str) -> StoredResponse | None:
        body = self._db.get(self.PREFIX + response_id)
        return StoredResponse.decode(body) if body is not None else None

    def delete(self, response_id: str) -> bool:
        pipe = self._db.pipeline()
        pipe.delete(self.PREFIX + response_id)
        pipe.zrem(self.INDEX, response_id)
        return bool(pipe.execute()[0])
