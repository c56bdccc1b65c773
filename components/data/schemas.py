"""Arrow schemas of the records the system stores (see DESIGN.md, "Schemas")."""

from __future__ import annotations

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

# Rows that fail validation keep their raw values (as JSON) and the first rule they broke.
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("record", pa.string()),
    ]
)
