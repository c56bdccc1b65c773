"""Per-user histories from a dataset version, and the fixed-length tensors models consume.

Item and event ids are shifted by one (0 = padding); sequences are left-padded so the last
position is always the most recent event.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from components.models.retriever import gap_buckets
from components.data.schemas import EVENT_CODE


@dataclass
class UserHistories:
    """Train-part history of every user (0-based item codes), plus valid/test targets."""

    items: List[np.ndarray]
    events: List[np.ndarray]
    ts: List[np.ndarray]
    valid: Dict[str, np.ndarray]  # user_idx, item_idx, ts, event: a row per target, (user, time) order
    test: Dict[str, np.ndarray]
    num_items: int

    @property
    def num_users(self) -> int:
        return len(self.items)


def histories_from_tables(sequences: pa.Table, valid: pa.Table, test: pa.Table, num_items: int) -> UserHistories:
    seq = sequences.sort_by("user_idx")

    def lists(name, dtype):
        col = seq[name].combine_chunks()
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False).astype(dtype)
        return [values[offsets[k]:offsets[k + 1]] for k in range(len(offsets) - 1)]

    def targets(t: pa.Table) -> Dict[str, np.ndarray]:
        return {
            "user_idx": t["user_idx"].to_numpy().astype(np.int64),
            "item_idx": t["item_idx"].to_numpy().astype(np.int64),
            "ts": t["ts"].cast(pa.int64()).to_numpy(),
            "event": t["event"].cast(pa.string()).to_pylist(),
        }

    return UserHistories(lists("items", np.int64), lists("events", np.int64), lists("ts", np.int64),
                         targets(valid), targets(test), num_items)


def user_hash(users: np.ndarray) -> np.ndarray:
    """A fixed hash of user codes: samples drawn by its smallest values are the same in every run,
    job and process (no seed to pass along)."""
    return (np.asarray(users, dtype=np.uint64) * np.uint64(2246822519) + np.uint64(374761393)) % np.uint64(2 ** 32)


def sample_targets(h: UserHistories, max_users: Optional[int]) -> Tuple[UserHistories, np.ndarray]:
    """``h`` with the valid and test targets of at most ``max_users`` users (those with the
    smallest ``user_hash``; the same users in both splits), and the kept valid rows' positions in
    ``h.valid`` (row-keyed choices such as the ranker's held-out lists refer to those). Training
    histories are untouched: models and baselines still see every user. ``None``, or at least as
    many users as have targets: ``h`` itself and every row."""
    every = np.arange(len(h.valid["user_idx"]))
    have = np.union1d(h.valid["user_idx"], h.test["user_idx"])
    if max_users is None or len(have) <= max_users:
        return h, every
    keep = have[np.argsort(user_hash(have), kind="stable")[:max_users]]

    def part(t: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        rows = np.flatnonzero(np.isin(t["user_idx"], keep))
        return {k: (v[rows] if isinstance(v, np.ndarray) else [v[r] for r in rows]) for k, v in t.items()}, rows

    (valid, rows), (test, _) = part(h.valid), part(h.test)
    return replace(h, valid=valid, test=test), rows


def left_pad(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), dtype=np.int64)
    for r, row in enumerate(rows):
        row = row[-length:]
        if len(row):
            out[r, length - len(row):] = row
    return out


def trim_padding(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Drop leading columns that are padding in every row (sequences are left-padded), so a
    batch of short histories is not computed at full ``max_len``."""
    items = arrays["items"]
    nonzero = (items != 0).any(0)
    if "targets" in arrays:
        nonzero |= (arrays["targets"] != 0).any(0)
    first = int(np.argmax(nonzero)) if nonzero.any() else items.shape[1] - 1
    return {k: v[:, first:] for k, v in arrays.items()}


def training_windows(h: UserHistories, max_len: int, users: Optional[np.ndarray] = None,
                     min_len: int = 2) -> Dict[str, np.ndarray]:
    """Next-item windows over each user's train history: inputs items[:-1], targets items[1:],
    cut into chunks of ``max_len`` from the most recent end so every interaction is used."""
    items_w, events_w, gaps_w, targets_w = [], [], [], []
    for u in (range(h.num_users) if users is None else users):
        it, ev, ts = h.items[u] + 1, h.events[u] + 1, h.ts[u]
        if len(it) < min_len:
            continue
        gaps = gap_buckets(ts)
        end = len(it) - 1
        while end > 0:
            start = max(0, end - max_len)
            items_w.append(it[start:end])
            events_w.append(ev[start:end])
            gaps_w.append(gaps[start:end])
            targets_w.append(it[start + 1:end + 1])
            end = start
    return {"items": left_pad(items_w, max_len), "events": left_pad(events_w, max_len),
            "gaps": left_pad(gaps_w, max_len), "targets": left_pad(targets_w, max_len)}


def inference_inputs(items: Sequence[np.ndarray], events: Sequence[np.ndarray], ts: Sequence[np.ndarray],
                     max_len: int) -> Dict[str, np.ndarray]:
    """Histories (0-based item/event codes) -> left-padded model inputs of the last ``max_len``."""
    return {"items": left_pad([np.asarray(i) + 1 for i in items], max_len),
            "events": left_pad([np.asarray(e) + 1 for e in events], max_len),
            "gaps": left_pad([gap_buckets(np.asarray(t)) for t in ts], max_len)}


def history_for(h: UserHistories, split: str):
    """Histories used to predict ``split`` targets: each target sees the user's train part, then
    (for test) all of its valid events, then its own split's events before it. Under ``loo`` a
    user has one valid and one test target; under ``temporal`` a user can have several, and each
    sees the ones before it (in history, hence also excluded from its ranking)."""
    tgt = h.valid if split == "valid" else h.test
    users = tgt["user_idx"]
    valid_rows: Dict[int, List[int]] = {}
    if split == "test":
        for k, u in enumerate(h.valid["user_idx"]):
            valid_rows.setdefault(int(u), []).append(k)
    items, events, ts = [], [], []
    start = 0  # first row of the current user in ``tgt`` (rows are in (user, time) order)
    for k, u in enumerate(users):
        if k == 0 or users[k - 1] != u:
            start = k
        rows = [(h.valid, r) for r in valid_rows.get(int(u), [])] + [(tgt, r) for r in range(start, k)]
        it, ev, t = h.items[u], h.events[u], h.ts[u]
        if rows:
            it = np.concatenate([it, [src["item_idx"][r] for src, r in rows]]).astype(it.dtype)
            ev = np.concatenate([ev, [EVENT_CODE.get(src["event"][r], 0) for src, r in rows]]).astype(ev.dtype)
            t = np.concatenate([t, [src["ts"][r] for src, r in rows]]).astype(t.dtype)
        items.append(it)
        events.append(ev)
        ts.append(t)
    return users, items, events, ts, tgt["item_idx"]
