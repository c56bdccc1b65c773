"""Forgetting a user (no Ray): every stored table loses the user's rows, an audit record keeps
only a digest of the id, and later dataset versions drop the user's events from the raw logs.

What is rewritten: every Parquet file under the storage root with a ``user_id`` column (raw
events copied into storage, dataset splits and sequences, feedback shards, evaluation
predictions) loses the user's rows; tables where row k is user index k (``vocab/users.parquet``,
``sequences/``) keep the row with a pseudonym for the id and empty event lists; quarantined raw
records (``record`` column) that name the user are dropped. Model weights hold no per-user
rows; what they learned from the user fades with the next retrain, which no longer sees them.

The audit record ``privacy/forgotten/<digest>.json`` has the digest (SHA-256 of the id; with
``LLMREC_PRIVACY_KEY`` set, an HMAC under that key, so the record cannot be matched against
guessed ids without the key), the time, and counts: never the raw id.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components import layout
from components.storage import Storage

log = logging.getLogger(__name__)

FORGOTTEN_PREFIX = layout.FORGOTTEN
KEY_ENV = "LLMREC_PRIVACY_KEY"
# Trees that hold no user ids (weights, indexes, Ray Train's own state): not scanned.
SKIP_PREFIXES = tuple(p + "/" for p in (layout.CHECKPOINTS, layout.RAY_TRAIN, layout.INDEXES, layout.REGISTRY,
                                          FORGOTTEN_PREFIX))


def user_digest(user_id: str, env: Mapping[str, str] = os.environ) -> str:
    key = env.get(KEY_ENV)
    if key:
        return hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(b"llmrec-user:" + user_id.encode()).hexdigest()


# -- keyed pseudonyms ----------------------------------------------------------------------------
PSEUDONYM = re.compile(r"^pz[0-9a-f]{32}$")
MIN_KEY_CHARS = 16


def privacy_key(env: Mapping[str, str] = os.environ) -> str:
    key = env.get(KEY_ENV) or ""
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"pseudonymize_users needs the secret {KEY_ENV} (at least {MIN_KEY_CHARS} characters; "
                         f"{'too short' if key else 'not set'})")
    return key


class Pseudonymizer:
    """user id -> ``pz`` + 32 hex characters of HMAC-SHA256(key, id): stable under one key, not
    reversible, and not matchable against guessed ids without the key. An id that already is a
    pseudonym passes through (what an admin sees in GET /v1/users works as a user id)."""

    def __init__(self, key: str):
        self._key = key.encode()
        # names the key (in dataset fingerprints, so a new key makes a new dataset version) without revealing it
        self.key_id = hashlib.sha256(b"llmrec-key-id:" + self._key).hexdigest()[:16]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Pseudonymizer":
        return cls(privacy_key(env))

    def __call__(self, user_id: str) -> str:
        if PSEUDONYM.match(user_id):
            return user_id
        return "pz" + hmac.new(self._key, b"user:" + user_id.encode(), hashlib.sha256).hexdigest()[:32]

    def table(self, t: pa.Table, column: str = "user_id") -> pa.Table:
        """``t`` with ``column`` replaced by pseudonyms (each distinct id hashed once)."""
        if column not in t.column_names or t.num_rows == 0:
            return t
        field = t.schema.field(column)
        ids = t[column].combine_chunks()
        if pa.types.is_dictionary(ids.type):  # dictionary-encoded ids (validated shards): map the dictionary
            ids = ids.dictionary_decode()
        uniq = pc.unique(ids)
        mapped = pa.array([None if u is None else self(u) for u in uniq.to_pylist()], ids.type)
        out = pc.take(mapped, pc.index_in(ids, uniq))
        if pa.types.is_dictionary(field.type):
            out = out.dictionary_encode().cast(field.type)
        return t.set_column(t.column_names.index(column), field, out)


def _mentions(user_id: str) -> re.Pattern:
    """The id as a whole token in a raw record (``u1`` does not match ``u10``)."""
    return re.compile(r"(?<![\w.-])" + re.escape(user_id) + r"(?![\w.-])")


def _positional(path: str) -> bool:
    """Dataset tables with one row per user in user-index order (removing a row would shift
    every later user): the vocabulary and the training sequences."""
    parts = path.split("/")
    return "vocab" in parts[:-1] and parts[-1].startswith("users") or "sequences" in parts[:-1]


def _without_user(path: str, t: pa.Table, user_id: str, pseudonym: str) -> Tuple[Optional[pa.Table], int]:
    """(rewritten table or None if the user is absent, rows removed or renamed)."""
    if "user_id" in t.column_names:
        hit = pc.fill_null(pc.equal(t["user_id"], pa.scalar(user_id, t.schema.field("user_id").type)), False)
        n = pc.sum(hit).as_py() or 0
        if not n:
            return None, 0
        if _positional(path):  # row k is user index k: keep the row, drop the id and the events
            for i, f in enumerate(t.schema):
                if f.name == "user_id":
                    t = t.set_column(i, f, pc.if_else(hit, pa.scalar(pseudonym, f.type), t[f.name]))
                elif pa.types.is_list(f.type):
                    empty = pa.array([[]] * t.num_rows, f.type)
                    t = t.set_column(i, f, pc.if_else(hit, empty, t[f.name]))
            return t, n
        return t.filter(pc.invert(hit)), n
    if "record" in t.column_names and pa.types.is_string(t.schema.field("record").type):
        pattern = _mentions(user_id)
        keep = [r is None or not pattern.search(r) for r in t["record"].to_pylist()]
        n = keep.count(False)
        return (t.filter(pa.array(keep)), n) if n else (None, 0)
    return None, 0


def forget_user(storage: Storage, user_id: str, now_ms: Optional[int] = None) -> Dict[str, Any]:
    """Remove ``user_id`` from every stored table (see module doc); returns the audit record."""
    if not user_id:
        raise ValueError("user_id: must not be empty")
    digest = user_digest(user_id)
    pseudonym = "forgotten-" + digest[:16]
    # With a key, stored tables may hold the user's keyed pseudonym instead of the raw id.
    ids = [user_id] + ([Pseudonymizer.from_env()(user_id)] if len(os.environ.get(KEY_ENV, "")) >= MIN_KEY_CHARS
                       else [])
    rewritten: List[str] = []
    rows = 0
    for path in storage.list_files("", suffixes=[".parquet"]):
        if path.startswith(SKIP_PREFIXES):
            continue
        data = storage.read_bytes(path)
        f = pq.ParquetFile(io.BytesIO(data))
        names = set(f.schema_arrow.names)
        if not names & {"user_id", "record"}:
            continue
        t = f.read()
        new, n = None, 0
        for uid in ids:
            out, k = _without_user(path, t if new is None else new, uid, pseudonym)
            if out is not None:
                new, n = out, n + k
        if new is None:
            continue
        buf = io.BytesIO()
        pq.write_table(new, buf, compression="zstd")
        storage.write_bytes_atomic(path, buf.getvalue())
        rewritten.append(path)
        rows += n
    record = {"user_digest": digest, "keyed": bool(os.environ.get(KEY_ENV)),
              "forgotten_at_ms": int(now_ms if now_ms is not None else time.time() * 1000),
              "files_rewritten": len(rewritten), "rows_removed": rows,
              "areas": sorted({p.split("/", 1)[0] for p in rewritten})}
    storage.write_json_atomic(f"{FORGOTTEN_PREFIX}/{digest}.json", record)
    log.warning("forgot a user: %d rows in %d files (audit %s)", rows, len(rewritten), digest[:12])
    return record


def forgotten(storage: Storage) -> Dict[str, int]:
    """digest -> forgotten_at_ms of every forgotten user (what preprocessing must drop)."""
    out: Dict[str, int] = {}
    for path in storage.list_files(FORGOTTEN_PREFIX, suffixes=[".json"]):
        rec = storage.read_json(path)
        out[rec["user_digest"]] = int(rec["forgotten_at_ms"])
    return out


def drop_forgotten(t: pa.Table, tombstones: Mapping[str, int]) -> Tuple[pa.Table, int]:
    """Rows of ``t`` (``user_id``, ``ts``) minus those of forgotten users up to their forget time
    (a user who comes back afterwards is a new start)."""
    if not tombstones or t.num_rows == 0:
        return t, 0
    users = t["user_id"].to_pylist()
    ts = t["ts"].cast(pa.timestamp("ms")).cast(pa.int64()).to_pylist() if "ts" in t.column_names else [None] * len(users)
    digests: Dict[str, str] = {}
    keep = []
    for u, when in zip(users, ts):
        if u is None:
            keep.append(True)
            continue
        d = digests.get(u) or digests.setdefault(u, user_digest(u))
        cut = tombstones.get(d)
        keep.append(cut is None or (when is not None and when > cut))
    n = keep.count(False)
    return (t.filter(pa.array(keep)), n) if n else (t, 0)


def drop_forgotten_records(rej: pa.Table, tombstones: Mapping[str, int]) -> Tuple[pa.Table, int]:
    """Quarantined raw records (JSON objects in ``record``) of forgotten users, dropped whatever
    their time (a rejected record's time may not even parse)."""
    if not tombstones or rej.num_rows == 0 or "record" not in rej.column_names:
        return rej, 0
    import json

    keep = []
    for rec in rej["record"].to_pylist():
        try:
            u = json.loads(rec).get("user_id") if rec else None
        except (ValueError, AttributeError):
            u = None
        keep.append(not (isinstance(u, str) and user_digest(u) in tombstones))
    n = keep.count(False)
    return (rej.filter(pa.array(keep)), n) if n else (rej, 0)


def mentions(storage: Storage, user_id: str, prefixes: Iterable[str] = ("",)) -> List[str]:
    """Stored files that still carry ``user_id`` (a check for tests and audits): Parquet columns
    read as values, every other file as text."""
    pattern = _mentions(user_id)
    found: Set[str] = set()
    for prefix in prefixes:
        for path in storage.list_files(prefix):
            if path.startswith(SKIP_PREFIXES[:3]):
                continue
            data = storage.read_bytes(path)
            if path.endswith(".parquet"):
                t = pq.read_table(io.BytesIO(data))
                for name in t.column_names:
                    col = t[name]
                    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                        if any(v is not None and pattern.search(v) for v in col.to_pylist()):
                            found.add(path)
                            break
            elif pattern.search(data.decode("utf-8", "replace")):
                found.add(path)
    return sorted(found)
