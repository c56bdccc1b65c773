"""Relevance ranker: an MLP that re-scores the fused candidates of every channel.

Features per (user, candidate): user vector, item vector, their product, the fused channel score
and its rank, each channel's z-score (sequence retriever, co-visitation, LLM text similarity to
the user's recent items), item popularity and recency as of the list's cut-off (the user's last
event: nothing later is counted), category overlap with the user's recent history, and the
user's last event type. Trained listwise (softmax over the candidate list).

The MLP is a residual on the fused order: score = standardised fused score + MLP(...), with the
MLP's output layer starting at zero. An untrained ranker therefore keeps the fused order exactly,
and training (with the epoch picked on held-out lists, the untrained state included) can only
move away from it where that helps on data the ranker did not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from components.data.schemas import EVENT_TYPES

DAY_MS = 86_400_000.0
# The channels whose z-scores are ranker features (components.models.channels): part of the
# ranker's input shape, so a new channel joins them only with a ranker retrained for it.
CHANNEL_FEATURES = ("retriever", "covisit", "text")
# fused score, rank, the channel z-scores, popularity and recency as of the list's cut-off,
# category overlap, last event type.
NUM_CONTEXT = 2 + len(CHANNEL_FEATURES) + 3 + len(EVENT_TYPES)
POP = 2 + len(CHANNEL_FEATURES)  # the column of popularity (then recency, category overlap, last event)


@dataclass
class RankerConfig:
    dim: int = 64  # retriever vector size (set from the retriever)
    hidden: int = 128
    dropout: float = 0.2
    candidates: int = 100
    # Fuse the co-visitation, LLM-text and popularity channels with the retriever (weights fitted
    # on valid; components.models.channels) to choose and feature the candidates; false: retriever only.
    channels: bool = True
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    # Share of ranker-training users held out to pick the epoch (early stopping).
    holdout: float = 0.2


def holdout_rows(rows: np.ndarray, fraction: float) -> np.ndarray:
    """The valid-list rows held out from ranker training (a fixed hash of the row, so the
    training job and the evaluation pick the same ones)."""
    rows = np.asarray(rows, dtype=np.int64)
    return rows[(rows * 2654435761 % 1000) < fraction * 1000]


class RankerMLP(nn.Module):
    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(
            nn.Linear(3 * cfg.dim + NUM_CONTEXT, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden // 2), nn.GELU(), nn.Linear(cfg.hidden // 2, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, u: torch.Tensor, i: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """u [B, d], i [B, C, d], ctx [B, C, NUM_CONTEXT] -> scores [B, C] (ctx[..., 0] is the
        standardised retrieval score: the residual's starting point)."""
        uu = u.unsqueeze(1).expand_as(i)
        return ctx[..., 0] + self.net(torch.cat([uu, i, uu * i, ctx], -1)).squeeze(-1)


@dataclass
class ItemStats:
    """Per-item facts the context features use (0-based item codes).

    Interaction times are kept per item (sorted), so popularity and recency are computed as of
    each list's cut-off (the user's last event): a feature never counts interactions that
    happened after the moment the recommendation is made. Items past ``num_known`` (added at
    serving) have no interactions."""

    keys: np.ndarray  # item * KEY + ts, sorted: every training interaction
    num_known: int
    categories: torch.Tensor  # [num_items, num_categories] multi-hot (L2-normalised rows)

    @property
    def log_pop(self) -> np.ndarray:
        """log1p(all training interactions) per known item (cold start, popularity channel)."""
        items = self.keys // KEY
        return np.log1p(np.bincount(items, minlength=self.num_known)).astype(np.float64)

    def as_of(self, cand: np.ndarray, now: int) -> tuple[np.ndarray, np.ndarray]:
        """(interactions with ``cand`` at or before ``now``, the last one's time or 0)."""
        cand = np.asarray(cand, dtype=np.int64)
        known = cand < self.num_known
        c = np.where(known, cand, 0)
        lo = np.searchsorted(self.keys, c * KEY, "left")
        hi = np.searchsorted(self.keys, c * KEY + min(max(int(now), 0), KEY - 1), "right")
        count = np.where(known, hi - lo, 0)
        last = np.where(count > 0, self.keys[np.maximum(hi - 1, 0)] - c * KEY, 0)
        return count, last


KEY = 1 << 42  # > any epoch-ms timestamp until the year 2109


def item_stats(histories: Sequence[np.ndarray], ts: Sequence[np.ndarray], categories: List[List[str]]) -> ItemStats:
    n = len(categories)
    flat = np.concatenate(histories).astype(np.int64) if len(histories) else np.empty(0, np.int64)
    flat_ts = np.concatenate(ts).astype(np.int64) if len(ts) else np.empty(0, np.int64)
    keys = np.sort(flat * KEY + np.clip(flat_ts, 0, KEY - 1))
    names = sorted({c for cats in categories for c in cats})
    col = {c: k for k, c in enumerate(names)}
    mh = torch.zeros(n, max(len(names), 1))
    for r, cats in enumerate(categories):
        for c in cats:
            mh[r, col[c]] = 1.0
    return ItemStats(keys, n, F.normalize(mh, dim=1))


def context_features(stats: ItemStats, cand: np.ndarray, scores: np.ndarray, hist_items: Sequence[np.ndarray],
                     hist_ts: Sequence[np.ndarray], hist_events: Sequence[np.ndarray],
                     channels: Optional[Dict[str, np.ndarray]] = None) -> torch.Tensor:
    """[B, C, NUM_CONTEXT] features for candidates ``cand`` [B, C] with fused ``scores`` and
    each channel's z-score (``channels``: name -> [B, C]; a missing channel is 0)."""
    B, C = cand.shape
    ctx = torch.zeros(B, C, NUM_CONTEXT)
    s = torch.as_tensor(scores, dtype=torch.float32)
    ctx[..., 0] = (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)
    ctx[..., 1] = 1.0 / torch.log2(torch.arange(C, dtype=torch.float32) + 2.0)
    for k, name in enumerate(CHANNEL_FEATURES):
        if channels is not None and name in channels:
            ctx[..., 2 + k] = torch.as_tensor(np.asarray(channels[name]), dtype=torch.float32).clamp(-10, 10) / 3.0
    for b in range(B):
        items, ts, ev = hist_items[b], hist_ts[b], hist_events[b]
        now = int(ts[-1]) if len(ts) else 0
        count, last = stats.as_of(cand[b], now)
        ctx[b, :, POP] = torch.as_tensor(np.log1p(count) / 5.0, dtype=torch.float32)
        age = np.where(count > 0, np.maximum(0, now - last) / DAY_MS, 1e4)
        ctx[b, :, POP + 1] = torch.as_tensor(np.log1p(age) / 5.0, dtype=torch.float32)
        recent = torch.as_tensor(np.asarray(items[-50:], dtype=np.int64))
        if len(recent):
            prof = F.normalize(stats.categories[recent].mean(0), dim=0)
            ctx[b, :, POP + 2] = stats.categories[torch.as_tensor(cand[b])] @ prof
        if len(ev):
            ctx[b, :, POP + 3 + int(ev[-1])] = 1.0
    return ctx


def listwise_loss(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each candidate list; ``positive`` is the index of the target."""
    return F.cross_entropy(scores, positive)
