"""Row validation and normalisation of raw events and items (pure Arrow, no Ray).

Each function takes a raw Arrow table whose columns carry the schema's field names (any types:
strings from CSV, numbers from Parquet, ...) and returns the rows that pass, in the canonical
schema, plus the rows that fail with the first rule they broke and their raw values. Nothing is
dropped silently: ``len(valid) + len(rejects) == len(input)``.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.data.schemas import (
    EVENT_REQUIRED,
    EVENT_SCHEMA,
    EVENT_TYPES,
    ITEM_SCHEMA,
    QUARANTINE_SCHEMA,
    TS,
)

_NUMERIC = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_UNIT_MS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
_DAY_MS = 86_400_000
_TAG = re.compile(r"<[^>]{0,200}>")
_SPACE = re.compile(r"\s+")


@dataclass
class Validated:
    """Result of validating one raw table."""

    valid: pa.Table
    rejects: pa.Table  # QUARANTINE_SCHEMA


def empty_rejects() -> pa.Table:
    return QUARANTINE_SCHEMA.empty_table()


def make_rejects(raw: pa.Table, reasons: pa.Array | List[str], shard: str) -> pa.Table:
    """Quarantine rows: raw values as JSON, plus the reason and the shard they came from."""
    records = [json.dumps(r, default=str, ensure_ascii=False) for r in raw.to_pylist()]
    reasons = reasons if isinstance(reasons, pa.Array) else pa.array(reasons, pa.string())
    return pa.table(
        {"shard": pa.array([shard] * len(records), pa.string()), "reason": reasons, "record": records},
        schema=QUARANTINE_SCHEMA,
    )


# -- column coercions ---------------------------------------------------------------------
def to_clean_string(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Any scalar column -> trimmed strings, empty -> null. Raises ArrowException on nested types."""
    col = _combine(col)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_floating(col.type):
        # 12.0 -> "12": ids written by tools that turned integer columns into floats.
        as_int = pc.cast(col, pa.int64(), safe=False)
        whole = pc.equal(pc.cast(as_int, col.type), col)
        col = pc.if_else(whole, pc.cast(as_int, pa.string()), pc.cast(col, pa.string()))
    elif not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    col = pc.utf8_trim_whitespace(col.cast(pa.string()))
    return pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)


