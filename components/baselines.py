"""Non-neural baselines on the same split: MostPopular and ItemKNN (item-item cosine)."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import scipy.sparse as sp
import torch


def item_counts(histories: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    return np.bincount(np.concatenate(histories) if len(histories) else np.empty(0, np.int64),
                       minlength=num_items).astype(np.float64)


class MostPopular:
    def __init__(self, train_histories: Sequence[np.ndarray], num_items: int):
        self.counts = torch.as_tensor(item_counts(train_histories, num_items), dtype=torch.float32)

    def scores(self, histories: List[np.ndarray]) -> torch.Tensor:
        return self.counts.expand(len(histories), -1).clone()


class ItemKNN:
    """score(u, i) = sum over history items j of cos(j, i), with cosine over user co-occurrence
    (shrunk by ``shrink``) keeping the ``neighbors`` most similar items per item."""

    def __init__(self, train_histories: Sequence[np.ndarray], num_items: int, neighbors: int = 100,
                 shrink: float = 10.0):
        rows = np.concatenate([np.full(len(h), u) for u, h in enumerate(train_histories)])
        cols = np.concatenate(train_histories)
        m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                          shape=(len(train_histories), num_items))
        m.data[:] = 1.0  # binary
        co = (m.T @ m).toarray()
        norms = np.sqrt(np.diag(co))
        sim = co / (np.outer(norms, norms) + shrink + 1e-9)
        np.fill_diagonal(sim, 0.0)
        if neighbors < num_items:
            thresh = -np.partition(-sim, neighbors - 1, axis=1)[:, neighbors - 1:neighbors]
            sim = np.where(sim >= thresh, sim, 0.0)
        self.sim = torch.as_tensor(sim, dtype=torch.float32)

    def scores(self, histories: List[np.ndarray]) -> torch.Tensor:
        x = torch.zeros(len(histories), self.sim.shape[0])
        for r, h in enumerate(histories):
            if len(h):
                x[r, torch.as_tensor(np.asarray(h), dtype=torch.long)] = 1.0
        return x @ self.sim
