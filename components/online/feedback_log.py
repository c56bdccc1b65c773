"""The durable feedback log (no Ray): what serving writes and retraining reads.

``GroupCommitLog`` batches events from concurrent requests and writes them as one Parquet shard
under ``feedback/dt=YYYY-MM-DD/``: a write starts as soon as the previous one ends (or after an
optional linger), with at most ``max_events`` events per shard; each caller's ``append`` returns
only once its events are stored (a failed write fails every caller in that group, so nothing is
acknowledged that is not stored). ``list_feedback_shards``/``read_feedback`` read the log back
(retraining, rebuilding live state); ``RecentIds`` drops a client's retried batch.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from components import layout
from components.data.schemas import EVENT_SCHEMA, FEEDBACK_SCHEMA
from components.storage import Storage

log = logging.getLogger(__name__)

FEEDBACK_PREFIX = layout.FEEDBACK


def shard_path(received_ms: int, prefix: str = FEEDBACK_PREFIX) -> str:
    day = time.strftime("%Y-%m-%d", time.gmtime(received_ms / 1000))
    return f"{prefix}/dt={day}/part-{received_ms:013d}-{uuid.uuid4().hex[:8]}.parquet"


def events_table(rows: Sequence[Dict[str, Any]]) -> pa.Table:
    """Validated event dicts (ts in epoch ms) -> a table in the stored event schema."""
    cols = {
        "user_id": [r["user_id"] for r in rows],
        "item_id": [r["item_id"] for r in rows],
        "ts": pa.array([int(r["ts"]) for r in rows], pa.int64()).cast(EVENT_SCHEMA.field("ts").type),
        "event": [r.get("event") or "click" for r in rows],
        "value": [r.get("value") for r in rows],
        "session_id": [r.get("session_id") for r in rows],
        "context": [json.dumps(r["context"], sort_keys=True) if r.get("context") is not None else None for r in rows],
        "event_id": [r.get("event_id") for r in rows],
    }
    return pa.table(cols, schema=FEEDBACK_SCHEMA)


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


@dataclass
class _Group:
    rows: List[Dict[str, Any]]
    futures: List[asyncio.Future]


class GroupCommitLog:
    """Group commit of events to object storage (see module doc). Use from one event loop.

    One write is in flight at a time; events that arrive meanwhile form the next shard (at most
    ``max_events`` per shard). Under light load an event is written at once; under heavy load
    shards grow instead of writes queueing up. ``linger_s`` > 0 waits that long before a write
    to gather more events (fewer, larger objects on S3, at that cost in latency).
    """

    def __init__(self, storage: Storage, linger_s: float = 0.0, max_events: int = 1024,
                 prefix: str = FEEDBACK_PREFIX):
        if linger_s < 0 or max_events <= 0:
            raise ValueError("feedback linger must be >= 0 and max_events positive")
        self.storage = storage
        self.linger_s = linger_s
        self.max_events = max_events
        self.prefix = prefix
        self._queue: List[_Group] = []
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self.shards_written = 0
        self.events_written = 0
        self.write_failures = 0
        self.last_write_s = 0.0
        self._writing = False

    async def append(self, rows: List[Dict[str, Any]]) -> str:
        """Queue ``rows`` and wait until they are stored; returns the shard path."""
        if not rows:
            raise ValueError("no events to store")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._flusher())
        fut = loop.create_future()
        self._queue.append(_Group(list(rows), [fut]))
        self._wake.set()
        return await fut

    def _take(self) -> _Group:
        """The queued requests up to ``max_events`` events (a request is never split)."""
        group = _Group([], [])
        while self._queue and (not group.rows or len(group.rows) + len(self._queue[0].rows) <= self.max_events):
            g = self._queue.pop(0)
            group.rows.extend(g.rows)
            group.futures.extend(g.futures)
        return group

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.linger_s > 0:
                await asyncio.sleep(self.linger_s)
            while self._queue:
                await self._commit(self._take())

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Wait until everything queued before this call is stored (or has failed)."""
        deadline = time.monotonic() + timeout_s
        while self._queue or self._writing:
            if time.monotonic() > deadline:
                raise TimeoutError("feedback log did not drain")
            await asyncio.sleep(0.005)

    async def _commit(self, group: _Group) -> None:
        path = shard_path(int(time.time() * 1000), self.prefix)
        t0 = time.perf_counter()
        self._writing = True
        try:
            data = table_bytes(events_table(group.rows))
            await asyncio.to_thread(self.storage.write_bytes_atomic, path, data)
        except Exception as exc:  # storage down, disk full: fail every caller of the group
            self.write_failures += 1
            log.error("feedback write of %d events to %s failed: %s", len(group.rows), path, exc)
            for f in group.futures:
                if not f.done():
                    f.set_exception(RuntimeError(f"feedback storage unavailable: {exc}"))
            return
        finally:
            self._writing = False
        self.last_write_s = time.perf_counter() - t0
        self.shards_written += 1
        self.events_written += len(group.rows)
        for f in group.futures:
            if not f.done():
                f.set_result(path)

    async def close(self) -> None:
        """Flush what is queued (used on shutdown)."""
        while self._queue:
            await self._commit(self._take())
        if self._task is not None:
            self._task.cancel()


