"""Arrow schemas of the records the system stores (see DESIGN.md, "Schemas")."""

from __future__ import annotations

from typing import List, Optional, Sequence

import pyarrow as pa

EVENT_TYPES = ("view", "click", "cart", "purchase", "rate", "skip")
EVENT_CODE = {name: i for i, name in enumerate(EVENT_TYPES)}

TS = pa.timestamp("ms", tz="UTC")

EVENT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("ts", TS, nullable=False),
        pa.field("event", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("session_id", pa.string()),
        pa.field("context", pa.string()),
    ]
)
EVENT_REQUIRED = ("user_id", "item_id", "ts")
# Feedback shards (serve/feedback.py) add the client's optional idempotency key.
FEEDBACK_SCHEMA = EVENT_SCHEMA.append(pa.field("event_id", pa.string()))

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("text", pa.string()),
        pa.field("categories", pa.list_(pa.string())),
        pa.field("updated_at", TS),
    ]
)
ITEM_REQUIRED = ("item_id",)


def events_table(user: Sequence[str], item: Sequence[str], ts_ms: Sequence[Optional[int]],
                 event: Sequence[str], value=None, context=None) -> pa.Table:
    """Source adapters' events in EVENT_SCHEMA: epoch-ms times; ``value`` / ``context`` lists or
    None (all null)."""
    n = len(user)
    return pa.table(
        {"user_id": user, "item_id": item, "ts": pa.array(ts_ms, pa.int64()).cast(TS), "event": event,
         "value": pa.nulls(n, pa.float64()) if value is None else pa.array(value, pa.float64()),
         "session_id": pa.nulls(n, pa.string()),
         "context": pa.nulls(n, pa.string()) if context is None else pa.array(context, pa.string())},
        schema=EVENT_SCHEMA)


def items_table(ids: Sequence[str], titles: Sequence[str], texts: Sequence[str],
                categories: Sequence[List[str]]) -> pa.Table:
    """Source adapters' catalog rows in ITEM_SCHEMA (no update time)."""
    return pa.table({"item_id": ids, "title": titles, "text": texts, "categories": categories,
                     "updated_at": pa.nulls(len(ids), TS)}, schema=ITEM_SCHEMA)

# Rows that fail validation keep their raw values (as JSON) and the first rule they broke.
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("record", pa.string()),
    ]
)
