"""What a retraining pass reads (no Ray): the parent dataset's interactions, the new feedback
shards and the catalog with the items upserted through the API, staged as one preprocessing input
under ``retrain/<run_id>/input/``."""

from __future__ import annotations

from typing import List

import pyarrow as pa

from components import layout
from components.online.feedback_log import shard_key
from components.storage import Storage

EVENT_COLUMNS = ["user_id", "item_id", "ts", "event", "value"]
ITEM_COLUMNS = ["item_id", "title", "text", "categories"]


def stage_retrain_input(storage: Storage, run_id: str, dataset_prefix: str, shards: List[str]) -> str:
    """Write the merged preprocessing input under retrain/<run_id>/input/; returns its prefix. The
    new shards are copied as serving wrote them: preprocessing validates them like any raw shard."""
    base = layout.retrain_input(run_id)
    parts = [storage.read_parquet(layout.join(dataset_prefix, split), columns=EVENT_COLUMNS) for split in layout.SPLITS]
    events = pa.concat_tables([pa.table({c: (t[c].cast(pa.string()) if c in ("user_id", "item_id", "event") else t[c])
                                         for c in EVENT_COLUMNS}) for t in parts])
    storage.write_parquet(layout.join(base, "events", "base.parquet"), events)
    for f in shards:
        storage.write_bytes(layout.join(base, "events", f"feedback-{shard_key(f)}"), storage.read_bytes(f))
    items = storage.read_parquet(layout.join(dataset_prefix, layout.ITEMS), columns=ITEM_COLUMNS)
    items = pa.table({c: items[c] for c in ITEM_COLUMNS})
    if storage.list_files(layout.UPSERTS, (".parquet",)):
        new = storage.read_parquet(layout.UPSERTS)
        new = pa.table({"item_id": new["item_id"].cast(pa.string()), "title": new["title"].cast(pa.string()),
                        "text": new["text"].cast(pa.string()),
                        "categories": new["categories"].cast(pa.list_(pa.string()))})
        items = pa.concat_tables([items.cast(new.schema), new])
    storage.write_parquet(layout.join(base, layout.ITEMS, "items.parquet"), items)
    return base
