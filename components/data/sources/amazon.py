"""Amazon reviews 2018 adapter: ``<Category>_5.json.gz`` (5-core reviews) + ``meta_<Category>.json.gz``."""

from __future__ import annotations

import gzip
import json
from typing import List, Tuple

import pyarrow as pa

from components.data.schemas import events_table, items_table
from components.storage import Storage

EXPECTED = "<Category>_5.json.gz (or .json) and optionally meta_<Category>.json.gz"


def _files(src: Storage) -> Tuple[List[str], List[str]]:
    files = src.list_files("", (".json", ".json.gz"))
    meta = [f for f in files if f.split("/")[-1].startswith("meta_")]
    reviews = [f for f in files if f not in meta and f.split("/")[-1].split(".")[0].endswith("_5")]
    return reviews, meta


def detect(src: Storage) -> bool:
    return bool(_files(src)[0])


def _lines(src: Storage, rel: str):
    data = src.read_bytes(rel)
    if rel.endswith(".gz"):
        data = gzip.decompress(data)
    for line in data.splitlines():
        line = line.strip()
        if line:
            yield json.loads(line)


def load(src: Storage) -> Tuple[pa.Table, pa.Table]:
    reviews, metas = _files(src)
    if not reviews:
        raise FileNotFoundError(f"no Amazon review files in {src.root}: expected {EXPECTED}")
    u, i, ts, v = [], [], [], []
    for rel in reviews:
        for r in _lines(src, rel):
            u.append(r.get("reviewerID"))
            i.append(r.get("asin"))
            t = r.get("unixReviewTime")
            ts.append(int(t) * 1000 if isinstance(t, (int, float)) else None)
            v.append(r.get("overall"))
    events = events_table(u, i, ts, ["rate"] * len(u), value=v)
    ids, titles, texts, cats = [], [], [], []
    for rel in metas:
        for m in _lines(src, rel):
            ids.append(m.get("asin"))
            titles.append(m.get("title") or "")
            texts.append(item_text(m))
            cats.append([c for c in dict.fromkeys(m.get("category") or []) if isinstance(c, str)])
    return events, items_table(ids, titles, texts, cats)


def item_text(meta: dict) -> str:
    """Brand, description and features as one text (HTML is cleaned in validation)."""
    parts = []
    if meta.get("brand"):
        parts.append(f"Brand: {meta['brand']}.")
    for key in ("description", "feature"):
        val = meta.get(key) or []
        parts.extend(val if isinstance(val, list) else [str(val)])
    return " ".join(p for p in parts if isinstance(p, str))[:4000]
