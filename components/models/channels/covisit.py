"""Item-to-item co-occurrence as a channel: cosine over users (ItemKNN), the ``neighbors`` most
similar items per item, summed over the user's history with a recency decay; what wins on small
catalogs where a neural model has little to learn from.

Its live update, between retrains: ``LiveCovisitation`` (held by the live state) counts the pairs
live events add, and ``live_similarity`` turns the pairs of a user's recent items into
similarities the channel adds to its trained ones for that request. An item without co-visits
(added through the API) is cold: its score comes from the text channel instead.
"""

from __future__ import annotations

import heapq
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from components.models.channels.base import Channel, Query

SHRINK = 10.0  # co-visitation cosine shrinkage (few co-visits -> small similarity)


def covisitation(histories: Sequence[np.ndarray], num_items: int, neighbors: int = 100,
                 shrink: float = SHRINK) -> sp.csr_matrix:
    """[num_items, num_items] sparse item-item cosine over users (binary user x item matrix),
    shrunk by ``shrink``, the ``neighbors`` largest per row, no self-similarity."""
    rows = np.concatenate([np.full(len(h), u) for u, h in enumerate(histories)]) if len(histories) else np.empty(0)
    cols = np.concatenate(histories) if len(histories) else np.empty(0, np.int64)
    m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(histories), num_items))
    m.data[:] = 1.0
    co = (m.T @ m).tocsr().astype(np.float32)
    norms = np.sqrt(co.diagonal())
    co.setdiag(0.0)
    co.eliminate_zeros()
    co = co.tocoo()
    sim = co.data / (norms[co.row] * norms[co.col] + shrink + 1e-9)
    # Keep the ``neighbors`` most similar per row: sort by (row, -sim), rank within the row.
    order = np.lexsort((-sim, co.row))
    r, c, s = co.row[order], co.col[order], sim[order]
    start = np.searchsorted(r, np.arange(num_items))
    rank = np.arange(len(r)) - start[r]
    keep = rank < neighbors
    return sp.csr_matrix((s[keep].astype(np.float32), (r[keep], c[keep])), shape=(num_items, num_items))


class CovisitChannel(Channel):
    name = "covisit"
    fit_order = 1
    # Fitting also starts from this channel alone (the retriever at weight 0): the fused order is
    # then never worse on valid than ItemKNN's.
    fallback_start = True
    cold_fallback = "text"

    def scores(self, ch, q: Query) -> torch.Tensor:
        """Sum over each history's items (recency-decayed) of their similarity rows, trained plus
        live (``q.live``)."""
        decay = ch.cfg.decay if q.decay is None else q.decay
        n, H = ch.num_items, ch.cfg.history
        if q.items is not None:
            return self._pool_scores(ch, q, decay)
        rows, cols, vals = [], [], []
        for r, h in enumerate(q.histories):
            h = np.asarray(h, dtype=np.int64)[-H:]
            h = h[(h >= 0) & (h < n)]
            rows.append(np.full(len(h), r))
            cols.append(h)
            vals.append(decay ** np.arange(len(h) - 1, -1, -1, dtype=np.float64))
        x = sp.csr_matrix((np.concatenate(vals).astype(np.float32) if vals else np.empty(0, np.float32),
                           (np.concatenate(rows) if rows else np.empty(0), np.concatenate(cols) if cols else np.empty(0))),
                          shape=(len(q.histories), n))
        out = x @ ch.sim
        if q.live is not None and q.live.nnz:  # x @ (sim + live) without building sim + live per request
            out = out + x @ q.live
        return torch.as_tensor(out.toarray(), dtype=torch.float32)

    def _pool_scores(self, ch, q: Query, decay: float) -> torch.Tensor:
        """``scores`` on a pool (``q.items``) from each history's sparse row alone: a cost in the
        rows' co-visits, not in the catalog (the sparse product above allocates and clears
        catalog-sized buffers per call: 3 ms a request at 10^6 items)."""
        n, H = ch.num_items, ch.cfg.history
        mats = [ch.sim] + ([q.live.tocsr()] if q.live is not None and q.live.nnz else [])
        out = np.zeros((len(q.histories), len(q.items)), dtype=np.float32)
        mean, std = np.zeros(len(q.histories)), np.zeros(len(q.histories))
        for r, h in enumerate(q.histories):
            h = np.asarray(h, dtype=np.int64)[-H:]
            h = h[(h >= 0) & (h < n)]
            w = decay ** np.arange(len(h) - 1, -1, -1, dtype=np.float64)
            cols, vals = [], []
            for m in mats:
                start, lens = m.indptr[h], m.indptr[h + 1] - m.indptr[h]
                take = np.arange(lens.sum()) + np.repeat(start - (np.cumsum(lens) - lens), lens)
                cols.append(m.indices[take])
                vals.append(m.data[take] * np.repeat(w, lens))
            c, inv = np.unique(np.concatenate(cols), return_inverse=True)
            v = np.bincount(inv, weights=np.concatenate(vals), minlength=len(c)).astype(np.float32)
            if len(c):
                at = np.minimum(np.searchsorted(c, q.items), len(c) - 1)
                hit = c[at] == q.items
                out[r, hit] = v[at[hit]]
            v = v.astype(np.float64)  # the catalog's moments: every other item scores 0
            mean[r] = v.sum() / n
            std[r] = np.sqrt(max(((v * v).sum() - n * mean[r] ** 2) / max(1, n - 1), 0.0))
        if q.stats is not None:
            q.stats[self.name] = (torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32))
        return torch.as_tensor(out)

    def cold_items(self, ch, q: Query) -> np.ndarray:
        """Items nobody interacted with in training and no live event co-visited: no evidence."""
        return q.columns(ch.cold_mask(q.live)[None])[0]