def to_float(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """-> (float64 values with null for missing/NaN, mask of present-but-unparseable values)."""
    col = _combine(col)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        s = pc.utf8_trim_whitespace(col.cast(pa.string()))
        present = pc.and_kleene(pc.is_valid(s), pc.not_equal(s, ""))
        numeric = pc.fill_null(pc.match_substring_regex(s, _NUMERIC), False)
        vals = pc.cast(pc.if_else(numeric, s, pa.scalar(None, pa.string())), pa.float64())
        bad = pc.and_(pc.fill_null(present, False), pc.invert(numeric))
    elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        vals = pc.cast(col, pa.float64())
        bad = pa.array(np.zeros(len(col), dtype=bool))
    else:
        raise pa.ArrowInvalid(f"type {col.type} is not numeric")
    bad = pc.or_(bad, pc.fill_null(pc.is_inf(vals), False))
    vals = pc.if_else(pc.fill_null(pc.is_finite(vals), False), vals, pa.scalar(None, pa.float64()))
    return vals, bad


def to_epoch_ms(col: pa.ChunkedArray | pa.Array, unit: str = "auto") -> tuple[pa.Array, pa.Array]:
    """Timestamps of any common form -> (int64 epoch ms or null, mask of present-but-unparseable).

    Accepts Arrow timestamps/dates, integers or floats in ``unit`` (``auto`` guesses s/ms/us/ns
    from the magnitude), numeric strings, and ISO-8601 strings (naive ones are taken as UTC).
    """
    col = _combine(col)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    n = len(col)
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        if pa.types.is_timestamp(col.type) and col.type.tz is None:
            col = pc.assume_timezone(col, "UTC")
        ms = pc.cast(pc.cast(col, TS), pa.int64())
        return ms, pa.array(np.zeros(n, dtype=bool))
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        s = pc.utf8_trim_whitespace(col.cast(pa.string()))
        numeric = pc.fill_null(pc.match_substring_regex(s, _NUMERIC), False)
        num_ms, _ = to_epoch_ms(pc.cast(pc.if_else(numeric, s, pa.scalar(None, pa.string())), pa.float64()), unit)
        text = pc.if_else(numeric, pa.scalar(None, pa.string()), pc.if_else(pc.equal(s, ""), None, s))
        iso_ms = _parse_iso(text)
        ms = pc.coalesce(num_ms, iso_ms)
        bad = pc.and_(pc.fill_null(pc.is_valid(text), False), pc.is_null(iso_ms))
        return ms, bad
    if pa.types.is_integer(col.type):
        # Integer arithmetic: float64 cannot hold nanosecond epochs exactly.
        valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
        x = pc.fill_null(pc.cast(col, pa.int64()), 0).to_numpy()
        if unit == "auto":
            a = np.abs(x)
            ms = np.select([a < 10**11, a < 10**14, a < 10**17], [x * 1000, x, x // 1000], x // 1_000_000)
        else:
            ms = {"s": x * 1000, "ms": x, "us": x // 1000, "ns": x // 1_000_000}[unit]
        return pa.array(ms, mask=~valid), pa.array(np.zeros(n, dtype=bool))
    if pa.types.is_floating(col.type):
        x = pc.cast(col, pa.float64())
        finite = pc.fill_null(pc.is_finite(x), False)
        x = pc.if_else(finite, x, pa.scalar(None, pa.float64()))
        if unit == "auto":
            a = pc.abs(x)
            scale = pc.case_when(
                pc.make_struct(pc.less(a, 1e11), pc.less(a, 1e14), pc.less(a, 1e17)),
                1000.0, 1.0, 1e-3, 1e-6,
            )
        else:
            scale = pa.scalar(_UNIT_MS[unit])
        ms = pc.cast(pc.floor(pc.multiply(x, scale)), pa.int64(), safe=False)
        bad = pc.and_(pc.is_valid(col), pc.invert(finite))
        return ms, pc.fill_null(bad, False)
    raise pa.ArrowInvalid(f"type {col.type} is not a timestamp")


def _parse_iso(text: pa.Array) -> pa.Array:
    """ISO-8601 strings -> int64 ms (null where unparseable). Vectorised, per-row fallback."""
    if text.null_count == len(text):
        return pa.nulls(len(text), pa.int64())
    for target, local in ((TS, False), (pa.timestamp("ms"), True)):
        try:
            ts = pc.cast(text, target)
            if local:
                ts = pc.assume_timezone(ts, "UTC")
            return pc.cast(ts, pa.int64())
        except pa.ArrowException:
            continue
    out: List[Optional[int]] = []
    for v in text.to_pylist():
        out.append(_parse_iso_one(v) if v is not None else None)
    return pa.array(out, pa.int64())


def _parse_iso_one(v: str) -> Optional[int]:
    try:
        d = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return int(d.timestamp() * 1000)


def _combine(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def clean_text(value: Optional[str]) -> str:
    """HTML entities decoded, tags removed, whitespace collapsed; None -> ''."""
    if value is None:
        return ""
    if not isinstance(value, str):
        value = str(value)
    text = html.unescape(html.unescape(value))  # some sources double-escape (&amp;amp;)
    text = _TAG.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def clean_text_column(col: pa.Array) -> pa.Array:
    col = _combine(col)
    return pa.array([clean_text(v) for v in col.to_pylist()], pa.string())


# -- rules ---------------------------------------------------------------------------------
class _Reasons:
    """First failing rule per row."""

    def __init__(self, n: int):
        self.reason = pa.nulls(n, pa.string())

    def add(self, failed: pa.Array, code: str) -> None:
        failed = pc.fill_null(failed, False)
        self.reason = pc.if_else(pc.and_(pc.is_null(self.reason), failed), pa.scalar(code), self.reason)

    def ok(self) -> pa.Array:
        return pc.is_null(self.reason)


def normalize_events(
    raw: pa.Table,
    *,
    shard: str = "",
    ts_unit: str = "auto",
    default_event: str = "view",
    now_ms: Optional[int] = None,
) -> Validated:
    """Validate and normalise raw event rows (see module docstring).

    Rules, in order: required columns present; user_id, item_id non-empty; ts parseable and in
    (1970, now + 1 day]; event one of EVENT_TYPES (missing -> ``default_event``); value numeric
    and finite when given. Text in ``context`` is cleaned (HTML entities, tags, whitespace).
    """
    n = raw.num_rows
    missing = [c for c in EVENT_REQUIRED if c not in raw.column_names]
    if missing:
        return Validated(EVENT_SCHEMA.empty_table(), make_rejects(raw, [f"missing_column:{missing[0]}"] * n, shard))
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    r = _Reasons(n)
    cols = {}
    for name in ("user_id", "item_id"):
        try:
            cols[name] = to_clean_string(raw[name])
        except pa.ArrowException:
            return Validated(EVENT_SCHEMA.empty_table(), make_rejects(raw, [f"bad_type:{name}"] * n, shard))
        r.add(pc.is_null(cols[name]), f"missing_{name}")
    try:
        ts, ts_bad = to_epoch_ms(raw["ts"], ts_unit)
    except pa.ArrowException:
        return Validated(EVENT_SCHEMA.empty_table(), make_rejects(raw, ["bad_type:ts"] * n, shard))
    r.add(ts_bad, "bad_ts")
    r.add(pc.is_null(ts), "missing_ts")
    r.add(pc.or_(pc.less_equal(ts, 0), pc.greater(ts, now_ms + _DAY_MS)), "ts_out_of_range")

    event, value = _event_and_value(raw, default_event, r)
    optional = _optional_strings(raw, ("session_id", "context"), r)
    ok = r.ok()
    table = pa.table(
        {
            "user_id": cols["user_id"],
            "item_id": cols["item_id"],
            "ts": pc.cast(pc.fill_null(ts, 0), TS),
            "event": event,
            "value": value,
            "session_id": optional["session_id"],
            "context": optional["context"],
        }
    )
    valid = table.filter(ok)
    if valid.column("context").null_count < valid.num_rows:
        valid = valid.set_column(6, "context", _clean_nullable(valid.column("context")))
    valid = valid.cast(EVENT_SCHEMA)
    bad = pc.invert(ok)
    rejects = make_rejects(raw.filter(bad), r.reason.filter(bad), shard) if valid.num_rows < n else empty_rejects()
    return Validated(valid, rejects)


def _event_and_value(raw: pa.Table, default_event: str, r: "_Reasons") -> tuple:
    """(event, value) columns: event lower-cased, ``default_event`` when missing, one of
    EVENT_TYPES; value numeric and finite when given. Bad rows are recorded in ``r``."""
    n = raw.num_rows
    if "event" in raw.column_names:
        event = pc.utf8_lower(to_clean_string(raw["event"]))
        event = pc.fill_null(event, default_event)
    else:
        event = pa.array([default_event] * n, pa.string())
    r.add(pc.invert(pc.is_in(event, pa.array(EVENT_TYPES))), "bad_event")
    value = pa.nulls(n, pa.float64())
    if "value" in raw.column_names:
        try:
            value, value_bad = to_float(raw["value"])
        except pa.ArrowException:
            value_bad = pc.is_valid(_combine(raw["value"]))
        r.add(value_bad, "bad_value")
    return event, value


def _optional_strings(raw: pa.Table, names: Sequence[str], r: "_Reasons") -> dict:
    """Cleaned optional string columns (null where absent); a column of another type is bad."""
    out = {}
    for name in names:
        out[name] = pa.nulls(raw.num_rows, pa.string())
        if name in raw.column_names:
            try:
                out[name] = to_clean_string(raw[name])
            except pa.ArrowException:
                r.add(pc.is_valid(_combine(raw[name])), f"bad_type:{name}")
    return out


def _clean_nullable(col: pa.ChunkedArray) -> pa.Array:
    vals = [clean_text(v) if v is not None else None for v in col.to_pylist()]
    return pa.array([v if v else None for v in vals], pa.string())


def normalize_items(raw: pa.Table, *, shard: str = "") -> Validated:
    """Validate and normalise raw catalog rows.

    item_id is required; title/text are cleaned (HTML entities, tags, whitespace) and default to
    ''; categories accept a list or a string separated by ``|``, ``,`` or ``;``; updated_at is
    optional (null when absent or unparseable is rejected as ``bad_updated_at``).
    """
    n = raw.num_rows
    if "item_id" not in raw.column_names:
        return Validated(ITEM_SCHEMA.empty_table(), make_rejects(raw, ["missing_column:item_id"] * n, shard))
    r = _Reasons(n)
    try:
        item_id = to_clean_string(raw["item_id"])
    except pa.ArrowException:
        return Validated(ITEM_SCHEMA.empty_table(), make_rejects(raw, ["bad_type:item_id"] * n, shard))
    r.add(pc.is_null(item_id), "missing_item_id")
    updated = pa.nulls(n, pa.int64())
    if "updated_at" in raw.column_names:
        try:
            updated, bad = to_epoch_ms(raw["updated_at"])
            r.add(bad, "bad_updated_at")
        except pa.ArrowException:
            r.add(pc.is_valid(_combine(raw["updated_at"])), "bad_updated_at")
    ok = r.ok()
    kept = raw.filter(ok)
    titles = clean_text_column(kept["title"]) if "title" in kept.column_names else pa.array([""] * kept.num_rows)
    texts = clean_text_column(kept["text"]) if "text" in kept.column_names else pa.array([""] * kept.num_rows)
    cats = (
        pa.array([parse_categories(v) for v in kept["categories"].to_pylist()], pa.list_(pa.string()))
        if "categories" in kept.column_names
        else pa.array([[] for _ in range(kept.num_rows)], pa.list_(pa.string()))
    )
    valid = pa.table(
        {
            "item_id": item_id.filter(ok),
            "title": titles,
            "text": texts,
            "categories": cats,
            "updated_at": pc.cast(updated.filter(ok), TS),
        }
    ).cast(ITEM_SCHEMA)
    bad = pc.invert(ok)
    rejects = make_rejects(raw.filter(bad), r.reason.filter(bad), shard) if valid.num_rows < n else empty_rejects()
    return Validated(valid, rejects)


def parse_categories(value) -> List[str]:
    """A list, or a string separated by | , or ; -> cleaned, de-duplicated category names."""
    if value is None:
        return []
    if isinstance(value, float) and math.isnan(value):
        return []
    parts: Iterable = value if isinstance(value, (list, tuple)) else re.split(r"[|,;]", str(value))
    out: List[str] = []
    for p in parts:
        c = clean_text(p)
        if c and c not in out and c.lower() != "(no genres listed)":
            out.append(c)
    return out
