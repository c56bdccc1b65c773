"""Candidates for a large catalog: approximate nearest neighbours instead of scoring every item.

Below ``ann_above`` items the retriever replica scores the whole catalog for every request (exact,
``RetrievalModel.fused_search``). Above it, a request scores only a pool (``CandidatePool``):

  nearest     the ``size`` items with the highest fused score of the linear channels, from one
              faiss IVF index over each item's [retriever vector | LLM text vector | log
              popularity]: a channel's z-score is affine in its raw score, so their weighted sum
              is an inner product with [w_r u / s_r | w_t p / s_t | w_p / s_p] (u the user vector,
              p the text profile, s_c each channel's spread over the catalog);
  covisit     every co-visited neighbour of the history items (the similarity rows are sparse:
              an item outside them has no co-visit evidence);
  cold        items without interactions (upserts), with their text neighbours: scored by their
              own fitted terms, which read those.

Every channel standardises the pool's scores by the whole catalog's mean and spread, computed
exactly without scoring the catalog (from the vectors' first and second moments,
``channels.base.Moments``, the sparse co-visit rows, the popularity vector), so an item of the
pool gets the fused score the exact path gives it: the pool path differs from the exact one only
by the items the IVF search misses. Fusion and the ranker run on the pool with the same weights
and code (``Channels.scores(items=..., stats=...)``). ``benchmarks/catalog_scale.py`` measures
the recall against the exact path.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import faiss
import numpy as np

ANN_ABOVE = 200_000  # items: larger catalogs are served from the pool
POOL = 1000  # items from the IVF index per request
# IVF lists probed per query: the square root of the lists (a probe share would scan a fixed
# share of the catalog, a cost linear in it: 1/16 scanned 62k of 10^6 items for recall@100 0.992;
# sqrt(4000) = 64 lists scan 16k for 0.988, and the scan grows as n^0.75)
NPROBE_POWER = 0.5
CODEC = "SQ8"  # how the index stores each item (faiss index_factory's names)
# The index's vectors are zero-padded to a multiple of this many dimensions: faiss scans SQ8
# codes with SIMD only when the dimension is a multiple of 8 (16 for AVX-512); at 449 dims
# (64 + 384 + 1) it fell back to scalar code, 3.2x slower (10.0 vs 3.1 ms a query at 10^6 items,
# 64 probes), with the same results (a zero dimension adds nothing to an inner product).
PAD = 16
INDEX_FILE, META_FILE = "index.faiss", "ann.json"  # a bundle's ann/ part (CandidatePool.save)

log = logging.getLogger("serve.ann")


def ivf_index(rows: Callable[[Any], np.ndarray], n: int, seed: int = 0, scan: int = 0, codec: str = "Flat",
              chunk: int = 65536) -> faiss.Index:
    """An inner-product IVF index over ``n`` vectors with ids 0..n-1, ``rows(idx)`` giving those
    at ``idx`` (an index array or a slice) as float32 [len, d]: ~4 sqrt(n) lists (at least 39
    items each), k-means trained on a sample of at most 64 points per list, the vectors added
    ``chunk`` at a time (never all of them in one float32 copy: 1.9 GB at 10^6 items of 464 dims);
    a search probes ``nlist ** NPROBE_POWER`` of the lists, and enough of them to scan about
    ``scan`` items."""
    nlist = int(max(1, min(4 * math.sqrt(n), 16384, n // 39)))  # faiss wants >= 39 points per list
    rng = np.random.default_rng(seed)
    train = rows(rng.choice(n, 64 * nlist, replace=False) if n > 64 * nlist else slice(0, n))
    index = faiss.index_factory(train.shape[1], f"IVF{nlist},{codec}", faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    del train
    for s in range(0, n, chunk):
        index.add_with_ids(np.ascontiguousarray(rows(slice(s, min(n, s + chunk))), dtype=np.float32),
                           np.arange(s, min(n, s + chunk), dtype=np.int64))
    index.nprobe = min(nlist, max(1, math.ceil(nlist ** NPROBE_POWER), math.ceil(scan * nlist / n)))
    return index


class CandidatePool:
    """The ANN index of one model version and the pool of one request (see the module doc).

    Args:
        vectors: item vectors [n, d] (0-based codes).
        text: normalised LLM text vectors [n, t], or None (no text channel).
        log_pop: [n] log1p of training interactions.
        weights: the fitted fusion weights (``FusionConfig.weights``).
        size: items taken from the index per request.
    """

    def __init__(self, vectors: np.ndarray, text: Optional[np.ndarray], log_pop: np.ndarray,
                 weights: Dict[str, float], size: int = POOL, seed: int = 0, shipped: Optional[Path] = None):
        t0 = time.perf_counter()
        self.n, self.dim, self.size = len(vectors), vectors.shape[1], size
        self.text_dim = 0 if text is None else text.shape[1]
        self.pad = -(self.dim + self.text_dim + 1) % PAD  # zero dimensions after the last part
        self.weights = {c: float(weights.get(c, 0.0)) for c in ("retriever", "text", "popularity")}
        # The index a bundle ships (built at training time from the same vectors: a replica
        # loads it in seconds instead of building it for minutes), when it fits this catalog.
        self.index = self.read(shipped, self.n, self.dim + self.text_dim + 1 + self.pad) if shipped is not None else None
        self.loaded = self.index is not None
        if self.index is None:
            parts = [vectors] + ([text] if text is not None else []) + [np.asarray(log_pop, np.float32)[:, None]]

            def rows(at) -> np.ndarray:  # the index's vectors of items ``at``, built a chunk at a time
                got = [np.asarray(p[at], dtype=np.float32) for p in parts]
                return np.hstack(got + [np.zeros((len(got[0]), self.pad), np.float32)])
            # probing at least 4x the pool's size in items: a pool never comes back short. SQ8: one
            # byte a dimension (464 MB at 10^6 items of 64 + 384 + 1 + 15 padding dims, 1.9 GB as
            # float32), the same pool recall at 10^5 items (0.9845 vs 0.9845 over 60 users), and
            # padded, faster to scan than float32 (3.1 vs 3.8 ms at 10^6 items, 64 probes); the
            # pool is then scored exactly, so only which items come back is approximate.
            self.index = ivf_index(rows, self.n, seed, scan=4 * size, codec=CODEC)
        self.build_s = time.perf_counter() - t0

    def save(self, folder: Path) -> Dict[str, Any]:
        """The index into ``folder`` (a bundle's ann/ part), with what it was built over."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        meta = {"items": self.n, "dim": self.dim, "text_dim": self.text_dim, "pad": self.pad, "codec": CODEC,
                "nlist": int(faiss.extract_index_ivf(self.index).nlist), "nprobe": int(self.index.nprobe),
                "build_s": round(self.build_s, 2)}
        (folder / META_FILE).write_text(json.dumps(meta))
        return meta

    @staticmethod
    def read(folder: Path, n: int, d: int) -> Optional[faiss.Index]:
        """A shipped index of exactly ``n`` items of ``d`` dims from ``folder``; None (logged)
        when there is none or it was built over another catalog or vector layout."""
        path = Path(folder) / INDEX_FILE
        if not path.is_file():
            return None
        index = faiss.read_index(str(path))
        if index.ntotal != n or index.d != d:
            log.warning("the shipped ANN index (%d items of %d dims) does not fit this catalog (%d of %d): "
                        "building one", index.ntotal, index.d, n, d)
            return None
        return index

    def add(self, codes: np.ndarray, vectors: np.ndarray, text: Optional[np.ndarray]) -> None:
        """Items added after the build (serving upserts: no interactions), at their 0-based codes."""
        codes = np.asarray(codes, dtype=np.int64)
        parts = [np.asarray(vectors, np.float32)]
        if self.text_dim:
            parts.append(np.zeros((len(codes), self.text_dim), np.float32) if text is None else np.asarray(text, np.float32))
        parts.append(np.zeros((len(codes), 1 + self.pad), np.float32))
        self.index.add_with_ids(np.ascontiguousarray(np.hstack(parts)), codes)
        self.n = max(self.n, int(codes.max()) + 1) if len(codes) else self.n

    def query(self, u: np.ndarray, profile: Optional[np.ndarray], spread: Dict[str, float]) -> np.ndarray:
        """[w_r u / s_r | w_t p / s_t | w_p / s_p]: the fused linear channels as one inner product
        (``spread``: each channel's standard deviation over the catalog for this user)."""
        def scale(c: str) -> float:
            s = spread.get(c)
            return self.weights[c] / (float(s) + 1e-6) if s is not None else 0.0

        parts = [scale("retriever") * np.asarray(u, np.float32)]
        if self.text_dim:
            parts.append(np.zeros(self.text_dim, np.float32) if profile is None
                         else scale("text") * np.asarray(profile, np.float32))
        parts.append(np.array([scale("popularity")] + [0.0] * self.pad, np.float32))
        return np.concatenate(parts).astype(np.float32)

    def candidates(self, q: np.ndarray, extra: Sequence[np.ndarray] = ()) -> np.ndarray:
        """Sorted unique codes: the index's ``size`` best for query ``q`` and ``extra``
        (co-visited, cold)."""
        _, ids = self.index.search(q[None], self.size)
        out = np.unique(np.concatenate([ids[0], *[np.asarray(e, np.int64) for e in extra]]))
        return out[(out >= 0) & (out < self.n)]
