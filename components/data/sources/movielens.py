"""MovieLens adapter: ml-latest(-small)/ml-20m/ml-25m (CSV), ml-100k (u.data), ml-1m/ml-10m (.dat)."""

from __future__ import annotations

import io
from typing import Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from components.data.schemas import EVENT_SCHEMA, ITEM_SCHEMA
from components.storage import Storage

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]
EXPECTED = "ratings.csv (+ movies.csv) | u.data (+ u.item) | ratings.dat (+ movies.dat)"


def detect(src: Storage) -> str | None:
    for variant, name in (("csv", "ratings.csv"), ("100k", "u.data"), ("dat", "ratings.dat")):
        if src.is_file(name):
            return variant
    return None


def load(src: Storage) -> Tuple[pa.Table, pa.Table]:
    """-> (events, items) in EVENT_SCHEMA / ITEM_SCHEMA, events in file order."""
    variant = detect(src)
    if variant == "csv":
        r = pacsv.read_csv(io.BytesIO(src.read_bytes("ratings.csv")))
        events = _events(r["userId"], r["movieId"], r["rating"], r["timestamp"])
        items = _items_csv(src) if src.is_file("movies.csv") else None
    elif variant == "100k":
        r = _read_sep(src.read_bytes("u.data"), "\t", ["user", "item", "rating", "ts"], "utf-8")
        events = _events(r["user"], r["item"], r["rating"], r["ts"])
        items = _items_100k(src) if src.is_file("u.item") else None
    elif variant == "dat":
        r = _read_sep(src.read_bytes("ratings.dat"), "::", ["user", "item", "rating", "ts"], "utf-8")
        events = _events(r["user"], r["item"], r["rating"], r["ts"])
        items = _items_dat(src) if src.is_file("movies.dat") else None
    else:
        raise FileNotFoundError(f"no MovieLens files in {src.root}: expected {EXPECTED}")
    return events, items if items is not None else ITEM_SCHEMA.empty_table()


def _events(user, item, rating, ts_s) -> pa.Table:
    n = len(user)
    ts = pc.multiply(pc.cast(ts_s, pa.int64()), 1000)
    return pa.table(
        {"user_id": pc.cast(user, pa.string()), "item_id": pc.cast(item, pa.string()),
         "ts": pc.cast(ts, pa.timestamp("ms", tz="UTC")), "event": pa.array(["rate"] * n),
         "value": pc.cast(rating, pa.float64()), "session_id": pa.nulls(n, pa.string()),
         "context": pa.nulls(n, pa.string())},
        schema=EVENT_SCHEMA,
    )


def _read_sep(data: bytes, sep: str, names, encoding: str) -> dict:
    text = data.decode(encoding, errors="replace")
    cols = list(zip(*(line.split(sep) for line in text.splitlines() if line.strip())))
    return {n: pa.array(np.asarray(c, dtype=np.int64 if n != "rating" else np.float64)) for n, c in zip(names, cols)}


def movie_text(title: str, genres) -> str:
    return f"{title}. Genres: {', '.join(genres)}." if genres else f"{title}."


def _items(ids, titles, genres) -> pa.Table:
    n = len(ids)
    return pa.table(
        {"item_id": [str(i) for i in ids], "title": titles,
         "text": [movie_text(t, g) for t, g in zip(titles, genres)], "categories": genres,
         "updated_at": pa.nulls(n, pa.timestamp("ms", tz="UTC"))},
        schema=ITEM_SCHEMA,
    )


def _split_genres(s: str):
    return [g for g in s.split("|") if g and g != "(no genres listed)"]


def _items_csv(src: Storage) -> pa.Table:
    m = pacsv.read_csv(io.BytesIO(src.read_bytes("movies.csv")),
                       convert_options=pacsv.ConvertOptions(column_types={"movieId": pa.string()}))
    return _items(m["movieId"].to_pylist(), m["title"].to_pylist(), [_split_genres(g) for g in m["genres"].to_pylist()])


def _items_dat(src: Storage) -> pa.Table:
    rows = [line.split("::") for line in src.read_bytes("movies.dat").decode("latin-1").splitlines() if line.strip()]
    return _items([r[0] for r in rows], [r[1] for r in rows], [_split_genres(r[2]) for r in rows])


def _items_100k(src: Storage) -> pa.Table:
    rows = [line.split("|") for line in src.read_bytes("u.item").decode("latin-1").splitlines() if line.strip()]
    genres = [[ML100K_GENRES[j] for j, f in enumerate(r[5:24]) if f == "1" and j > 0] for r in rows]
    return _items([r[0] for r in rows], [r[1] for r in rows], genres)