def list_feedback_shards(storage: Storage, after: str = "", prefix: str = FEEDBACK_PREFIX) -> List[str]:
    """Feedback shards sorted by name (= by write time); only those named after ``after``."""
    files = storage.list_files(prefix, (".parquet",))
    return [f for f in files if shard_key(f) > after] if after else files


def shard_key(path: str) -> str:
    """Sort key of a shard: its file name (``part-<ms>-<rand>``), comparable across days."""
    return path.rsplit("/", 1)[-1]


def read_feedback(storage: Storage, shards: Iterable[str], event_ids: bool = False) -> pa.Table:
    """The events of ``shards`` (user_id, item_id, ts, event[, event_id]), in shard order, each
    event once: a row whose ``event_id`` was seen in an earlier row is a client's retry and is
    dropped."""
    tables = []
    for f in shards:
        try:
            t = storage.read_parquet(f)
        except Exception as exc:  # an unreadable shard must not stop serving; it is reported
            log.error("skipping unreadable feedback shard %s: %s", f, exc)
            continue
        if "event_id" not in t.column_names:  # shards written before event ids existed
            t = t.append_column("event_id", pa.nulls(t.num_rows, pa.string()))
        tables.append(t.select(list(FEEDBACK_COLUMNS)))
    if not tables:
        empty = {"user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string()),
                 "ts": pa.array([], EVENT_SCHEMA.field("ts").type), "event": pa.array([], pa.string())}
        return pa.table({**empty, **({"event_id": pa.array([], pa.string())} if event_ids else {})})
    table = drop_retried(pa.concat_tables(tables, promote_options="default"))
    return table if event_ids else table.drop_columns(["event_id"])


FEEDBACK_COLUMNS = ("user_id", "item_id", "ts", "event", "event_id")


def drop_retried(table: pa.Table) -> pa.Table:
    """Keep the first row of every non-null ``event_id`` (rows without one are all kept)."""
    ids = table["event_id"]
    if ids.null_count == table.num_rows:
        return table
    seen, keep = set(), []
    for i in ids.to_pylist():
        keep.append(i is None or i not in seen)
        if i is not None:
            seen.add(i)
    return table.filter(pa.array(keep))


class RecentIds:
    """The last ``cap`` event ids acknowledged, to count a client's retry once in live state."""

    def __init__(self, cap: int = 100_000):
        self.cap = cap
        self._ids: "OrderedDict[str, None]" = OrderedDict()

    def seen(self, event_id: str) -> bool:
        """True if ``event_id`` was seen before; remembers it either way."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return True
        self._ids[event_id] = None
        if len(self._ids) > self.cap:
            self._ids.popitem(last=False)
        return False