CHANNEL = CovisitChannel()


def live_similarity(sim: sp.csr_matrix, log_pop: np.ndarray, pairs: Sequence[tuple], users: Dict[int, int],
                    shrink: float = SHRINK) -> sp.csr_matrix:
    """Similarities from co-visits counted after training (serving's live events), to add to
    ``sim``: ``pairs`` (item, neighbour, co-visits) and ``users`` (item -> live users), in 0-based
    codes. The cosine of ``covisitation`` with each item's norm over its training plus live users:
    the trained numerator is not stored (only the top neighbours' similarities), so a pair seen in
    both adds its live part on top."""
    n = sim.shape[0]
    if not len(pairs):
        return sp.csr_matrix((n, n), dtype=np.float32)
    a, b, c = (np.asarray(x) for x in zip(*pairs))
    ok = (a >= 0) & (a < n) & (b >= 0) & (b < n)
    a, b, c = a[ok].astype(np.int64), b[ok].astype(np.int64), c[ok].astype(np.float64)

    def norm(idx: np.ndarray) -> np.ndarray:  # only the items involved: this runs per request
        live = np.array([users.get(int(k), 0) for k in idx], dtype=np.float64)
        return np.sqrt(np.expm1(log_pop[idx].astype(np.float64)) + live)

    s = c / (norm(a) * norm(b) + shrink + 1e-9)
    return sp.csr_matrix((s.astype(np.float32), (a, b)), shape=(n, n))


