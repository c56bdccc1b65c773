"""RecBole atomic files: ``<name>.inter``, or a given split ``<name>.{train,valid,test}.inter``.

Atomic files are tab-separated with a ``field:type`` header (RecBole's dataset format,
recbole.io/docs/user_guide/data/atomic_files.html). Two shapes of interaction file:

- ``<name>.inter`` with ``user_id``, ``item_id`` and optionally ``timestamp`` / ``rating``
  columns: one event per row (no timestamp: the row order within a user is the time order).
- ``<name>.train.inter`` / ``.valid.inter`` / ``.test.inter`` in the sequential format
  (``user_id:token item_id_list:token_seq item_id:token``), as UniSRec, VQ-Rec and MISSRec ship
  their benchmark splits: every prefix of a user's training sequence, then one row per user
  for valid and one for test. The user's sequence is rebuilt (training sequence, valid item,
  test item) with its position as the time, so preprocessing's leave-one-out with no
  de-duplication and no k-core (the ``recbole`` preset) gives back exactly the split as given;
  :func:`load` refuses a split that is not one valid and one test row per user.

Item text: ``<name>.text`` (``item_id text``) or ``<name>.item`` (every other field joined as
text; ``categories``/``brand`` fields also become categories). When ``<name>.item2index`` maps
original ids to the ids used in the interaction files (UniSRec's layout: the text file keyed by
ASIN, the splits by integer), the text is re-keyed through it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import pyarrow as pa

from components.data.schemas import events_table, items_table
from components.storage import Storage

EXPECTED = "<name>.inter or <name>.train.inter/.valid.inter/.test.inter (+ <name>.text or <name>.item)"
SPLITS = ("train", "valid", "test")
# Sequence position p becomes 2000-01-01 + p seconds: ordered, valid event times.
BASE_MS = 946_684_800_000


class RecBoleFormatError(ValueError):
    """An atomic file that does not have the fields or shape this source needs."""


def _names(src: Storage) -> Dict[str, List[str]]:
    files = [f for f in src.list_files("", (".inter",)) if "/" not in f]
    out: Dict[str, List[str]] = defaultdict(list)
    for f in files:
        stem = f[: -len(".inter")]
        base, _, part = stem.rpartition(".")
        if base and part in SPLITS:
            out[base].append(part)
        else:
            out[stem].append("")
    return out


def detect(src: Storage) -> Optional[str]:
    """The dataset name of the atomic files in ``src`` (None when there are none)."""
    names = _names(src)
    return sorted(names)[0] if names else None


def _table(src: Storage, rel: str) -> Tuple[List[str], List[List[str]]]:
    """-> (field names without their :type, rows of tab-separated values)."""
    lines = src.read_bytes(rel).decode("utf-8", errors="replace").splitlines()
    if not lines:
        raise RecBoleFormatError(f"{rel}: empty file (expected a header of field:type columns)")
    header = [h.split(":", 1)[0].strip() for h in lines[0].split("\t")]
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return header, rows


def _need(rel: str, header: List[str], *fields: str) -> List[int]:
    missing = [f for f in fields if f not in header]
    if missing:
        raise RecBoleFormatError(f"{rel}: missing field(s) {', '.join(missing)} (header has {', '.join(header)})")
    return [header.index(f) for f in fields]


def load(src: Storage) -> Tuple[pa.Table, pa.Table, Dict[str, object]]:
    """-> (events, items, info); ``info['given_split']`` is True for train/valid/test files."""
    names = _names(src)
    if not names:
        raise FileNotFoundError(f"no RecBole atomic files in {src.root}: expected {EXPECTED}")
    if len(names) > 1:
        raise RecBoleFormatError(f"{src.root} holds atomic files of several datasets ({', '.join(sorted(names))}); "
                                 "point data.path at a folder with one")
    name, parts = next(iter(names.items()))
    given = set(parts) >= set(SPLITS)
    if "" not in parts and not given:
        raise RecBoleFormatError(f"{src.root}: {name} has only {', '.join(sorted(parts))}.inter; "
                                 f"a given split needs all of {', '.join(SPLITS)}")
    if given:
        users, items, ts = _given_split(src, name)
        event, value = ["view"] * len(users), None
    else:
        users, items, ts, event, value = _events(src, f"{name}.inter")
    events = events_table(users, items, ts, event, value=value)
    return events, _items(src, name), {"format": "recbole", "name": name, "given_split": given}


def _given_split(src: Storage, name: str) -> Tuple[List[str], List[str], List[int]]:
    rows = {}
    for part in SPLITS:
        rel = f"{name}.{part}.inter"
        header, body = _table(src, rel)
        u, h, t = _need(rel, header, "user_id", "item_id_list", "item_id")
        rows[part] = [(r[u], r[h].split(), r[t]) for r in body]
    train: Dict[str, List[Tuple[List[str], str]]] = defaultdict(list)
    for user, hist, target in rows["train"]:
        train[user].append((hist, target))
    once = {}
    for part in ("valid", "test"):
        seen: Dict[str, Tuple[List[str], str]] = {}
        for user, hist, target in rows[part]:
            if user in seen:
                raise RecBoleFormatError(f"{name}.{part}.inter: user {user} has more than one row; this source "
                                         "takes a leave-one-out split (one valid and one test row per user)")
            seen[user] = (hist, target)
        once[part] = seen
    extra = set(once["valid"]) - set(once["test"])
    if extra:
        raise RecBoleFormatError(f"{name}.valid.inter: {len(extra)} user(s) with no row in {name}.test.inter "
                                 f"(e.g. {sorted(extra)[0]})")
    users, items, ts = [], [], []
    for user, (test_hist, test_item) in once["test"].items():
        if user not in once["valid"]:
            raise RecBoleFormatError(f"{name}.test.inter: user {user} has no row in {name}.valid.inter")
        valid_hist, valid_item = once["valid"][user]
        prefixes = sorted(train.get(user, []), key=lambda p: len(p[0]))
        seq = (prefixes[0][0] + [t for _h, t in prefixes]) if prefixes else list(valid_hist)
        # The test row's history is the valid row's plus the valid item (cut to the same length).
        if test_hist[-1:] != [valid_item]:
            raise RecBoleFormatError(f"{name}.test.inter: user {user}'s history does not end with their valid "
                                     f"item {valid_item}; the split is not leave-one-out")
        seq = seq + [valid_item, test_item]
        users.extend([user] * len(seq))
        items.extend(seq)
        ts.extend(BASE_MS + 1000 * p for p in range(len(seq)))
    return users, items, ts


def _events(src: Storage, rel: str):
    header, body = _table(src, rel)
    u, i = _need(rel, header, "user_id", "item_id")
    t = header.index("timestamp") if "timestamp" in header else None
    r = header.index("rating") if "rating" in header else None
    users = [row[u] for row in body]
    items = [row[i] for row in body]
    if t is not None:
        ts = [_seconds_ms(row[t]) for row in body]
    else:  # row order within a user is the time order
        pos: Dict[str, int] = defaultdict(int)
        ts = []
        for user in users:
            ts.append(BASE_MS + 1000 * pos[user])
            pos[user] += 1
    if r is not None:
        value, event = [_float(row[r]) for row in body], ["rate"] * len(users)
    else:
        value, event = None, ["view"] * len(users)
    return users, items, ts, event, value


def _seconds_ms(s: str) -> Optional[int]:
    v = _float(s)
    return None if v is None else int(v * 1000)


def _float(s: str) -> Optional[float]:
    try:
        return float(s)
    except ValueError:
        return None


def _items(src: Storage, name: str) -> pa.Table:
    ids: List[str] = []
    titles: List[str] = []
    texts: List[str] = []
    cats: List[List[str]] = []
    if src.is_file(f"{name}.text"):
        header, body = _table(src, f"{name}.text")
        i, t = _need(f"{name}.text", header, "item_id", "text")
        for row in body:
            text = row[t].strip() if t < len(row) else ""
            ids.append(row[i])
            titles.append(text.split(". ")[0][:200])
            texts.append(text)
            cats.append([])
    elif src.is_file(f"{name}.item"):
        header, body = _table(src, f"{name}.item")
        (i,) = _need(f"{name}.item", header, "item_id")
        fields = [k for k in range(len(header)) if k != i]
        for row in body:
            vals = {header[k]: row[k].strip() for k in fields if k < len(row) and row[k].strip()}
            ids.append(row[i])
            titles.append(vals.get("title") or vals.get("movie_title") or "")
            texts.append(". ".join(vals.values()))
            cats.append([c for k in ("categories", "brand", "genre") for c in vals.get(k, "").split() if c])
    mapping = _item2index(src, name)
    if mapping:
        keep = [k for k, iid in enumerate(ids) if iid in mapping]
        ids = [mapping[ids[k]] for k in keep]
        titles, texts, cats = ([col[k] for k in keep] for col in (titles, texts, cats))
    return items_table(ids, titles, texts, cats)


def _item2index(src: Storage, name: str) -> Dict[str, str]:
    rel = f"{name}.item2index"
    if not src.is_file(rel):
        return {}
    pairs = (line.split("\t") for line in src.read_bytes(rel).decode("utf-8").splitlines() if line.strip())
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2}
