"""From validated rows to a written dataset version (no Ray).

``ValidatedStream`` is the single funnel both the Ray Data job and the single-process reference
feed: it splits each incoming table into good rows (folded into an :class:`InteractionLog` or
the item list) and quarantined rows (streamed to Parquet), and counts both. ``build_dataset``
runs the global steps; ``write_dataset`` lays out ``datasets/<name>/<version>/``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components import layout
from components.data import interactions as ix
from components.data.privacy import drop_forgotten, drop_forgotten_records
from components.data.schemas import EVENT_SCHEMA, ITEM_SCHEMA, QUARANTINE_SCHEMA
from components.data.shards import ShardReader
from components.storage import Storage
from components.data.validation import normalize_events, normalize_items

OUTPUT_SHARD_ROWS = 1_000_000
REJECT_COLUMNS = [f"_q_{name}" for name in QUARANTINE_SCHEMA.names]


# -- per shard (runs in Ray Data workers or in a plain loop) --------------------------------------
@dataclass
class ShardValidator:
    """Reads one shard and validates its rows; yields tables of good rows with quarantine columns
    appended (``_q_shard``, ``_q_reason``, ``_q_record``), rejects carrying null data columns."""

    reader: ShardReader
    kind: str  # "events" | "items"
    ts_unit: str = "auto"
    default_event: str = "view"
    now_ms: Optional[int] = None

    @property
    def schema(self) -> pa.Schema:
        if self.kind == "events":
            # Only what the global steps use, ids dictionary-encoded: a fraction of the bytes
            # that would otherwise cross the object store to the driver.
            dict_str = pa.dictionary(pa.int32(), pa.string())
            fields = [pa.field("user_id", dict_str), pa.field("item_id", dict_str),
                      EVENT_SCHEMA.field("ts").with_nullable(True), pa.field("event", dict_str),
                      pa.field("value", pa.float64())]
        else:
            fields = [pa.field(f.name, f.type, nullable=True) for f in ITEM_SCHEMA]
        return pa.schema(fields + [pa.field(c, pa.string()) for c in REJECT_COLUMNS])

    def validate(self, rel: str) -> Iterable[pa.Table]:
        for chunk in self.reader.read(rel):
            if chunk.table.num_rows:
                if self.kind == "events":
                    res = normalize_events(chunk.table, shard=rel, ts_unit=self.ts_unit,
                                           default_event=self.default_event, now_ms=self.now_ms)
                else:
                    res = normalize_items(chunk.table, shard=rel)
                yield self._combine(res.valid, res.rejects)
            if chunk.rejects.num_rows:
                yield self._combine(None, chunk.rejects)

    def _combine(self, valid: Optional[pa.Table], rejects: pa.Table) -> pa.Table:
        schema = self.schema
        parts = []
        if valid is not None and valid.num_rows:
            cols = {f.name: (pc.dictionary_encode(valid[f.name]) if pa.types.is_dictionary(f.type) else valid[f.name])
                    for f in schema if not f.name.startswith("_q_")}
            cols.update({c: pa.nulls(valid.num_rows, pa.string()) for c in REJECT_COLUMNS})
            parts.append(pa.table(cols).cast(schema))
        if rejects.num_rows:
            cols = {f.name: pa.nulls(rejects.num_rows, f.type) for f in schema if not f.name.startswith("_q_")}
            cols.update({c: rejects[c[3:]] for c in REJECT_COLUMNS})
            parts.append(pa.table(cols).cast(schema))
        return pa.concat_tables(parts) if parts else schema.empty_table()


def split_validated(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Combined table -> (good rows without quarantine columns, QUARANTINE_SCHEMA rejects)."""
    if table["_q_reason"].null_count == table.num_rows:  # the common case: nothing to split off
        return table.drop_columns(REJECT_COLUMNS), QUARANTINE_SCHEMA.empty_table()
    bad = pc.is_valid(table["_q_reason"])
    good = table.filter(pc.invert(bad)).drop_columns(REJECT_COLUMNS)
    rej = table.filter(bad).select(REJECT_COLUMNS).rename_columns(QUARANTINE_SCHEMA.names)
    return good, rej