class LiveCovisitation:
    """Item co-visits added by live events since the model's training data, in item ids.

    When a user interacts with an item new to their history, the pair (it, each of their last
    ``window`` distinct items) gains one co-visit in both directions, and the item one user:
    the numerator and the norms of the cosine the training-time channel uses
    (``covisitation``), counted over the events the model has not seen.
    ``rows`` hands the retriever the pairs of a user's recent items, which it adds to its trained
    similarities (``live_similarity``). Each item keeps its ``neighbours`` most
    co-visited partners and all items together at most ``max_pairs`` pairs. With a ``catalog``
    only its items are counted. The counts are aggregates: they are rebuilt from the feedback log
    with the live state and fold into the model at the next retrain. Not thread-safe:
    ``SessionState`` holds its lock around every call.
    """

    def __init__(self, window: int = 50, neighbours: int = 200, query_items: int = 20, query_neighbours: int = 32,
                 max_pairs: int = 1_000_000, catalog: Optional[Set[str]] = None):
        self.window, self.neighbours = window, neighbours
        # What one recommendation reads: the user's last ``query_items`` distinct items (the
        # channel decays older ones: 0.9^20 = 0.12) and each one's ``query_neighbours`` most
        # co-visited partners. Unbounded, 8.7k feedback events already made requests carry ~4.8k
        # pairs (14k at most) and the in-process p99 went from 7 to 129 ms.
        self.query_items, self.query_neighbours = query_items, query_neighbours
        # What is held: past ``max_pairs`` pairs over all items the half with the fewest co-visits
        # is dropped (the newest first kept among equals: a new item's first co-visits are what
        # this counter is for), so memory stays bounded however many items live events touch.
        self.max_pairs = max(2, max_pairs)
        # The items that may be counted (the served catalog); None counts every item (offline
        # use). Without it any id a client posts would become a row: an event on another item is
        # stored in the feedback log by the caller but counted nowhere here.
        self.catalog = catalog
        self.pairs: Dict[str, Dict[str, int]] = {}
        self.users: Dict[str, int] = {}  # item -> users who interacted with it live
        self.size = 0  # pairs held, over all items
        self.events = 0
        self.skipped = 0  # events on items outside the catalog

    def add_catalog(self, items: Iterable[str]) -> None:
        """Let ``items`` be counted from now on (no-op without a catalog: all are)."""
        if self.catalog is not None:
            self.catalog.update(items)

    def observe(self, history: Sequence[str], item: str) -> None:
        """``item`` was just added to a user whose earlier items are ``history`` (oldest first)."""
        if self.catalog is not None:
            if item not in self.catalog:
                self.skipped += 1
                return
            history = [h for h in history if h in self.catalog]
        if item in history:
            return  # this user already counts for the item and its pairs
        recent: Dict[str, None] = {}  # the last ``window`` distinct items, in insertion order
        for h in reversed(history):
            recent.setdefault(h, None)
            if len(recent) == self.window:
                break
        self.users[item] = self.users.get(item, 0) + 1
        self.events += 1
        for h in recent:
            self._bump(h, item)
            self._bump(item, h)

    def _bump(self, a: str, b: str) -> None:
        row = self.pairs.setdefault(a, {})
        if b not in row:
            self.size += 1
        row[b] = row.get(b, 0) + 1
        if len(row) > 2 * self.neighbours:  # amortised: keep the most co-visited half
            keep = sorted(row.items(), key=lambda kv: -kv[1])[:self.neighbours]
            self.pairs[a] = dict(keep)
            self.size -= len(row) - len(keep)
        if self.size > self.max_pairs:
            self._compact()

    def _compact(self) -> None:
        """Keep the ``max_pairs // 2`` most co-visited pairs of all items (amortised: one pass
        per ``max_pairs // 2`` new pairs); among equal counts the ones added last."""
        newest_first = ((c, a, b) for a in reversed(self.pairs) for b, c in reversed(self.pairs[a].items()))
        pairs: Dict[str, Dict[str, int]] = {}
        for c, a, b in heapq.nlargest(self.max_pairs // 2, newest_first, key=lambda t: t[0]):
            pairs.setdefault(a, {})[b] = c
        self.pairs = pairs
        self.size = sum(len(row) for row in pairs.values())

    def rows(self, items: Sequence[str]) -> Dict[str, Any]:
        """The live pairs of the last ``query_items`` distinct ``items`` (most recent last), each
        item's ``query_neighbours`` most co-visited partners:
        ``{"pairs": [(item, neighbour, co-visits)], "users": {item: live users}}`` (empty when
        no live event touched them)."""
        pairs: List[Tuple[str, str, int]] = []
        users: Dict[str, int] = {}
        seen = set()
        for a in reversed(items):
            if a in seen:
                continue
            seen.add(a)
            if len(seen) > self.query_items:
                break
            row = self.pairs.get(a)
            if not row:
                continue
            users[a] = self.users.get(a, 0)
            top = row.items() if len(row) <= self.query_neighbours else \
                heapq.nlargest(self.query_neighbours, row.items(), key=lambda kv: kv[1])
            for b, c in top:
                pairs.append((a, b, c))
                users[b] = self.users.get(b, 0)
        return {"pairs": pairs, "users": users}


def merge_covisit(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Live co-visits answered by several user shards, as one holder would count them: a
    co-visit is counted once per user and pair and every user lives in one shard, so pair counts
    and per-item user totals add up. One approximation: a neighbour's user total is summed over
    the shards that list it, so a shard holding users of that item but no pair with the request's
    items leaves them out (its norm is undercounted until the next retrain folds the log in)."""
    if len(parts) == 1:
        return parts[0]
    pairs: Dict[Tuple[str, str], int] = {}
    users: Dict[str, int] = {}
    for part in parts:
        for a, b, c in part["pairs"]:
            pairs[(a, b)] = pairs.get((a, b), 0) + c
        for item, n in part["users"].items():
            users[item] = users.get(item, 0) + n
    return {"pairs": [(a, b, c) for (a, b), c in pairs.items()], "users": users}
