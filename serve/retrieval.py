"""The retriever deployment's model, as a plain class (no Ray; unit-tested directly).

``RetrievalModel`` holds the catalog and its item vectors in faiss, takes upserts (new items
placed by their LLM text embedding), and answers the retriever's calls of the request flow
(``serve/flow.py``): history inputs, candidates with the ranker's features and the reasons,
cold start. It loads the bundle parts ``components.layout.RETRIEVER_PARTS`` through
``components.bundle``; a bundle is self-contained, so no dataset is read.

Rows: catalog row ``r`` is item index ``r - 1`` of the vocabulary; row 0 is padding.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from components import bundle, layout
from components import checkpoints as ck
from components.buffers import append_rows
from components.models.channels.base import Moments
from components.models.ranker import NUM_CONTEXT, context_features, item_stats
from serve.ann import ANN_ABOVE, CandidatePool

# serve precision -> dtype of the LLM text vectors a replica keeps (RetrievalModel)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


class RetrievalModel:
    """Catalog + item vectors in a faiss index, with upserts; candidate generation and features.

    Args:
        folder: a fetched bundle with the parts ``components.layout.RETRIEVER_PARTS``; item
            popularity and recency (ranker features) come from its training interactions
            (a bundle without them: neutral features).
        version: the bundle's run id.
        ann_above: catalogs with more items are served from an ANN candidate pool
            (``serve.ann``) instead of scoring every item per request.
        precision: ``fp32``, or ``fp16``: the LLM text vectors (the largest table, read whole by
            every request's text scores) kept in float16 once everything derived from them is
            built; scores and the retriever's vectors stay float32 (``PRECISIONS``).
    """

    def __init__(self, folder: Path, version: str = "", ann_above: int = ANN_ABOVE, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.version = version
        self.model = bundle.load_retriever(folder, verify=False)  # verified on fetch
        items = bundle.load_catalog(folder)
        n = items.num_rows
        if n != self.model.cfg.num_items:
            raise ck.CheckpointError(f"bundle catalog has {n} items, the retriever {self.model.cfg.num_items}")
        self.ids: List[str] = items["item_id"].to_pylist()
        self.titles: List[str] = [t or "" for t in items["title"].to_pylist()]
        self.categories: List[List[str]] = [c or [] for c in items["categories"].to_pylist()]
        self.row: Dict[str, int] = {iid: r + 1 for r, iid in enumerate(self.ids)}
        text = self._text(folder)
        self.stats = item_stats(*bundle.load_interactions(folder), self.categories)
        self.log_pop = self.stats.log_pop  # grows with upserts (new items: 0)
        self.cat_col = {c: k for k, c in enumerate(sorted({c for cats in self.categories for c in cats}))}
        with torch.no_grad():
            self.vectors = self.model.catalog_vectors(text).numpy().astype(np.float32, copy=False)  # [n + 1, d]
        # Candidate channels fused with the retriever (components.models.channels), the same object
        # jobs.evaluate scores with; None for a bundle without them (retriever order alone).
        self.channels = bundle.load_channels(folder, text)
        self.pool: Optional[CandidatePool] = None
        if self.channels is not None and n > ann_above:
            ctext = self.channels.text.numpy() if self.channels.text is not None else None
            self.pool = CandidatePool(self.vectors[1:], ctext, self.channels.log_pop, self.channels.cfg.weights,
                                      shipped=Path(folder) / layout.ANN)
            # the retriever channel's exact catalog mean and spread per user (the others' are the
            # channels' own), kept through upserts
            self.vector_moments = Moments(self.vectors[1:])
            if ctext is not None:
                self.channels.text_moments()
        # the retriever-only search (a bundle without channels): built on first use, so a fused
        # bundle does not hold a second copy of the vectors (0.5 GB at 10^6 items)
        self._flat: Optional[faiss.Index] = None
        self.added_at = np.zeros(n + 1, dtype=np.int64)  # upsert time (ms) of new items
        self.trained_items = n
        self._popular: Optional[np.ndarray] = None  # cold_start's order of the trained items
        self.upserts: Dict[str, Dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.precision = precision
        if self.channels is not None and precision != "fp32":
            self.channels.store_text(PRECISIONS[precision])  # the float32 table goes with this constructor
        del text
        bundle.release_unused_memory()  # what the load freed (Parquet reads, the float32 text table)

    def _text(self, folder: Path) -> Optional[torch.Tensor]:
        """The items' LLM embeddings [n, text_dim] when the retriever uses text, else None."""
        if not self.model.cfg.use_text:
            return None
        text = bundle.load_text_embeddings(folder)
        if text is None:
            raise ck.CheckpointError(f"{folder}: the retriever uses text but the bundle has no {layout.TEXT}/")
        return text

    @property
    def dim(self) -> int:
        return self.model.cfg.dim

    @property
    def text(self) -> Optional[torch.Tensor]:
        """The served LLM text vectors [n, text_dim] (0-based rows, unit length, in the replica's
        precision); None without channels or text. Read from the channels each time: an upsert
        replaces their table, and a second reference would keep the old one alive."""
        return self.channels.text if self.channels is not None else None

    @property
    def size(self) -> int:
        return len(self.ids)

    # -- catalog ------------------------------------------------------------------------------
    def lookup(self, item_ids: Sequence[str]) -> Tuple[List[int], List[str]]:
        """-> (catalog rows of the known ids, in order; the unknown ids)."""
        rows, unknown = [], []
        for iid in item_ids:
            r = self.row.get(iid)
            (rows.append(r) if r is not None else unknown.append(iid))
        return rows, unknown

    def item(self, item_id: str) -> Optional[Dict[str, Any]]:
        r = self.row.get(item_id)
        if r is None:
            return None
        return {"item_id": item_id, "title": self.titles[r - 1], "categories": self.categories[r - 1],
                "new": item_id in self.upserts, **({"text": self.upserts[item_id].get("text") or ""} if item_id in self.upserts else {})}

    @torch.no_grad()
    def upsert(self, items: Sequence[Dict[str, Any]], text_emb: Optional[np.ndarray]) -> int:
        """Add or update items from their LLM text embeddings; returns how many are new.
        Their ID embedding is zero (never trained), as in training with ID dropout."""
        with self._lock:
            new = 0
            d = self.dim
            if self.model.cfg.use_text and text_emb is not None:
                e = torch.as_tensor(np.asarray(text_emb, dtype=np.float32))
                v = self.model.item_norm(self.model.text_vectors(e)).numpy().astype(np.float32)
            else:  # ID-only model: no way to place a new item; it is only served as fresh
                v = np.zeros((len(items), d), dtype=np.float32)
            now = int(time.time() * 1000)
            for k, x in enumerate(items):
                iid = x["item_id"]
                r = self.row.get(iid)
                if r is None:
                    new += 1
                    self.ids.append(iid)
                    self.titles.append(x.get("title") or "")
                    self.categories.append(list(x.get("categories") or []))
                    r = self.row[iid] = len(self.ids)
                    self.vectors = append_rows(self.vectors, v[k:k + 1])  # amortised: no catalog copy per item
                    if self.pool is not None:
                        self.vector_moments.grow(1)
                        self.vector_moments.replace(np.zeros(d, np.float32), v[k])
                    self.added_at = append_rows(self.added_at, [now])
                    self._grow_stats(x)
                    if self.channels is not None:
                        self.channels.grow(1)
                else:
                    self.titles[r - 1] = x.get("title") or self.titles[r - 1]
                    self.categories[r - 1] = list(x.get("categories") or self.categories[r - 1])
                    if r > self.trained_items:  # an upserted item takes its new text; a trained item keeps its vector
                        if self.pool is not None:
                            self.vector_moments.replace(self.vectors[r], v[k])
                        self.vectors[r] = v[k]
                    if self._flat is not None:
                        self._flat.remove_ids(np.array([r], dtype=np.int64))
                if self._flat is not None:
                    self._flat.add_with_ids(self.vectors[r:r + 1], np.array([r], dtype=np.int64))
                if self.channels is not None and text_emb is not None and r > self.trained_items:
                    self.channels.set_text(r - 1, np.asarray(text_emb[k], dtype=np.float32))
                if self.pool is not None and r > self.pool.n:  # a new item joins the ANN indexes
                    ctext = self.channels.text[r - 1:r].float().numpy() if self.channels.text is not None else None
                    self.pool.add(np.array([r - 1]), self.vectors[r:r + 1], ctext)
                self.upserts[iid] = {**x, "embedding": None if text_emb is None else np.asarray(text_emb[k]).tolist()}
            return new

    def _grow_stats(self, item: Dict[str, Any]) -> None:
        s = self.stats
        self.log_pop = append_rows(self.log_pop, [0.0])
        mh = torch.zeros(1, s.categories.shape[1])
        for c in item.get("categories") or []:
            if c in self.cat_col:
                mh[0, self.cat_col[c]] = 1.0
        s.categories = append_rows(s.categories, F.normalize(mh, dim=1))

    # -- retrieval ------------------------------------------------------------------------------
    def history_vectors(self, rows: Sequence[int]) -> np.ndarray:
        return self.vectors[np.asarray(rows, dtype=np.int64)] if len(rows) else np.zeros((0, self.dim), np.float32)

    def search(self, u: np.ndarray, n: int, exclude_rows: Sequence[int] = (),
               categories: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``n`` catalog rows by <u, item> (exclusions and category filters applied)."""
        excl = set(int(r) for r in exclude_rows)
        q = np.asarray(u, dtype=np.float32)[None]
        if categories:
            wanted = set(categories)
            rows = np.array([r + 1 for r, cats in enumerate(self.categories) if wanted.intersection(cats)
                             and (r + 1) not in excl], dtype=np.int64)
            if len(rows) == 0:
                return rows, np.zeros(0, np.float32)
            s = self.vectors[rows] @ q[0]
            top = np.argsort(-s, kind="stable")[:n]
            return rows[top], s[top]
        want = min(self.size, n + len(excl))
        if self._flat is None:
            self._flat = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            self._flat.add_with_ids(self.vectors[1:], np.arange(1, len(self.vectors), dtype=np.int64))
        scores, rows = self._flat.search(q, want)
        keep = [(r, s) for r, s in zip(rows[0], scores[0]) if r > 0 and int(r) not in excl][:n]
        return (np.array([r for r, _ in keep], dtype=np.int64), np.array([s for _, s in keep], dtype=np.float32))

    def live_similarity(self, covisit: Optional[Dict[str, Any]]):
        """The live co-visits of ``SessionState.context`` (item ids) as the channels' extra
        similarities (codes); ids this version does not know are left out."""
        if not covisit or not covisit.get("pairs"):
            return None
        code = lambda iid: self.row.get(iid, 0) - 1  # noqa: E731 (unknown -> -1, dropped)
        pairs = [(code(a), code(b), c) for a, b, c in covisit["pairs"]]
        return self.channels.live_similarity(pairs, {code(i): n for i, n in covisit["users"].items()})

    def fused_search(self, u: np.ndarray, n: int, hist_rows: Sequence[int], exclude_rows: Sequence[int] = (),
                     categories: Optional[Sequence[str]] = None, covisit: Optional[Dict[str, Any]] = None
                     ) -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
        """Top-``n`` rows by the fused channel score over the whole catalog (new items included),
        with each channel's z-score for them; history, exclusions and category filters applied;
        ``covisit``: the live co-visits of the user's items (``SessionState.context``)."""
        u = np.asarray(u, dtype=np.float32)
        hist = [np.asarray(hist_rows, dtype=np.int64) - 1]
        live = self.live_similarity(covisit)
        drop = np.asarray(list(exclude_rows) + list(hist_rows), dtype=np.int64) - 1
        if self.pool is None:  # every item, exactly
            items = None
            raw = torch.as_tensor(self.vectors[1:] @ u)[None]
            fused, z = self.channels.scores(raw, hist, live)
            s = fused[0].numpy().copy()
            s[drop[(drop >= 0) & (drop < len(s))]] = -np.inf
        else:  # a large catalog: the ANN pool, standardised by the pool's catalog sample
            stats = self.vector_moments.of(torch.as_tensor(u)[None])
            items = self._pool(u, hist[0], live, float(stats[1][0]))
            raw = torch.as_tensor(self.vectors[items + 1] @ u)[None]
            fused, z = self.channels.scores(raw, hist, live, items=items, stats={"retriever": stats})
            s = fused[0].numpy().copy()
            at = np.clip(np.searchsorted(items, drop), 0, len(items) - 1)
            s[at[items[at] == drop]] = -np.inf
        if categories:
            wanted = set(categories)
            codes = range(len(self.categories)) if items is None else items
            s[[k for k, r in enumerate(codes) if not wanted.intersection(self.categories[r])]] = -np.inf
        k = min(n, int(np.isfinite(s).sum()))
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), {}
        top = np.argpartition(-s, k - 1)[:k]
        top = top[np.argsort(-s[top], kind="stable")]
        rows = (top if items is None else items[top]) + 1
        return rows, s[top].astype(np.float32), {c: x[0].numpy()[top] for c, x in z.items()}

    def _pool(self, u: np.ndarray, hist: np.ndarray, live, retriever_spread: float) -> np.ndarray:
        """The request's candidate pool (``serve.ann``): the index's best by the fused linear
        channels, the co-visited items, the cold items with their text neighbours."""
        profile = self._text_profile(hist)
        spread = {"retriever": retriever_spread, "popularity": self.channels.popularity_stats()[1]}
        if profile is not None:
            spread["text"] = float(self.channels.text_moments().of(torch.as_tensor(profile)[None])[1][0])
        extra = [self._covisited(hist, live)]
        cold = self.channels.cold_codes(live)
        if len(cold):  # upserts: scored by their cold terms, which read their text neighbours
            nb = self.channels.text_neighbours(torch.as_tensor(cold))
            extra += [cold] + ([nb[0].numpy().ravel()] if nb is not None else [])
        return self.pool.candidates(self.pool.query(u, profile, spread), extra)

    def _text_profile(self, hist: np.ndarray) -> Optional[np.ndarray]:
        """What the text channel scores against (its ``text_recent`` last items' mean, normalised)."""
        text = self.channels.text
        if text is None:
            return None
        h = hist[(hist >= 0) & (hist < len(text))][-self.channels.cfg.text_recent:]
        return F.normalize(text[torch.as_tensor(h)].float().mean(0), dim=0).numpy() if len(h) else None

    def _covisited(self, hist: np.ndarray, live) -> np.ndarray:
        """Items co-visited with the history's last ``history`` items (trained and live)."""
        h = hist[(hist >= 0) & (hist < self.channels.num_items)][-self.channels.cfg.history:]
        if not len(h):
            return np.zeros(0, np.int64)
        parts = [self.channels.sim[h].indices]
        if live is not None and live.nnz:
            parts.append(live[h].indices)
        return np.concatenate(parts)

    def context(self, cand: np.ndarray, scores: np.ndarray, hist_rows: Sequence[int], hist_ts: Sequence[int],
                hist_events: Sequence[int], channels: Optional[Dict[str, np.ndarray]] = None) -> np.ndarray:
        """Ranker features [C, NUM_CONTEXT] (the same features the ranker was trained on)."""
        ctx = context_features(self.stats, (np.asarray(cand) - 1)[None], np.asarray(scores)[None],
                               [np.asarray(hist_rows, dtype=np.int64) - 1], [np.asarray(hist_ts, dtype=np.int64)],
                               [np.asarray(hist_events, dtype=np.int64)],
                               {c: x[None] for c, x in channels.items()} if channels else None)
        return ctx[0].numpy()

    def reasons(self, picks: Sequence[int], hist_rows: Sequence[int]) -> List[Optional[str]]:
        """The history item whose vector is closest to each pick's (None without history)."""
        if not len(hist_rows):
            return [None] * len(picks)
        hist_rows = list(hist_rows)[-50:]
        sim = self.vectors[np.asarray(picks, dtype=np.int64)] @ self.vectors[np.asarray(hist_rows)].T
        return [self.ids[hist_rows[int(j)] - 1] for j in sim.argmax(1)]

    def cold_start(self, n: int, exclude_rows: Sequence[int] = (),
                   categories: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Popular items, with the freshest upserted items mixed in (every third slot)."""
        excl = set(int(r) for r in exclude_rows)
        ok = (lambda r: (not categories or set(categories).intersection(self.categories[r - 1])) and r not in excl)
        # The trained items by popularity, sorted once per version (an upsert has none: they
        # follow in row order), and the upserts newest first: not a sort of the catalog per
        # request (~0.25 s at 10^6 items).
        if self._popular is None:
            self._popular = np.argsort(-self.log_pop[:self.trained_items], kind="stable") + 1
        new = np.arange(self.trained_items + 1, len(self.added_at))
        fresh = new[np.argsort(-self.added_at[new], kind="stable")].tolist()
        trained, total = len(self._popular), len(self._popular) + len(new)
        out: List[int] = []
        pi = fi = 0
        while len(out) < n and (pi < total or fi < len(fresh)):
            take_fresh = fi < len(fresh) and (len(out) % 3 == 2 or pi >= total)
            r = fresh[fi] if take_fresh else int(self._popular[pi] if pi < trained else self.trained_items + 1 + pi - trained)
            fi, pi = (fi + 1, pi) if take_fresh else (fi, pi + 1)
            if ok(r) and r not in out:
                out.append(r)
        rows = np.array(out, dtype=np.int64)
        score = self.log_pop[rows - 1].astype(np.float32) if len(rows) else np.zeros(0, np.float32)
        return rows, score

    # -- what the retriever deployment answers (one call each) ----------------------------------------
    def history_inputs(self, item_ids: Sequence[str], exclude: Sequence[str]) -> Dict[str, Any]:
        """Catalog rows and item vectors of a history (unknown ids dropped and listed)."""
        rows, known, unknown = [], [], []
        for k, iid in enumerate(item_ids):
            r = self.row.get(iid)
            if r is None:
                unknown.append(iid)
            else:
                rows.append(r)
                known.append(k)
        ex_rows, ex_unknown = self.lookup(exclude)
        return {"version": self.version, "rows": rows, "known": known, "vectors": self.history_vectors(rows),
                "exclude_rows": ex_rows, "unknown": sorted(set(unknown) | set(ex_unknown))}

    def candidates(self, u: np.ndarray, hist_rows: Sequence[int], hist_ts: Sequence[int], hist_events: Sequence[int],
                   exclude_rows: Sequence[int], categories: Optional[Sequence[str]], n: int,
                   covisit: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Top-``n`` unseen items for user vector ``u`` with the ranker's inputs and the reasons
        (``covisit``: live co-visits of the user's items, for the co-visitation channel)."""
        with self._lock:
            if self.channels is not None:
                rows, scores, z = self.fused_search(u, n, hist_rows, exclude_rows, categories, covisit)
            else:
                rows, scores = self.search(u, n, list(exclude_rows) + list(hist_rows), categories)
                z = None
        if len(rows) == 0:
            return {"rows": rows, "retrieval": scores, "i": np.zeros((0, self.dim), np.float32),
                    "ctx": np.zeros((0, NUM_CONTEXT), np.float32), "items": [], "reasons": [], "reason_titles": []}
        reasons = self.reasons(rows, hist_rows)
        return {"rows": rows, "retrieval": scores, "i": self.vectors[rows],
                "ctx": self.context(rows, scores, hist_rows, hist_ts, hist_events, z),
                "items": self.describe(rows), "reasons": reasons,
                "reason_titles": [self.titles[self.row[x] - 1] or x for x in reasons]}

    def cold_start_items(self, n: int, exclude: Sequence[str], categories: Optional[Sequence[str]]) -> Dict[str, Any]:
        ex_rows, unknown = self.lookup(exclude)
        rows, scores = self.cold_start(n, ex_rows, categories)
        return {"version": self.version, "items": self.describe(rows), "scores": scores, "unknown": unknown}

    def describe(self, rows: Sequence[int]) -> List[Dict[str, Any]]:
        return [{"item_id": self.ids[r - 1], "title": self.titles[r - 1], "categories": self.categories[r - 1]}
                for r in rows]


def ship_ann_index(folder: Path) -> Optional[Dict[str, Any]]:
    """Build the serving ANN index of the bundle in ``folder`` exactly as a retriever replica would
    and write it into its ann/ part (training time, before the manifest); None for a bundle
    without channels (served by the retriever order alone, no pool)."""
    model = RetrievalModel(folder, "ship", ann_above=0)
    if model.pool is None:
        return None
    return model.pool.save(Path(folder) / layout.ANN)