# -- the funnel -----------------------------------------------------------------------------------
@dataclass
class QuarantineSink:
    """Streams rejected rows to ``<prefix>/part-00000.parquet`` and counts them by reason."""

    storage: Storage
    rel: str
    reasons: Counter = field(default_factory=Counter)
    _writer: Any = None

    def add(self, rejects: pa.Table) -> None:
        if rejects.num_rows == 0:
            return
        for reason, n in Counter(r.split(":", 1)[0] if r.startswith("unreadable_shard") else r
                                 for r in rejects["reason"].to_pylist()).items():
            self.reasons[reason] += n
        if self._writer is None:
            path = self.storage.path(self.rel)
            if not self.storage.is_s3:
                self.storage.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            self._writer = pq.ParquetWriter(path, QUARANTINE_SCHEMA, filesystem=self.storage.fs, compression="zstd")
        self._writer.write_table(rejects.cast(QUARANTINE_SCHEMA))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


@dataclass
class ValidatedStream:
    """Consumes combined validated tables of one kind in input order."""

    quarantine: QuarantineSink
    log: ix.InteractionLog = field(default_factory=ix.InteractionLog)
    items: List[pa.Table] = field(default_factory=list)
    rows_in: int = 0
    # digest -> forgotten_at_ms (components.data.privacy): those users' events up to then are dropped
    forgotten: Dict[str, int] = field(default_factory=dict)
    forgotten_rows: int = 0
    # components.data.privacy.Pseudonymizer: stored user ids become keyed pseudonyms, and quarantined
    # raw records (which would name users) keep only their shard and reason.
    pseudonymize: Optional[Callable] = None

    def add_events(self, table: pa.Table) -> None:
        good, rej = split_validated(table)
        self.rows_in += table.num_rows
        good, dropped = drop_forgotten(good, self.forgotten)
        rej, dropped_raw = drop_forgotten_records(rej, self.forgotten)
        # Forgotten rows count as never read (valid + quarantined = raw rows still holds).
        self.rows_in -= dropped + dropped_raw
        self.forgotten_rows += dropped + dropped_raw
        if self.pseudonymize is not None:
            good = self.pseudonymize.table(good)
            rej = rej.set_column(rej.column_names.index("record"), rej.schema.field("record"),
                                 pa.nulls(rej.num_rows, rej.schema.field("record").type))
        self.log.add(good)
        self.quarantine.add(rej)

    def add_items(self, table: pa.Table) -> None:
        good, rej = split_validated(table)
        self.items.append(good.cast(ITEM_SCHEMA))
        self.quarantine.add(rej)


# -- global steps ---------------------------------------------------------------------------------
@dataclass
class BuiltDataset:
    x: ix.Interactions  # sorted by (user, ts, row), dense sorted vocabularies
    split: np.ndarray
    weights: np.ndarray
    items: pa.Table
    stats: Dict[str, Any]


def build_dataset(log: ix.InteractionLog, items: pa.Table, pcfg) -> BuiltDataset:
    """Bot filter -> de-dup (earliest (user, item)) -> k-core -> vocab -> sort -> split."""
    t0 = time.perf_counter()
    x = log.finish()
    stats: Dict[str, Any] = {"valid_events": len(x), "raw_users": len(x.user_ids), "raw_items": len(x.item_ids)}
    x, bot_users, bot_events = ix.drop_bots(x, pcfg.bot_max_events)
    stats["dropped"] = {"bot_users": bot_users, "bot_events": bot_events}
    x, dups = ix.dedupe_earliest(x) if pcfg.dedupe else (x, 0)
    stats["dropped"]["duplicates"] = dups
    before = len(x)
    x, iters = ix.kcore(x, pcfg.kcore)
    stats["dropped"]["kcore"] = before - len(x)
    stats["kcore"] = {"k": pcfg.kcore, "iterations": iters}
    if len(x) == 0:
        raise ValueError(
            f"no interactions left after filtering ({stats['valid_events']} valid events, "
            f"{dups} duplicates, k-core k={pcfg.kcore}); lower preprocess.kcore or check the input")
    x = ix.sort_by_user_time(ix.reindex(x))
    if pcfg.split == "loo":
        split = ix.split_loo(x)
    else:
        split, cut = ix.split_temporal(x, pcfg.valid_frac, pcfg.test_frac)
        stats["temporal_cutoffs"] = cut
    weights = ix.event_weights(x, dict(pcfg.event_weights))
    catalog = align_catalog(items, x.item_ids)
    stats.update({
        "users": len(x.user_ids), "items": len(x.item_ids), "interactions": len(x),
        "split": pcfg.split,
        "train": int((split == ix.SPLIT_TRAIN).sum()), "valid": int((split == ix.SPLIT_VALID).sum()),
        "test": int((split == ix.SPLIT_TEST).sum()),
        "items_without_metadata": int((~np.asarray(catalog["has_metadata"])).sum()),
        "catalog_items": items.num_rows,
        "global_steps_s": round(time.perf_counter() - t0, 3),
    })
    return BuiltDataset(x, split, weights, catalog, stats)


