"""The global steps of preprocessing over compact integer-coded interactions (numpy, no Ray).

Validated events arrive batch by batch (from Ray Data or a plain loop) and are folded into
integer codes by :class:`InteractionLog`; the steps that need the whole log (bot filter,
de-duplication, iterative k-core, vocabulary, split, per-user sequences) then run on a few
int arrays: 10^7 events take ~250 MB here, not the gigabytes the string rows would.

Row order matters for determinism: ``row`` is the position of the event in the input (shards in
sorted order, rows in file order), and every sort is stable with ``row`` as the final key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.data.schemas import EVENT_CODE, EVENT_TYPES

SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2


@dataclass
class Interactions:
    """Column arrays of equal length; ``user``/``item`` index ``user_ids``/``item_ids``."""

    user: np.ndarray  # int32
    item: np.ndarray  # int32
    ts: np.ndarray  # int64 epoch ms
    event: np.ndarray  # int8 code into EVENT_TYPES
    value: np.ndarray  # float32, NaN when absent
    row: np.ndarray  # int64 input position
    user_ids: np.ndarray  # object (str)
    item_ids: np.ndarray  # object (str)

    def __len__(self) -> int:
        return len(self.user)

    def take(self, idx: np.ndarray) -> "Interactions":
        return Interactions(self.user[idx], self.item[idx], self.ts[idx], self.event[idx], self.value[idx],
                            self.row[idx], self.user_ids, self.item_ids)


class _Vocab:
    """Strings -> dense codes in first-seen order.

    Encoding is deferred: each batch keeps its own small dictionary and int indices (what
    ``dictionary_encode`` gives, in C++), and ``finish`` unifies all dictionaries with one more
    hash pass. The driver that feeds the log thus does no per-row or per-id Python work.
    """

    def __init__(self) -> None:
        self._dicts: List[pa.Array] = []
        self._indices: List[np.ndarray] = []
        self._ids: Optional[np.ndarray] = None

    def add(self, col: pa.ChunkedArray | pa.Array) -> None:
        enc = col if pa.types.is_dictionary(col.type) else pc.dictionary_encode(col)
        for ch in (enc.chunks if isinstance(enc, pa.ChunkedArray) else [enc]):
            self._dicts.append(ch.dictionary.cast(pa.string()))
            self._indices.append(ch.indices.to_numpy(zero_copy_only=False).astype(np.int32))

    def finish(self) -> np.ndarray:
        """Codes of every value added, in order; sets ``ids`` (code -> string)."""
        if not self._dicts:
            self._ids = np.empty(0, dtype=object)
            return np.empty(0, np.int32)
        unified = pc.dictionary_encode(pa.chunked_array(self._dicts)).combine_chunks()
        global_of = unified.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        out, off = [], 0
        for d, idx in zip(self._dicts, self._indices):
            out.append(global_of[off:off + len(d)][idx])
            off += len(d)
        self._ids = np.asarray(unified.dictionary.to_pylist(), dtype=object)
        self._dicts, self._indices = [], []
        return np.concatenate(out)

    def ids(self) -> np.ndarray:
        assert self._ids is not None, "call finish() first"
        return self._ids


@dataclass
class InteractionLog:
    """Accumulates validated event tables (EVENT_SCHEMA) into integer-coded columns."""

    users: _Vocab = field(default_factory=_Vocab)
    items: _Vocab = field(default_factory=_Vocab)
    _cols: Dict[str, List[np.ndarray]] = field(default_factory=lambda: {k: [] for k in ("ts", "event", "value")})
    rows: int = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.users.add(table["user_id"])
        self.items.add(table["item_id"])
        self._cols["ts"].append(pc.cast(table["ts"], pa.int64()).to_numpy())
        codes = pc.index_in(table["event"], pa.array(EVENT_TYPES))
        self._cols["event"].append(codes.to_numpy(zero_copy_only=False).astype(np.int8))
        self._cols["value"].append(pc.fill_null(table["value"], float("nan")).to_numpy().astype(np.float32))
        self.rows += table.num_rows

    def finish(self) -> Interactions:
        cat = {k: (np.concatenate(v) if v else np.empty(0)) for k, v in self._cols.items()}
        user, item = self.users.finish(), self.items.finish()
        return Interactions(
            user=user, item=item, ts=cat["ts"].astype(np.int64),
            event=cat["event"].astype(np.int8), value=cat["value"].astype(np.float32),
            row=np.arange(self.rows, dtype=np.int64), user_ids=self.users.ids(), item_ids=self.items.ids(),
        )


def drop_bots(x: Interactions, max_events: int) -> Tuple[Interactions, int, int]:
    """Drop users with more than ``max_events`` events. Returns (kept, users dropped, events dropped)."""
    if max_events <= 0 or len(x) == 0:
        return x, 0, 0
    counts = np.bincount(x.user, minlength=len(x.user_ids))
    bots = counts > max_events
    if not bots.any():
        return x, 0, 0
    keep = ~bots[x.user]
    return x.take(np.flatnonzero(keep)), int(bots.sum()), int((~keep).sum())


def _in_row_order(x: Interactions) -> bool:
    return len(x) < 2 or bool((x.row[1:] > x.row[:-1]).all())


def sort_by_user_time(x: Interactions) -> Interactions:
    """Stable order by (user, ts, input row)."""
    # np.lexsort is stable: when rows are already in input order they need not be a key.
    keys = (x.ts, x.user) if _in_row_order(x) else (x.row, x.ts, x.user)
    return x.take(np.lexsort(keys))


def dedupe_earliest(x: Interactions) -> Tuple[Interactions, int]:
    """Keep the earliest (ts, then input row) occurrence of each (user, item); the survivors
    keep their input order. Returns (kept, duplicates dropped)."""
    if len(x) == 0:
        return x, 0
    pair = x.user.astype(np.int64) * max(len(x.item_ids), 1) + x.item  # one sort key for (user, item)
    order = np.lexsort((x.ts, pair) if _in_row_order(x) else (x.row, x.ts, pair))
    p = pair[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = p[1:] != p[:-1]
    keep = np.zeros(len(x), dtype=bool)
    keep[order[first]] = True
    return x.take(np.flatnonzero(keep)), int(len(x) - first.sum())


def kcore(x: Interactions, k: int) -> Tuple[Interactions, int]:
    """Iterative k-core: drop users and items with < k interactions until none is left.
    Returns (kept, iterations)."""
    if k <= 1:
        return x, 0
    it = 0
    while len(x):
        it += 1
        uc = np.bincount(x.user, minlength=len(x.user_ids))
        ic = np.bincount(x.item, minlength=len(x.item_ids))
        keep = (uc[x.user] >= k) & (ic[x.item] >= k)
        if keep.all():
            break
        x = x.take(np.flatnonzero(keep))
    return x, it


def reindex(x: Interactions) -> Interactions:
    """Dense codes over the surviving users and items, ordered by id string: the same set of
    ids gives the same vocabulary whatever order the input came in."""
    out = []
    for codes, ids in ((x.user, x.user_ids), (x.item, x.item_ids)):
        present = np.flatnonzero(np.bincount(codes, minlength=len(ids)))
        names = ids[present].astype(str)
        order = np.argsort(names, kind="stable")
        remap = np.full(len(ids), -1, dtype=np.int32)
        remap[present[order]] = np.arange(len(present), dtype=np.int32)
        out.append((remap[codes], names[order].astype(object)))
    (user, user_ids), (item, item_ids) = out
    return Interactions(user, item, x.ts, x.event, x.value, x.row, user_ids, item_ids)


def split_loo(x: Interactions) -> np.ndarray:
    """Leave-one-out on (user, ts, row) order: last = test, second-to-last = valid, rest = train.
    Users with fewer than 3 interactions keep everything in train. Expects sort_by_user_time order."""
    split = np.zeros(len(x), dtype=np.int8)
    if len(x) == 0:
        return split
    last = np.ones(len(x), dtype=bool)
    last[:-1] = x.user[1:] != x.user[:-1]
    counts = np.bincount(x.user)
    eligible = counts[x.user] >= 3
    test = last & eligible
    valid = np.zeros(len(x), dtype=bool)
    valid[:-1] = test[1:]
    split[test] = SPLIT_TEST
    split[valid & eligible] = SPLIT_VALID
    return split


def split_temporal(x: Interactions, valid_frac: float, test_frac: float) -> Tuple[np.ndarray, Dict[str, int]]:
    """Global time cut-offs: the newest ``test_frac`` of events (by time) is test, the
    ``valid_frac`` before it valid. Returns (split codes, cut-off timestamps in ms)."""
    split = np.zeros(len(x), dtype=np.int8)
    if len(x) == 0:
        return split, {}
    t_valid = int(np.quantile(x.ts, 1 - valid_frac - test_frac, method="lower"))
    t_test = int(np.quantile(x.ts, 1 - test_frac, method="lower"))
    split[x.ts > t_valid] = SPLIT_VALID
    split[x.ts > t_test] = SPLIT_TEST
    return split, {"valid_after_ms": t_valid, "test_after_ms": t_test}


def event_weights(x: Interactions, weights: Dict[str, float]) -> np.ndarray:
    """Per-interaction training weight from its event type (ratings scaled by value/5 when given)."""
    table = np.array([float(weights.get(name, 1.0)) for name in EVENT_TYPES], dtype=np.float32)
    w = table[x.event]
    rate = (x.event == EVENT_CODE["rate"]) & ~np.isnan(x.value)
    w[rate] = w[rate] * np.clip(x.value[rate] / 5.0, 0.1, 2.0)
    return w


def interactions_table(x: Interactions, idx: np.ndarray, weights: np.ndarray) -> pa.Table:
    """Rows ``idx`` as Arrow: codes plus the original ids (dictionary-encoded, so stored once)."""
    users = pa.array(x.user_ids.tolist(), pa.string())
    items = pa.array(x.item_ids.tolist(), pa.string())
    value = x.value[idx]
    return pa.table(
        {
            "user_idx": pa.array(x.user[idx]),
            "item_idx": pa.array(x.item[idx]),
            "user_id": pa.DictionaryArray.from_arrays(pa.array(x.user[idx]), users),
            "item_id": pa.DictionaryArray.from_arrays(pa.array(x.item[idx]), items),
            "ts": pa.array(x.ts[idx]).cast(pa.timestamp("ms", tz="UTC")),
            "event": pa.DictionaryArray.from_arrays(pa.array(x.event[idx].astype(np.int32)),
                                                    pa.array(EVENT_TYPES)),
            "value": pa.array(value, mask=np.isnan(value)),
            "weight": pa.array(weights[idx]),
        }
    )


def user_sequences(x: Interactions, split: np.ndarray) -> pa.Table:
    """One row per user: the train-part item codes, timestamps and event codes in time order.
    Expects sort_by_user_time order."""
    train = np.flatnonzero(split == SPLIT_TRAIN)
    users = x.user[train]
    n_users = len(x.user_ids)
    counts = np.bincount(users, minlength=n_users)
    offsets = np.zeros(n_users + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    off = pa.array(offsets)
    return pa.table(
        {
            "user_idx": pa.array(np.arange(n_users, dtype=np.int32)),
            "user_id": pa.array(x.user_ids.tolist(), pa.string()),
            "items": pa.ListArray.from_arrays(off, pa.array(x.item[train])),
            "ts": pa.ListArray.from_arrays(off, pa.array(x.ts[train])),
            "events": pa.ListArray.from_arrays(off, pa.array(x.event[train])),
        }
    )
