"""Candidate channels and their fusion: a registry of channels, one module each.

A production recommender does not trust one model for its candidates. Each channel scores the
whole catalog for a user from the same inputs (history items, most recent last):

  retriever   <u, i> of the sequence model (computed by the caller: it owns the user vector);
  covisit     item-to-item co-occurrence: cosine over users (ItemKNN), the ``neighbors`` most
              similar items per item, summed over the user's history with a recency decay;
              what wins on small catalogs where a neural model has little to learn from;
  text        LLM text similarity of each item to the user's recent items: the only channel
              that reaches an item nobody has interacted with yet (an item added through the API);
  popularity  log of the item's training interactions.

Each channel module (retriever.py, covisit.py, text.py, popularity.py) declares its name (also
its fusion weight's), its scores and its live update; ``registry.REGISTRY`` lists them.

Fusion: every channel is standardised per user over the catalog (z-scores) and summed with
weights fitted on the valid split (coordinate ascent over a small grid, valid NDCG@10). The
grid contains 0 for every channel and the co-visitation channel alone, so on valid the fused
order is never worse than the retriever's or ItemKNN's. The same ``Channels`` object scores in
``jobs.evaluate`` and in the Serve retriever replica: one code path.

Items without interactions (added through the API, or never interacted with in training) have no
co-visits and no popularity, and the retriever knows them only through its text path: their
fused score is fitted on its own terms, ``cold[c] * z_c`` over the retriever and text channels
plus an offset, on valid with the newest items made new (``fit_cold``), so a new item reaches
the users whose recent items are its text neighbours as far as valid says it should.
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

from components.buffers import append_rows
from components.models.channels import covisit
from components.models.channels.base import Moments, Query, unit_rows
from components.models.channels.covisit import SHRINK, covisitation
from components.models.channels.registry import BY_NAME, CHANNELS, REGISTRY

GRID = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
DECAYS = (1.0, 0.9, 0.7)
# The fused score of an item without interactions: a weight per channel that can score it, an
# offset (its prior against the catalog's items, in z units), and whether it is at least as
# relevant as its nearest catalog items by text (``neighbours`` 1) or not (0).
COLD_GRID = {"retriever": GRID, "text": GRID, "offset": (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0),
             "neighbours": (0.0, 1.0)}
NEIGHBOURS = 3


@dataclass
class FusionConfig:
    # Weight of each channel's per-user z-score (fitted on valid by jobs.train; these are the
    # values before fitting).
    weights: Dict[str, float] = field(default_factory=lambda: {c: BY_NAME[c].default_weight for c in CHANNELS})
    # Co-visitation: history item k positions from the end weighs decay ** k.
    decay: float = 1.0
    # Text channel: the mean of the last ``text_recent`` history items' text vectors.
    text_recent: int = 5
    # Co-visitation and text channels read at most this many recent history items.
    history: int = 200
    # Items without interactions: fused score = sum(cold[c] * z_c) + cold["offset"], or (with
    # cold["neighbours"] 1) that of its nearest catalog items by text when higher (fitted on
    # valid with the newest items made new, ``Channels.fit_cold``; these are the values before).
    cold: Dict[str, float] = field(default_factory=lambda: {"retriever": 1.0, "text": 1.0, "offset": 0.0,
                                                             "neighbours": 1.0})


def _zscore(x: torch.Tensor, ref: Optional[np.ndarray] = None, stats: Optional[tuple] = None) -> torch.Tensor:
    """Per-user z-scores; ``stats``: the (mean, std) [B] to use (the whole catalog's, when only a
    pool is scored), else those of the columns ``ref`` (a uniform sample of the catalog), else of
    all of them."""
    if stats is not None:
        return (x - stats[0][:, None]) / (stats[1][:, None] + 1e-6)
    r = x if ref is None else x[:, torch.as_tensor(ref)]
    return (x - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)


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
        self.text = unit_rows(text) if text is not None else None
        self.cfg = cfg or FusionConfig()
        # text_neighbours per item, computed once each ([num_items, k] codes, -1: not yet, and
        # weights), until the text or the catalog changes
        self._nb: Optional[tuple] = None
        self._text_moments: Optional[Moments] = None  # built on first use (pooled serving)

    @classmethod
    def fit_data(cls, histories: Sequence[np.ndarray], num_items: int, text: Optional[torch.Tensor],
                 cfg: Optional[FusionConfig] = None) -> "Channels":
        counts = np.bincount(np.concatenate(histories) if len(histories) else np.empty(0, np.int64),
                             minlength=num_items)
        return cls(covisitation(histories, num_items), np.log1p(counts), text, cfg)

    def grow(self, k: int) -> None:
        """Room for ``k`` items added after training (serving upserts): no co-visits, no
        popularity, a zero text vector until ``set_text``."""
        n = self.num_items + k  # each table grows into spare rows (components.buffers), not copied
        indptr = append_rows(self.sim.indptr, np.full(k, self.sim.indptr[-1]))
        self.sim = sp.csr_matrix((self.sim.data, self.sim.indices, indptr), shape=(n, n))
        self.log_pop = append_rows(self.log_pop, np.zeros(k, np.float32))
        if self.text is not None:
            self.text = append_rows(self.text, torch.zeros(k, self.text.shape[1]))
            if self._text_moments is not None:
                self._text_moments.grow(k)
        if self._nb is not None:  # the new items' neighbours are not computed yet; the others' stand
            self._nb = (append_rows(self._nb[0], np.full((k, self._nb[0].shape[1]), -1, np.int64)),
                        append_rows(self._nb[1], np.zeros((k, self._nb[1].shape[1]), np.float32)))

    def store_text(self, dtype: torch.dtype) -> None:
        """Keep the text vectors in ``dtype`` (serving's ``precision``: float16 halves the largest
        table of a replica and the bytes each request's text scores read); scores stay float32."""
        if self.text is not None and self.text.dtype != dtype:
            self.text = self.text.to(dtype)
            self._nb = None

    def text_moments(self) -> Moments:
        """The text vectors' ``Moments`` (the text channel's exact catalog mean and spread)."""
        if self._text_moments is None:
            self._text_moments = Moments(self.text.numpy())
        return self._text_moments

    def set_text(self, item: int, embedding: np.ndarray) -> None:
        """The LLM text vector of item ``item`` (0-based), e.g. an item added through the API."""
        if self.text is not None:
            new = F.normalize(torch.as_tensor(embedding, dtype=torch.float32), dim=0)
            if self._text_moments is not None:
                self._text_moments.replace(self.text[item].numpy(), new.numpy())
            self.text[item] = new
            if self._nb is not None and self.log_pop[item] <= 0:
                # a cold item's text: only its own neighbours change (neighbours are items with
                # interactions); recomputing every cold item's per upsert is a catalog scan each
                self._nb[0][item] = -1
            else:
                self._nb = None

    def _static(self) -> tuple:
        """(items without training interactions (mask), those with (codes), popularity mean and
        spread, the items without (codes)) of the current catalog: computed once per catalog,
        not per request."""
        key = (id(self.log_pop), len(self.log_pop))
        if getattr(self, "_static_key", None) != key:
            x = self.log_pop.astype(np.float64)
            self._static_val = (self.log_pop <= 0, np.flatnonzero(self.log_pop > 0), float(x.mean()),
                                float(x.std(ddof=1)) if len(x) > 1 else 0.0, np.flatnonzero(self.log_pop <= 0))
            self._static_key = key
        return self._static_val

    def cold_mask(self, live: Optional[sp.csr_matrix] = None) -> np.ndarray:
        """Items nobody interacted with in training and no live event co-visited: no evidence
        but their text."""
        cold = self._static()[0]
        if live is not None and live.nnz:
            cold = cold & (np.asarray(live.getnnz(axis=0)) == 0)
        return cold

    def cold_codes(self, live: Optional[sp.csr_matrix] = None) -> np.ndarray:
        """``cold_mask``'s items as sorted codes, in a cost that does not grow with the catalog."""
        cold = self._static()[4]
        if live is not None and live.nnz and len(cold):
            cold = cold[~np.isin(cold, live.indices)]
        return cold

    def popularity_stats(self) -> tuple:
        """(mean, std) of the popularity channel over the catalog."""
        return self._static()[2:4]

    @property
    def num_items(self) -> int:
        return self.sim.shape[0]

    def live_similarity(self, pairs: Sequence[tuple], users: Dict[int, int], shrink: float = SHRINK) -> sp.csr_matrix:
        """Co-visit similarities live events added (``covisit.live_similarity``), for ``scores``."""
        return covisit.live_similarity(self.sim, self.log_pop, pairs, users, shrink)

    def raw_scores(self, name: str, histories: Sequence[np.ndarray], decay: Optional[float] = None,
                   live: Optional[sp.csr_matrix] = None) -> Optional[torch.Tensor]:
        """One channel's scores before standardisation [B, num_items] (not the retriever's: the
        caller owns those)."""
        return BY_NAME[name].scores(self, Query(histories, torch.zeros(len(histories), self.num_items), decay, live))

    def channel_scores(self, retriever: torch.Tensor, histories: Sequence[np.ndarray],
                       decay: Optional[float] = None, live: Optional[sp.csr_matrix] = None,
                       items: Optional[np.ndarray] = None, ref: Optional[np.ndarray] = None,
                       stats: Optional[Dict[str, tuple]] = None) -> Dict[str, torch.Tensor]:
        """Per-user z-scores of every channel [B, num_items] (``retriever``: raw <u, i>;
        ``live``: co-visit similarities from live events, see ``live_similarity``). ``items``:
        score only these (sorted 0-based codes; ``retriever`` [B, len(items)]), standardised by
        the whole catalog's mean and spread of each channel: ``stats`` (the caller's, e.g. the
        retriever's) or the channel's own exact ones, else those of the columns ``ref`` of them
        (a uniform sample of the catalog: the pool's own spread is not the catalog's)."""
        q = Query(histories, retriever, decay, live, items, dict(stats or {}) if items is not None else None)
        out: Dict[str, torch.Tensor] = {}
        for channel in REGISTRY:
            s = channel.scores(self, q)
            if s is not None:
                out[channel.name] = _zscore(s, ref, q.stats.get(channel.name) if q.stats is not None else None)
        for channel in REGISTRY:
            # An item a channel has no evidence for (e.g. no co-visits: added at serving) is
            # missing evidence, not a low score: its fallback channel's score stands in for it.
            if channel.cold_fallback in out and channel.name in out:
                cold = torch.as_tensor(channel.cold_items(self, q))
                if bool(cold.any()):
                    out[channel.name][:, cold] = out[channel.cold_fallback][:, cold]
        return out

    def fuse(self, z: Dict[str, torch.Tensor], weights: Optional[Dict[str, float]] = None) -> torch.Tensor:
        w = self.cfg.weights if weights is None else weights
        out = torch.zeros_like(z["retriever"])
        term = torch.empty_like(out)  # one buffer for every w * x (a fresh one each is ~2x slower)
        for name, x in z.items():
            if w.get(name, 0.0):
                out += torch.mul(x, w[name], out=term)
        return out

    def text_neighbours(self, items: torch.Tensor, chunk: int = 256) -> Optional[tuple]:
        """(the ``NEIGHBOURS`` nearest items by text among those with interactions [n, k], their
        softmax weights [n, k]) for each of ``items`` (None: no text or no such items). Each
        item's are computed once (brute force over the items with interactions, ``chunk`` items
        at a time) and kept until the text or the catalog changes: serving asks for the same
        cold items request after request, in pools that differ."""
        items = np.asarray(items, dtype=np.int64)
        warm = self._static()[1]
        if self.text is None or not len(warm) or not len(items):
            return None
        k = min(NEIGHBOURS, len(warm))
        if self._nb is None or self._nb[0].shape != (self.num_items, k):
            self._nb = (np.full((self.num_items, k), -1, dtype=np.int64), np.zeros((self.num_items, k), np.float32))
        idx, w = self._nb
        missing = np.unique(items[idx[items, 0] < 0])
        if len(missing):
            wt = self.text[torch.as_tensor(warm)].T
            for s in range(0, len(missing), chunk):
                part = missing[s:s + chunk]
                top = torch.topk(self.text[torch.as_tensor(part)] @ wt, k, dim=1)
                idx[part] = warm[top.indices.numpy()]
                w[part] = torch.softmax(top.values.float() / 0.05, 1).numpy()
        return torch.as_tensor(idx[items]), torch.as_tensor(w[items])

    def fuse_cold(self, z: Dict[str, torch.Tensor], items: torch.Tensor, warm: torch.Tensor,
                  weights: Optional[Dict[str, float]] = None, neighbours: Optional[tuple] = None) -> torch.Tensor:
        """Fused scores [B, len(items)] of items without interactions (``FusionConfig.cold``);
        ``warm``: the other items' fused scores [B, num_items]; ``neighbours``: ``text_neighbours(items)``
        when already computed."""
        w = self.cfg.cold if weights is None else weights
        out = torch.full((z["retriever"].shape[0], len(items)), float(w.get("offset", 0.0)))
        for name in ("retriever", "text"):
            if w.get(name, 0.0) and name in z:
                out += w[name] * z[name][:, items]
        if w.get("neighbours", 0.0):
            nb = neighbours if neighbours is not None else self.text_neighbours(items)
            if nb is not None:  # at least as relevant as its nearest catalog items by LLM text
                out = torch.maximum(out, (warm[:, nb[0]] * nb[1]).sum(-1))
        return out

    def scores(self, retriever: torch.Tensor, histories: Sequence[np.ndarray],
               live: Optional[sp.csr_matrix] = None, items: Optional[np.ndarray] = None,
               ref: Optional[np.ndarray] = None, stats: Optional[Dict[str, tuple]] = None) -> tuple[torch.Tensor, Dict]:
        """(fused scores [B, num_items], per-channel z-scores) with the fitted weights; items
        without interactions by the fitted ``cold`` weights. ``items``/``ref``: only those items,
        as in ``channel_scores``; a cold item's text neighbours count only when they are among them."""
        z = self.channel_scores(retriever, histories, live=live, items=items, ref=ref, stats=stats)
        fused = self.fuse(z)
        mask = self.cold_mask(live)
        if items is None:
            cold = torch.as_tensor(np.flatnonzero(mask))
            if len(cold):
                fused[:, cold] = self.fuse_cold(z, cold, fused)
            return fused, z
        pos = np.flatnonzero(mask[items])
        if len(pos):
            nb = self.text_neighbours(torch.as_tensor(items[pos]))
            if nb is not None:  # neighbours' codes -> their places among ``items`` (absent: weight 0)
                at = np.clip(np.searchsorted(items, nb[0].numpy()), 0, len(items) - 1)
                found = torch.as_tensor(items[at] == nb[0].numpy())
                nb = (torch.as_tensor(at), nb[1] * found)
            fused[:, torch.as_tensor(pos)] = self.fuse_cold(z, torch.as_tensor(pos), fused, neighbours=nb)
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
            alone = [c for c in names if getattr(BY_NAME[c], "fallback_start", False)]
            starts = [{"retriever": 1.0, **{c: 0.0 for c in names}},
                      {"retriever": 0.0, **{c: (1.0 if c in alone else 0.0) for c in names}}]
            for w in starts:
                v = objective(self.fuse(z, w))
                for _ in range(rounds):
                    for c in names if w["retriever"] else [c for c in names if c not in alone]:
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

    def fit_cold(self, z: Dict[str, torch.Tensor], objective: Callable[[torch.Tensor], float],
                 rounds: int = 2) -> Dict[str, object]:
        """Coordinate ascent over ``COLD_GRID`` for the items without interactions (``cold_mask``),
        the other items fused with the fitted weights, to maximise ``objective(fused scores)``
        (valid NDCG@10 where the newest items were made new: ``ranking.fit_channels``). Sets and
        returns the cold weights."""
        items = torch.as_tensor(np.flatnonzero(self.cold_mask()))
        warm = self.fuse(z)
        neighbours = self.text_neighbours(items)

        def value(w: Dict[str, float]) -> float:
            fused = warm.clone()
            fused[:, items] = self.fuse_cold(z, items, warm, w, neighbours)
            return objective(fused)

        w = dict(self.cfg.cold)
        v = value(w)
        for _ in range(rounds):
            for name, grid in COLD_GRID.items():
                if name != "offset" and name not in z:
                    continue
                for g in grid:
                    s = value({**w, name: g})
                    if s > v + 1e-9:
                        v, w = s, {**w, name: g}
        self.cfg.cold = w
        return {"cold": w, "valid_ndcg@10_cold": v, "cold_items": int(len(items))}

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
    out = ", ".join(f"{c} {w[c]:g}" for c in CHANNELS if c in w) + f"; co-visit decay {fit['decay']:g}"
    if "cold" in fit:
        out += "; new items " + ", ".join(f"{c} {v:g}" for c, v in fit["cold"].items())
    return out


def channel_names(z: Dict[str, torch.Tensor]) -> List[str]:
    return [c for c in CHANNELS if c in z]
