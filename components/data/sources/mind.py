"""MIND news adapter: ``behaviors.tsv`` + ``news.tsv`` (MINDsmall/MINDlarge, train or dev)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Tuple

import pyarrow as pa

from components.data.schemas import events_table, items_table
from components.storage import Storage

EXPECTED = "behaviors.tsv and news.tsv"


def detect(src: Storage) -> bool:
    return src.is_file("behaviors.tsv")


def _time_ms(s: str) -> int | None:
    try:
        return int(datetime.strptime(s.strip(), "%m/%d/%Y %I:%M:%S %p").replace(tzinfo=timezone.utc).timestamp() * 1000)
    except ValueError:
        return None


def load(src: Storage, include_skips: bool = False) -> Tuple[pa.Table, pa.Table]:
    """Clicked impressions become ``click`` events at the impression time; a user's click history
    (no timestamps in MIND) becomes ``click`` events just before their first impression, in order.
    Non-clicked impressions become ``skip`` events when ``include_skips``."""
    if not detect(src):
        raise FileNotFoundError(f"no MIND files in {src.root}: expected {EXPECTED}")
    u, i, ts, ev, ctx = [], [], [], [], []
    seen_history = set()
    for line in src.read_bytes("behaviors.tsv").decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 5:
            continue
        imp_id, user, when, history, impressions = parts[:5]
        t = _time_ms(when)
        if user not in seen_history and t is not None:
            seen_history.add(user)
            hist = history.split()
            for k, item in enumerate(hist):
                u.append(user); i.append(item); ts.append(t - (len(hist) - k)); ev.append("click"); ctx.append(None)
        for imp in impressions.split():
            item, _, label = imp.rpartition("-")
            if label == "1" or include_skips:
                u.append(user); i.append(item); ts.append(t); ev.append("click" if label == "1" else "skip")
                ctx.append(f"impression:{imp_id}")
    events = events_table(u, i, ts, ev, context=ctx)
    ids, titles, texts, cats = [], [], [], []
    if src.is_file("news.tsv"):
        for line in src.read_bytes("news.tsv").decode("utf-8", errors="replace").splitlines():
            p = line.split("\t")
            if len(p) < 5:
                continue
            ids.append(p[0]); titles.append(p[3]); texts.append(p[4]); cats.append([c for c in (p[1], p[2]) if c])
    return events, items_table(ids, titles, texts, cats)
