"""What a candidate channel declares (see components.models.channels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch

if TYPE_CHECKING:
    from components.models.channels.fusion import Channels


@dataclass
class Query:
    """What every channel scores from: a batch of users' histories (0-based item codes, most
    recent last), the retriever's raw scores <u, i> [B, num_items], the co-visitation decay to use
    (None: the fitted one) and the similarities live events added (``live_similarity``)."""

    histories: Sequence[np.ndarray]
    retriever: torch.Tensor
    decay: Optional[float] = None
    live: Optional[sp.csr_matrix] = None
    # The items scored (sorted 0-based codes; ``retriever`` is then [B, len(items)]), None: the
    # whole catalog. Serving a large catalog scores only a candidate pool (serve/retrieval.py).
    items: Optional[np.ndarray] = None
    # With ``items``: each channel's mean and spread over the whole catalog per user ([B] each),
    # which standardise its scores as scoring every item would. The caller puts the retriever's;
    # a channel that can compute its own exactly (from catalog moments or a sparse row) adds it.
    stats: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None

    def columns(self, x):
        """``x`` [B, num_items] (dense or sparse) restricted to the scored items."""
        return x if self.items is None else x[:, self.items]


class Channel:
    """One source of candidates. A channel module defines a subclass and one instance, ``CHANNEL``,
    listed in ``components.models.channels.registry.REGISTRY``.

    name             the channel's name in the fused scores and the name of its fusion weight
    fit_order        its place in the coordinate ascent that fits the fusion weights on valid
    default_weight   its weight before fitting
    scores           its scores over the catalog (or the query's ``items``) for a batch of users,
                     offline and in serving alike (None: the channel has nothing to say, e.g. no
                     text embeddings)
    cold_items       items this channel has no evidence for (a bool mask, or None), whose score
                     is taken from the ``cold_fallback`` channel instead of read as "irrelevant"
    The live update of a channel (events between retrains) is declared in its module next to it:
    see ``covisit.LiveCovisitation`` and ``covisit.live_similarity``.
    """

    name: str = ""
    fit_order: int = 100
    default_weight: float = 0.0
    cold_fallback: Optional[str] = None

    def scores(self, ch: "Channels", q: Query) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def cold_items(self, ch: "Channels", q: Query) -> Optional[np.ndarray]:
        return None


class Moments:
    """Sum and outer-product sum of a catalog's vectors, kept through row changes: the mean and
    the (unbiased) spread of ``<q, x_i>`` over every item, for any query ``q``, in O(d^2)."""

    def __init__(self, x: np.ndarray, chunk: int = 65536):
        self.n = len(x)
        self.s1 = np.zeros(x.shape[1], np.float64)
        self.s2 = np.zeros((x.shape[1], x.shape[1]), np.float64)
        for a in range(0, self.n, chunk):  # float32 BLAS per chunk, accumulated in float64; no
            c = np.asarray(x[a:a + chunk], dtype=np.float32)  # float32 copy of a float16 table
            self.s1 += c.sum(0, dtype=np.float64)
            self.s2 += c.T @ c
        self._cov: Optional[Tuple[np.ndarray, np.ndarray]] = None  # (mean, covariance), until a row changes

    def replace(self, old: np.ndarray, new: np.ndarray) -> None:
        old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
        self.s1 += new - old
        self.s2 += np.outer(new, new) - np.outer(old, old)
        self._cov = None

    def grow(self, k: int) -> None:
        """``k`` zero rows (items added without a vector yet)."""
        self.n += k
        self._cov = None

    def of(self, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of ``q @ x_i`` over the rows, per query [B] each."""
        if self._cov is None:  # per request in serving: O(d^2) once per catalog change, not per call
            mu = self.s1 / self.n
            self._cov = (mu, (self.s2 - self.n * np.outer(mu, mu)) / max(1, self.n - 1))
        mu, cov = self._cov
        qd = q.double().numpy()
        var = np.maximum(((qd @ cov) * qd).sum(1), 0.0)
        return torch.as_tensor(qd @ mu, dtype=torch.float32), torch.as_tensor(np.sqrt(var), dtype=torch.float32)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit-length rows: ``x`` itself when they already are (zero rows allowed, e.g.
    items without text), so the holders of a catalog's LLM vectors share one tensor instead of
    a normalised copy each (1.5 GB at 10^6 items of 384 floats)."""
    x = x.float()
    norms = x.norm(dim=1)
    if bool(((norms - 1).abs() < 1e-4).logical_or(norms == 0).all()):
        return x
    return torch.nn.functional.normalize(x, dim=1)
