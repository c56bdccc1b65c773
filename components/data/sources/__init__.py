"""Data sources: turn a public or synthetic dataset into raw event and item shards.

Adapters (synthetic, movielens, amazon, mind, recbole, sequences) write ``raw/events/<name>/part-*.parquet`` and
``raw/items/<name>/part-*.parquet`` under the storage root in the DESIGN.md schemas. The generic
``files`` source writes nothing: preprocessing reads the user's shards in place, renaming
columns with ``data.columns`` / ``data.item_columns``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import pyarrow as pa

from components import layout
from components.config import to_dict
from components.data.shards import list_shards
from components.storage import Storage

SHARD_ROWS = 1_000_000


@dataclass
class RawSource:
    """Where the raw shards of a dataset are and how their columns map to the schemas."""

    name: str
    events: Storage
    events_prefix: str
    items: Optional[Storage]
    items_prefix: str
    columns: Dict[str, str] = field(default_factory=dict)
    item_columns: Dict[str, str] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)


def dataset_name(cfg) -> str:
    return cfg.data.name or cfg.data.source


def prepare_source(cfg, storage: Storage) -> RawSource:
    """Materialise raw shards for ``cfg.data`` (skipped when already there for the same settings)."""
    name = dataset_name(cfg)
    src = cfg.data.source
    if src == "files":
        root = Storage.from_config(cfg.storage, root=cfg.data.path)
        has_sub = bool(list_shards(root, "events"))
        events_prefix = "events" if has_sub else ""
        items = root if list_shards(root, "items") else None
        if not list_shards(root, events_prefix):
            raise FileNotFoundError(
                f"data.source=files: no event shards in {root.root} (expected .parquet/.jsonl/.csv files, "
                "optionally under events/ with the catalog under items/)")
        return RawSource(name, root, events_prefix, items, "items", dict(to_dict(cfg.data.columns)),
                         dict(to_dict(cfg.data.item_columns)), {"source": "files", "path": root.root})

    ev_prefix, it_prefix = layout.raw("events", name), layout.raw("items", name)
    marker = f"{ev_prefix}/_SOURCE.json"
    settings = {"source": src, "path": cfg.data.path, "seed": cfg.data.seed,
                "synthetic": to_dict(cfg.data.synthetic) if src == "synthetic" else None,
                "mind_include_skips": cfg.data.mind_include_skips if src == "mind" else None}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if storage.is_file(marker) and storage.read_json(marker).get("key") == key:
        info = storage.read_json(marker)
    else:
        storage.delete(ev_prefix)
        storage.delete(it_prefix)
        n_events, n_shards, items_n, extra = _write_source(cfg, storage, ev_prefix, it_prefix)
        info = {"key": key, "settings": settings, "events": n_events, "event_shards": n_shards, "items": items_n,
                **extra}
        storage.write_json(marker, info)
    check_given_split(cfg, info)
    return RawSource(name, storage, ev_prefix, storage, it_prefix, info=info)


def check_given_split(cfg, info: Dict[str, Any]) -> None:
    """A split shipped with the data (RecBole train/valid/test files) is used as given: the
    leave-one-out of the rebuilt sequences equals it only without de-duplication and k-core."""
    if not info.get("given_split"):
        return
    p = cfg.preprocess
    changes = [f"preprocess.{k}={v}" for k, v, bad in (
        ("split", p.split, p.split != "loo"), ("kcore", p.kcore, p.kcore > 1), ("dedupe", p.dedupe, p.dedupe)) if bad]
    if changes:
        raise ValueError(f"{cfg.data.path} ships its own train/valid/test split, which is used as given; "
                         f"{', '.join(changes)} would change it (the {cfg.data.source} preset has "
                         "split=loo, kcore=0, dedupe=false)")


def _write_source(cfg, storage: Storage, ev_prefix: str, it_prefix: str):
    src = cfg.data.source
    if src == "synthetic":
        from components.data.sources import synthetic

        world = synthetic.build_world(cfg.data.synthetic, cfg.data.seed)
        n = shards = 0
        for shards, table in enumerate(synthetic.generate_shards(world, cfg.data.synthetic, cfg.data.seed), 1):
            storage.write_parquet(f"{ev_prefix}/part-{shards - 1:05d}.parquet", table)
            n += table.num_rows
        storage.write_parquet(f"{it_prefix}/part-00000.parquet", world.items)
        return n, shards, world.items.num_rows, {}

    src_storage = Storage.from_config(cfg.storage, root=cfg.data.path)
    extra: Dict[str, Any] = {}
    if src == "movielens":
        from components.data.sources import movielens as adapter

        events, items = adapter.load(src_storage)
    elif src == "amazon":
        from components.data.sources import amazon as adapter

        events, items = adapter.load(src_storage)
    elif src == "mind":
        from components.data.sources import mind as adapter

        events, items = adapter.load(src_storage, include_skips=cfg.data.mind_include_skips)
    elif src == "recbole":
        from components.data.sources import recbole as adapter

        events, items, extra = adapter.load(src_storage)
    elif src == "sequences":
        from components.data.sources import sequences as adapter

        events, items = adapter.load(src_storage)
    else:  # validated in config
        raise ValueError(f"unknown source {src}")
    shards = write_sharded(storage, ev_prefix, events)
    storage.write_parquet(f"{it_prefix}/part-00000.parquet", items)
    return events.num_rows, shards, items.num_rows, extra


def write_sharded(storage: Storage, prefix: str, table: pa.Table, rows: int = SHARD_ROWS) -> int:
    shards = 0
    for shards, start in enumerate(range(0, max(table.num_rows, 1), rows), 1):
        storage.write_parquet(f"{prefix}/part-{shards - 1:05d}.parquet", table.slice(start, rows))
    return shards
