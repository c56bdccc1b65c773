"""What a candidate channel declares (see components.models.channels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

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


class Channel:
    """One source of candidates. A channel module defines a subclass and one instance, ``CHANNEL``,
    listed in ``components.models.channels.registry.REGISTRY``.

    name             the channel's name in the fused scores and the name of its fusion weight
    fit_order        its place in the coordinate ascent that fits the fusion weights on valid
    default_weight   its weight before fitting
    scores           its scores over the catalog for a batch of users, offline and in serving
                     alike (None: the channel has nothing to say, e.g. no text embeddings)
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