def align_catalog(items: pa.Table, item_ids: np.ndarray) -> pa.Table:
    """Catalog rows in vocabulary order; the latest ``updated_at`` (then the last row) wins for
    an id listed twice; ids with no catalog row get empty text and ``has_metadata=False``."""
    ids = pa.array(item_ids.tolist(), pa.string())
    if items.num_rows:
        order = np.lexsort((np.arange(items.num_rows),
                            pc.fill_null(pc.cast(items["updated_at"], pa.int64()), -1).to_numpy()))
        items = items.take(order)
        # After sorting, the last occurrence of an id is the winner.
        last = {iid: k for k, iid in enumerate(items["item_id"].to_pylist())}
        pos = np.array([last.get(i, -1) for i in item_ids.tolist()], dtype=np.int64)
    else:
        pos = np.full(len(item_ids), -1, dtype=np.int64)
    has = pos >= 0
    take = pa.array(np.where(has, pos, 0))
    def col(name, empty):
        if not items.num_rows:
            return pa.array([empty] * len(ids), ITEM_SCHEMA.field(name).type)
        vals = items[name].take(take)
        return pc.if_else(pa.array(has), vals, pa.scalar(empty, ITEM_SCHEMA.field(name).type))
    title = col("title", "")
    return pa.table({
        "item_idx": pa.array(np.arange(len(ids), dtype=np.int32)),
        "item_id": ids,
        "title": title,
        "text": col("text", ""),
        "categories": col("categories", []),
        "updated_at": col("updated_at", None),
        "has_metadata": pa.array(has),
    })


# -- output ---------------------------------------------------------------------------------------
def fingerprint(files: List[Dict[str, Any]], settings: Dict[str, Any]) -> str:
    """Version id from the input shard listing (path, size, mtime) and the preprocessing settings."""
    h = hashlib.sha256(json.dumps({"files": files, "settings": settings}, sort_keys=True, default=str).encode())
    return "v" + h.hexdigest()[:12]


def write_dataset(storage: Storage, prefix: str, built: BuiltDataset) -> Dict[str, Any]:
    """Write train/valid/test, sequences, items, vocab and stats.json under ``prefix``."""
    x = built.x
    written = {}
    for name, code in (("train", ix.SPLIT_TRAIN), ("valid", ix.SPLIT_VALID), ("test", ix.SPLIT_TEST)):
        idx = np.flatnonzero(built.split == code)
        for k, start in enumerate(range(0, max(len(idx), 1), OUTPUT_SHARD_ROWS)):
            part = ix.interactions_table(x, idx[start:start + OUTPUT_SHARD_ROWS], built.weights)
            storage.write_parquet(f"{prefix}/{name}/part-{k:05d}.parquet", part)
        written[name] = len(idx)
    storage.write_parquet(layout.join(prefix, layout.SEQUENCES, "part-00000.parquet"), ix.user_sequences(x, built.split))
    storage.write_parquet(layout.join(prefix, layout.ITEMS, "part-00000.parquet"), built.items)
    storage.write_parquet(layout.join(prefix, layout.VOCAB_USERS),
                          pa.table({"user_idx": np.arange(len(x.user_ids), dtype=np.int32),
                                    "user_id": pa.array(x.user_ids.tolist(), pa.string())}))
    storage.write_parquet(layout.join(prefix, layout.VOCAB_ITEMS), built.items.select(["item_idx", "item_id"]))
    storage.write_json(layout.join(prefix, layout.STATS), built.stats)
    return written
