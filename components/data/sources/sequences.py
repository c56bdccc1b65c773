"""Sequence files: one ``user item item ...`` line per user in time order (SASRec / S3-Rec format).

The folder holds one ``<name>.txt`` (space- or tab-separated ids) and optionally
``<name>_item2attributes.json`` (item id -> list of attribute ids, S3-Rec's side information:
brand and categories anonymised to integers). A user's position in their line is the time
order; events get position timestamps (2000-01-01 + p seconds), so preprocessing's
leave-one-out (last = test, second-to-last = valid) is the published protocol, and the
``sequences`` preset keeps every row (no de-duplication, no k-core: the files are the benchmark).

Attributes become the item's categories (``attr<id>``) and its text (the same tokens), so items
that share a brand or category share text; items without attributes have empty text.
"""

from __future__ import annotations

import json
from typing import List, Optional, Tuple

import pyarrow as pa

from components.data.schemas import events_table, items_table
from components.data.sources.recbole import BASE_MS
from components.storage import Storage

EXPECTED = "<name>.txt with one `user item item ...` line per user (+ optional <name>_item2attributes.json)"


class SequenceFormatError(ValueError):
    """A sequence file line that is not ``user item [item ...]``."""


def _files(src: Storage) -> Tuple[List[str], List[str]]:
    top = [f for f in src.list_files("", (".txt", ".json")) if "/" not in f]
    attrs = [f for f in top if f.endswith("_item2attributes.json")]
    seqs = [f for f in top if f.endswith(".txt") and not f.lower().startswith(("readme", "license"))]
    return seqs, attrs


def detect(src: Storage) -> Optional[str]:
    seqs, _ = _files(src)
    return seqs[0] if seqs else None


def load(src: Storage) -> Tuple[pa.Table, pa.Table]:
    seqs, attrs = _files(src)
    if not seqs:
        raise FileNotFoundError(f"no sequence file in {src.root}: expected {EXPECTED}")
    if len(seqs) > 1:
        raise SequenceFormatError(f"{src.root} holds several .txt files ({', '.join(seqs)}); "
                                  "point data.path at a folder with one sequence file")
    users: List[str] = []
    items: List[str] = []
    ts: List[int] = []
    for n, line in enumerate(src.read_bytes(seqs[0]).decode("utf-8", errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise SequenceFormatError(f"{seqs[0]} line {n}: user {parts[0]} has no items "
                                      "(expected `user item item ...`)")
        user, seq = parts[0], parts[1:]
        users.extend([user] * len(seq))
        items.extend(seq)
        ts.extend(BASE_MS + 1000 * p for p in range(len(seq)))
    return events_table(users, items, ts, ["view"] * len(users)), _items(src, attrs)


def _items(src: Storage, attrs: List[str]) -> pa.Table:
    ids: List[str] = []
    cats: List[List[str]] = []
    for rel in attrs:
        try:
            mapping = json.loads(src.read_bytes(rel))
        except json.JSONDecodeError as e:
            raise SequenceFormatError(f"{rel}: not JSON ({e})") from e
        if not isinstance(mapping, dict):
            raise SequenceFormatError(f"{rel}: expected an object of item id -> list of attribute ids")
        for item, values in mapping.items():
            ids.append(str(item))
            cats.append([f"attr{v}" for v in (values if isinstance(values, list) else [values])])
    return items_table(ids, [""] * len(ids), [" ".join(c) for c in cats], cats)
