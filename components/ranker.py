"""Relevance ranker: an MLP that re-scores the retriever's top candidates.

Features per (user, candidate): user vector, item vector, their product, retrieval score and
rank, item popularity, recency (time since the item's last interaction, seen from the user's
last event), category overlap with the user's recent history, LLM text similarity to the
user's recent items, and the user's last event type. Trained listwise (softmax over the
candidate list) on the retriever's hard negatives.

The MLP is a residual on the retrieval order: score = standardised retrieval score + MLP(...),
with the MLP's output layer starting at zero. An untrained ranker therefore keeps the
retriever's order exactly, and training (with the epoch picked on held-out lists, the untrained
state included) can only move away from it where that helps on data the ranker did not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from components.schemas import EVENT_TYPES

DAY_MS = 86_400_000.0
NUM_CONTEXT = 6 + len(EVENT_TYPES)


@dataclass
class RankerConfig:
    dim: int = 64  # retriever vector size (set from the retriever)
    hidden: int = 128
    dropout: float = 0.2
    candidates: int = 100
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    # Share of ranker-training users held out to pick the epoch (early stopping).
    holdout: float = 0.2


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
    """Per-item facts the context features use (0-based item codes)."""

    log_pop: np.ndarray  # log1p(train interactions)
    last_ts: np.ndarray  # last train interaction, epoch ms (0 when none)
    categories: torch.Tensor  # [num_items, num_categories] multi-hot (L2-normalised rows)
    text: Optional[torch.Tensor]  # [num_items, text_dim] LLM embeddings (normalised) or None


def item_stats(histories: Sequence[np.ndarray], ts: Sequence[np.ndarray], categories: List[List[str]],
               text: Optional[torch.Tensor]) -> ItemStats:
    n = len(categories)
    flat = np.concatenate(histories) if len(histories) else np.empty(0, np.int64)
    flat_ts = np.concatenate(ts) if len(ts) else np.empty(0, np.int64)
    counts = np.bincount(flat, minlength=n)
    last = np.zeros(n, dtype=np.int64)
    np.maximum.at(last, flat, flat_ts)
    names = sorted({c for cats in categories for c in cats})
    col = {c: k for k, c in enumerate(names)}
    mh = torch.zeros(n, max(len(names), 1))
    for r, cats in enumerate(categories):
        for c in cats:
            mh[r, col[c]] = 1.0
    return ItemStats(np.log1p(counts), last, F.normalize(mh, dim=1),
                     F.normalize(text, dim=1) if text is not None else None)


def context_features(stats: ItemStats, cand: np.ndarray, scores: np.ndarray, hist_items: Sequence[np.ndarray],
                     hist_ts: Sequence[np.ndarray], hist_events: Sequence[np.ndarray]) -> torch.Tensor:
    """[B, C, NUM_CONTEXT] features for candidates ``cand`` [B, C] with retrieval ``scores``."""
    B, C = cand.shape
    ctx = torch.zeros(B, C, NUM_CONTEXT)
    s = torch.as_tensor(scores, dtype=torch.float32)
    ctx[..., 0] = (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)
    ctx[..., 1] = 1.0 / torch.log2(torch.arange(C, dtype=torch.float32) + 2.0)
    ctx[..., 2] = torch.as_tensor(stats.log_pop[cand], dtype=torch.float32) / 5.0
    for b in range(B):
        items, ts, ev = hist_items[b], hist_ts[b], hist_events[b]
        now = ts[-1] if len(ts) else 0
        age = np.maximum(0, now - stats.last_ts[cand[b]]) / DAY_MS
        ctx[b, :, 3] = torch.as_tensor(np.log1p(age) / 5.0, dtype=torch.float32)
        recent = torch.as_tensor(np.asarray(items[-50:], dtype=np.int64))
        if len(recent):
            prof = F.normalize(stats.categories[recent].mean(0), dim=0)
            ctx[b, :, 4] = stats.categories[torch.as_tensor(cand[b])] @ prof
            if stats.text is not None:
                tprof = F.normalize(stats.text[recent[-5:]].mean(0), dim=0)
                ctx[b, :, 5] = stats.text[torch.as_tensor(cand[b])] @ tprof
        if len(ev):
            ctx[b, :, 6 + int(ev[-1])] = 1.0
    return ctx


def listwise_loss(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each candidate list; ``positive`` is the index of the target."""
    return F.cross_entropy(scores, positive)
