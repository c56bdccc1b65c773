"""Non-neural baselines on the same split: MostPopular and ItemKNN (item-item cosine)."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from components.models.channels import covisitation


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
    (shrunk by ``shrink``) keeping the ``neighbors`` most similar items per item. The same
    matrix is the recommender's co-visitation channel (``components.models.channels``)."""

    def __init__(self, train_histories: Sequence[np.ndarray], num_items: int, neighbors: int = 100,
                 shrink: float = 10.0):
        self.sim = covisitation(train_histories, num_items, neighbors, shrink)

    def scores(self, histories: List[np.ndarray]) -> torch.Tensor:
        x = sp.csr_matrix((len(histories), self.sim.shape[0]), dtype=np.float32).tolil()
        for r, h in enumerate(histories):
            if len(h):
                x[r, np.unique(np.asarray(h))] = 1.0
        return torch.as_tensor((x.tocsr() @ self.sim).toarray(), dtype=torch.float32)
