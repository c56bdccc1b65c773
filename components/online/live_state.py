"""Live per-user state (no Ray: the EventStore deployment wraps it).

``SessionState`` keeps each user's recent events (item ids, so it survives a vocabulary change
between model versions) and can be rebuilt from the dataset plus the feedback log. Its
``LiveCovisitation`` counts the item pairs that live events add, so the co-visitation channel
learns from feedback between retrains (a new item becomes a neighbour of what its first users
had just seen). ``user_shard`` names the holder of a user when the state is sharded.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import tempfile
import threading
import weakref
import zlib
from collections import OrderedDict, deque
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc

from components.data.schemas import EVENT_CODE
from components.models.channels.covisit import LiveCovisitation

log = logging.getLogger(__name__)

Entry = Tuple[str, int, int]  # (item_id, event code, ts ms)


def user_shard(user_id: str, shards: int) -> int:
    """The live-state shard that owns ``user_id`` (the id as stored: a pseudonym when users are
    pseudonymized). crc32, not ``hash()``: every process and restart must agree."""
    return zlib.crc32(user_id.encode()) % shards if shards > 1 else 0


def shard_rows(table: pa.Table, shard: int, shards: int) -> pa.Table:
    """The rows of ``table`` whose ``user_id`` belongs to ``shard`` (all of them with one shard)."""
    if shards <= 1 or table.num_rows == 0:
        return table
    users = table["user_id"].cast(pa.string())
    unique = pc.unique(users)
    mine = pa.array([user_shard(u, shards) == shard for u in unique.to_pylist()])
    return table.filter(pc.take(mine, pc.index_in(users, value_set=unique)))


class SessionState:
    """Recent events per user, newest last, at most ``max_len`` each. Thread-safe.

    At most ``max_users`` users are held in memory (least recently used first out); the others
    are spilled to a SQLite file on the replica's local disk and read back, in full, on their next
    event or request. That file holds at most ``spill_users_max`` users: beyond it the least
    recently spilled are dropped (counted in ``dropped``), so memory and disk stay bounded however
    many users the log has. A dropped user's events are not lost: the durable feedback log stays
    the source of truth, and the state (file included) is rebuilt from it and the dataset.
    ``covisit``: the live co-visitation counter (default: one counting every item).
    """

    def __init__(self, max_len: int = 200, max_users: int = 100_000, spill_dir: Optional[str] = None,
                 spill_users_max: int = 1_000_000, covisit: Optional[LiveCovisitation] = None):
        self.max_len = max_len
        self.max_users = max_users
        self.spill_users_max = spill_users_max
        self.covisit = covisit if covisit is not None else LiveCovisitation()
        self._users: "OrderedDict[str, Deque[Entry]]" = OrderedDict()
        self._lock = threading.Lock()
        self._spill: Optional[sqlite3.Connection] = None
        self._spill_dir = spill_dir
        self._spill_rows = 0  # users in the spill file now
        self.spilled = 0  # users written out so far
        self.reloaded = 0  # users read back
        self.dropped = 0  # spilled users dropped for room

    def __len__(self) -> int:
        with self._lock:
            return len(self._users) + self._spill_rows

    def add_catalog(self, item_ids: Iterable[str]) -> None:
        """Items the live co-visits may count from now on (``LiveCovisitation.add_catalog``)."""
        with self._lock:
            self.covisit.add_catalog(item_ids)

    def unknown(self, item_ids: Iterable[str]) -> List[str]:
        """The ids among ``item_ids`` outside the live co-visits' catalog, sorted (none without one)."""
        cat = self.covisit.catalog
        return [] if cat is None else sorted({i for i in item_ids if i not in cat})

    # -- spill (callers hold the lock) -----------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._spill is None:
            d = tempfile.mkdtemp(prefix="live-state-", dir=self._spill_dir)
            self._spill = sqlite3.connect(f"{d}/users.sqlite", check_same_thread=False, isolation_level=None)
            self._spill.execute("PRAGMA journal_mode=OFF")
            self._spill.execute("PRAGMA synchronous=OFF")  # a cache: the feedback log is durable
            self._spill.execute("CREATE TABLE users (user_id TEXT PRIMARY KEY, entries TEXT NOT NULL)")
            # The file goes with the state (a rebuilt state starts a new one): no file per restart left behind.
            weakref.finalize(self, _remove_spill, self._spill, d)
        return self._spill

    def _evict(self) -> None:
        if len(self._users) <= self.max_users:
            return
        out = []
        while len(self._users) > self.max_users:
            u, d = self._users.popitem(last=False)
            out.append((u, json.dumps(list(d))))
        db = self._db()
        db.executemany("INSERT OR REPLACE INTO users VALUES (?, ?)", out)
        self.spilled += len(out)
        self._spill_rows += len(out)
        excess = self._spill_rows - self.spill_users_max
        if excess > 0:  # rowids grow with each insert: the smallest were spilled longest ago
            db.execute("DELETE FROM users WHERE rowid IN (SELECT rowid FROM users ORDER BY rowid LIMIT ?)", (excess,))
            self._spill_rows -= excess
            self.dropped += excess

    def _get(self, user_id: str, create: bool) -> Optional[Deque[Entry]]:
        d = self._users.get(user_id)
        if d is not None:
            self._users.move_to_end(user_id)
            return d
        if self._spill is not None:
            row = self._spill.execute("SELECT entries FROM users WHERE user_id = ?", (user_id,)).fetchone()
            if row is not None:
                self._spill.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
                self._spill_rows -= 1
                d = self._users[user_id] = deque((tuple(e) for e in json.loads(row[0])), maxlen=self.max_len)
                self.reloaded += 1
                self._evict()
                return d
        if not create:
            return None
        d = self._users[user_id] = deque(maxlen=self.max_len)
        self._evict()
        return d

    def add(self, user_id: str, item_id: str, event: str, ts: int, covisit: bool = True) -> None:
        """One event; ``covisit``: count its co-visits (live events and feedback replayed at a
        rebuild; the dataset's own events are in the trained channel already)."""
        with self._lock:
            d = self._get(user_id, create=True)
            if covisit:
                self.covisit.observe([e[0] for e in d], item_id)
            entry = (item_id, EVENT_CODE.get(event, 0), int(ts))
            if d and ts < d[-1][2]:  # late event: keep the deque in time order
                items = sorted([*d, entry], key=lambda e: e[2])
                d.clear()
                d.extend(items[-self.max_len:])
            else:
                d.append(entry)

    def add_table(self, table: pa.Table, covisit: bool = False) -> int:
        """Bulk load (user_id, item_id, ts, event) rows, sorted by time per user; ``covisit``:
        replay them in time order through ``add`` (feedback read back at a rebuild), so the
        live co-visits are the ones the events made."""
        if table.num_rows == 0:
            return 0
        t = pa.table({c: table[c].cast(pa.string()) for c in ("user_id", "item_id", "event")} | {"ts": table["ts"]})
        if covisit:
            t = t.sort_by([("ts", "ascending")])
            ts = t["ts"].cast(pa.int64()).to_pylist()
            for u, i, e, when in zip(*(t[c].to_pylist() for c in ("user_id", "item_id", "event")), ts):
                self.add(u, i, e, when)
            return t.num_rows
        t = t.sort_by([("user_id", "ascending"), ("ts", "ascending")])
        ts = t["ts"].cast(pa.int64()).to_numpy()
        users = t["user_id"].to_pylist()
        items = t["item_id"].to_pylist()
        events = t["event"].to_pylist()
        with self._lock:
            d, last = None, None
            for k in range(t.num_rows):
                u = users[k]
                if u != last:
                    d, last = self._get(u, create=True), u
                d.append((items[k], EVENT_CODE.get(events[k], 0), int(ts[k])))
        return t.num_rows

    def history(self, user_id: str) -> List[Entry]:
        with self._lock:
            return list(self._get(user_id, create=False) or ())

    def context(self, user_id: Optional[str], recent_items: Sequence[str] = ()) -> Dict[str, Any]:
        """What a recommendation needs from live state, in one call: the user's history (none
        for an anonymous request) and the live co-visits of its items plus ``recent_items``."""
        with self._lock:
            hist = list(self._get(user_id, create=False) or ()) if user_id else []
            return {"history": hist, "covisit": self.covisit.rows([e[0] for e in hist] + list(recent_items))}

    def covisit_rows(self, items: Sequence[str]) -> Dict[str, Any]:
        """The live co-visits of ``items`` alone (another shard holds the requesting user)."""
        with self._lock:
            return self.covisit.rows(list(items))

    def forget(self, user_id: str) -> int:
        """Drop the user's live state (memory and spill file); returns how many events it held."""
        with self._lock:
            n = len(self._get(user_id, create=False) or ())
            self._users.pop(user_id, None)
            return n

    def users(self, limit: int = 50) -> List[str]:
        with self._lock:
            ranked = sorted(self._users.items(), key=lambda kv: -len(kv[1]))[:limit]
        return [u for u, _ in ranked]


def _remove_spill(db: sqlite3.Connection, folder: str) -> None:
    db.close()
    shutil.rmtree(folder, ignore_errors=True)
