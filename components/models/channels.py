"""Candidate channels besides the sequence retriever, and the fusion of all of them.

A production recommender does not trust one model for its candidates. Each channel scores the
whole catalog for a user from the same inputs (history items, most recent last):

  retriever   <u, i> of the sequence model (computed by the caller: it owns the user vector);
  covisit     item-to-item co-occurrence: cosine over users (ItemKNN), the ``neighbors`` most
              similar items per item, summed over the user's history with a recency decay;
              what wins on small catalogs where a neural model has little to learn from;
  text        LLM text similarity of each item to the user's recent items: the only channel
              that reaches an item nobody has interacted with yet (an item added through the API);
  popularity  log of the item's training interactions.

Fusion: every channel is standardised per user over the catalog (z-scores) and summed with
weights fitted on the valid split (coordinate ascent over a small grid, valid NDCG@10). The
grid contains 0 for every channel and the co-visitation channel alone, so on valid the fused
order is never worse than the retriever's or ItemKNN's. The same ``Channels`` object scores in
``jobs.evaluate`` and in the Serve retriever replica: one code path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

CHANNELS = ("retriever", "covisit", "text", "popularity")
GRID = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
DECAYS = (1.0, 0.9, 0.7)
SHRINK = 10.0  # co-visitation cosine shrinkage (few co-visits -> small similarity)


@dataclass
class FusionConfig:
    # Weight of each channel's per-user z-score (fitted on valid by jobs.train; these are the
    # values before fitting).
    weights: Dict[str, float] = field(default_factory=lambda: {"retriever": 1.0, "covisit": 0.0, "text": 0.0,
                                                               "popularity": 0.0})
    # Co-visitation: history item k positions from the end weighs decay ** k.
    decay: float = 1.0
    # Text channel: the mean of the last ``text_recent`` history items' text vectors.
    text_recent: int = 5
    # Co-visitation and text channels read at most this many recent history items.
    history: int = 200


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


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)


class Channels:
    """Channel scores over the catalog and their fusion.

    Args:
        sim: co-visitation matrix (``covisitation``), rows/cols = 0-based item codes.
        log_pop: [num_items] log1p of training interactions.
        text: [num_items, text_dim] LLM text embeddings (or None: no text channel).
        cfg: fusion weights and settings.
    """

    # Files of a saved instance (a bundle's channels/ part).
    META = "fusion.json"
    TABLES = "channels.safetensors"

    def __init__(self, sim: sp.csr_matrix, log_pop: np.ndarray, text: Optional[torch.Tensor],
                 cfg: Optional[FusionConfig] = None):
        self.sim = sim.tocsr()
        self.log_pop = np.asarray(log_pop, dtype=np.float32)
        self.text = F.normalize(text.float(), dim=1) if text is not None else None
        self.cfg = cfg or FusionConfig()
        # item -> (nearest catalog items by text, weights), for items added without interactions.
        self.cold_neighbours: Dict[int, tuple] = {}

    @classmethod
    def fit_data(cls, histories: Sequence[np.ndarray], num_items: int, text: Optional[torch.Tensor],
                 cfg: Optional[FusionConfig] = None) -> "Channels":
        counts = np.bincount(np.concatenate(histories) if len(histories) else np.empty(0, np.int64),
                             minlength=num_items)
        return cls(covisitation(histories, num_items), np.log1p(counts), text, cfg)

    def grow(self, k: int) -> None:
        """Room for ``k`` items added after training (serving upserts): no co-visits, no
        popularity, a zero text vector until ``set_text``."""
        n = self.num_items + k
        self.sim = sp.csr_matrix((self.sim.data, self.sim.indices, np.append(self.sim.indptr, [self.sim.indptr[-1]] * k)),
                                 shape=(n, n))
        self.log_pop = np.append(self.log_pop, np.zeros(k, np.float32))
        if self.text is not None:
            self.text = torch.cat([self.text, torch.zeros(k, self.text.shape[1])])

    def set_text(self, item: int, embedding: np.ndarray, neighbours: int = 3) -> None:
        """The LLM text vector of item ``item`` (0-based), e.g. an item added through the API.
        An item without interactions also gets its ``neighbours`` nearest catalog items by text:
        its fused score is at least theirs, weighted by similarity (``scores``)."""
        if self.text is None:
            return
        v = F.normalize(torch.as_tensor(embedding, dtype=torch.float32), dim=0)
        self.text[item] = v
        if self.log_pop[item] > 0:
            return
        warm = torch.as_tensor(np.flatnonzero(self.log_pop > 0))
        if len(warm) == 0:
            return
        sim = self.text[warm] @ v
        top = torch.topk(sim, min(neighbours, len(warm)))
        w = torch.softmax(top.values / 0.05, 0)
        self.cold_neighbours[item] = (warm[top.indices], w)

    @property
    def num_items(self) -> int:
        return self.sim.shape[0]

    def live_similarity(self, pairs: Sequence[tuple], users: Dict[int, int], shrink: float = SHRINK) -> sp.csr_matrix:
        """Similarities from co-visits counted after training (serving's live events), to add
        to ``sim``: ``pairs`` (item, neighbour, co-visits) and ``users`` (item -> live users),
        in 0-based codes. The cosine of ``covisitation`` with each item's norm over its
        training plus live users: the trained numerator is not stored (only the top
        neighbours' similarities), so a pair seen in both adds its live part on top."""
        n = self.num_items
        if not len(pairs):
            return sp.csr_matrix((n, n), dtype=np.float32)
        a, b, c = (np.asarray(x) for x in zip(*pairs))
        ok = (a >= 0) & (a < n) & (b >= 0) & (b < n)
        a, b, c = a[ok].astype(np.int64), b[ok].astype(np.int64), c[ok].astype(np.float64)
        def norm(idx: np.ndarray) -> np.ndarray:  # only the items involved: this runs per request
            live = np.array([users.get(int(k), 0) for k in idx], dtype=np.float64)
            return np.sqrt(np.expm1(self.log_pop[idx].astype(np.float64)) + live)

        sim = c / (norm(a) * norm(b) + shrink + 1e-9)
        return sp.csr_matrix((sim.astype(np.float32), (a, b)), shape=(n, n))

    # -- per-channel scores [B, num_items] ------------------------------------------------------------
    def covisit_scores(self, histories: Sequence[np.ndarray], decay: Optional[float] = None,
                       live: Optional[sp.csr_matrix] = None) -> torch.Tensor:
        """Sum over each history's items (recency-decayed) of their similarity rows; ``live``:
        similarities added by live events (``live_similarity``), used with the trained ones."""
        decay = self.cfg.decay if decay is None else decay
        n, H = self.num_items, self.cfg.history
        rows, cols, vals = [], [], []
        for r, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)[-H:]
            h = h[(h >= 0) & (h < n)]
            rows.append(np.full(len(h), r))
            cols.append(h)
            vals.append(decay ** np.arange(len(h) - 1, -1, -1, dtype=np.float64))
        x = sp.csr_matrix((np.concatenate(vals).astype(np.float32) if vals else np.empty(0, np.float32),
                           (np.concatenate(rows) if rows else np.empty(0), np.concatenate(cols) if cols else np.empty(0))),
                          shape=(len(histories), n))
        out = x @ self.sim
        if live is not None and live.nnz:  # x @ (sim + live) without building sim + live per request
            out = out + x @ live
        return torch.as_tensor(out.toarray(), dtype=torch.float32)

    def text_scores(self, histories: Sequence[np.ndarray]) -> Optional[torch.Tensor]:
        if self.text is None:
            return None
        k = self.cfg.text_recent
        prof = torch.zeros(len(histories), self.text.shape[1])
        for r, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)[-k:]
            h = h[(h >= 0) & (h < len(self.text))]
            if len(h):
                prof[r] = F.normalize(self.text[torch.as_tensor(h)].mean(0), dim=0)
        return prof @ self.text.T

    def popularity_scores(self, batch: int) -> torch.Tensor:
        return torch.as_tensor(self.log_pop)[None].expand(batch, -1)

    def channel_scores(self, retriever: torch.Tensor, histories: Sequence[np.ndarray],
                       decay: Optional[float] = None, live: Optional[sp.csr_matrix] = None) -> Dict[str, torch.Tensor]:
        """Per-user z-scores of every channel [B, num_items] (``retriever``: raw <u, i>;
        ``live``: co-visit similarities from live events, see ``live_similarity``)."""
        out = {"retriever": _zscore(retriever.float()),
               "covisit": _zscore(self.covisit_scores(histories, decay, live)),
               "popularity": _zscore(self.popularity_scores(len(histories)))}
        t = self.text_scores(histories)
        if t is not None:
            out["text"] = _zscore(t)
            # An item nobody has interacted with (added at serving) has no co-visits: that is
            # missing evidence, not a low score. Its text similarity stands in for it, until
            # live events give it co-visits of its own.
            cold = self.log_pop <= 0
            if live is not None and live.nnz:
                cold = cold & (np.asarray(live.getnnz(axis=0)) == 0)
            cold = torch.as_tensor(cold)
            if bool(cold.any()):
                out["covisit"][:, cold] = out["text"][:, cold]
        return out

    def fuse(self, z: Dict[str, torch.Tensor], weights: Optional[Dict[str, float]] = None) -> torch.Tensor:
        w = self.cfg.weights if weights is None else weights
        out = torch.zeros_like(z["retriever"])
        for name, x in z.items():
            if w.get(name, 0.0):
                out += w[name] * x
        return out

    def scores(self, retriever: torch.Tensor, histories: Sequence[np.ndarray],
               live: Optional[sp.csr_matrix] = None) -> tuple[torch.Tensor, Dict]:
        """(fused scores [B, num_items], per-channel z-scores) with the fitted weights."""
        z = self.channel_scores(retriever, histories, live=live)
        fused = self.fuse(z)
        for item, (nbrs, w) in self.cold_neighbours.items():
            # A new item is at least as relevant as its nearest catalog items by LLM text are.
            fused[:, item] = torch.maximum(fused[:, item], fused[:, nbrs] @ w)
        return fused, z

    # -- fitting on valid ---------------------------------------------------------------------------------
    def fit_weights(self, retriever: torch.Tensor, histories: Sequence[np.ndarray],
                    objective: Callable[[torch.Tensor], float], rounds: int = 2) -> Dict[str, float]:
        """Coordinate ascent over ``GRID`` per channel (and ``DECAYS`` for co-visitation) to
        maximise ``objective(fused scores)`` (valid NDCG@10); the retriever's weight is 1 or 0
        (the co-visitation channel alone). Sets and returns the weights."""
        best_w, best_v, best_d = None, -1.0, self.cfg.decay
        for decay in DECAYS:
            z = self.channel_scores(retriever, histories, decay)
            names = [c for c in CHANNELS if c in z and c != "retriever"]
            starts = [{"retriever": 1.0, **{c: 0.0 for c in names}},
                      {"retriever": 0.0, **{c: (1.0 if c == "covisit" else 0.0) for c in names}}]
            for w in starts:
                v = objective(self.fuse(z, w))
                for _ in range(rounds):
                    for c in names if w["retriever"] else [c for c in names if c != "covisit"]:
                        for g in GRID:
                            cand = {**w, c: g}
                            if not any(cand.values()):
                                continue
                            s = objective(self.fuse(z, cand))
                            if s > v + 1e-9:
                                v, w = s, cand
                if v > best_v + 1e-9:
                    best_v, best_w, best_d = v, dict(w), decay
        self.cfg.weights, self.cfg.decay = best_w, best_d
        return {"weights": best_w, "decay": best_d, "valid_ndcg@10": best_v}

    # -- bundle I/O ----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        s = self.sim.tocsr()
        save_file({"indptr": s.indptr.astype(np.int64), "indices": s.indices.astype(np.int64),
                   "data": s.data.astype(np.float32), "log_pop": self.log_pop}, str(folder / self.TABLES))
        (folder / self.META).write_text(json.dumps({"num_items": self.num_items, **asdict(self.cfg)}, indent=2))

    @classmethod
    def load(cls, folder: str | Path, text: Optional[torch.Tensor]) -> "Channels":
        folder = Path(folder)
        meta = json.loads((folder / cls.META).read_text())
        t = load_file(str(folder / cls.TABLES))
        n = int(meta.pop("num_items"))
        sim = sp.csr_matrix((t["data"], t["indices"], t["indptr"]), shape=(n, n))
        return cls(sim, t["log_pop"], text, FusionConfig(**meta))


def topk_excluding(scores: torch.Tensor, histories: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Top-``k`` item codes per row with each row's history excluded (scores modified in place)."""
    for r, h in enumerate(histories):
        if len(h):
            scores[r, torch.as_tensor(np.asarray(h), dtype=torch.long)] = float("-inf")
    return torch.topk(scores, min(k, scores.shape[1]), dim=1).indices.numpy()


def describe(fit: Dict[str, object]) -> str:
    w = fit["weights"]
    return ", ".join(f"{c} {w[c]:g}" for c in CHANNELS if c in w) + f"; co-visit decay {fit['decay']:g}"


def channel_names(z: Dict[str, torch.Tensor]) -> List[str]:
    return [c for c in CHANNELS if c in z]
