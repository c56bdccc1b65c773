"""Popularity as a channel: log1p of each item's training interactions (0 for items added later)."""

from __future__ import annotations

import numpy as np
import torch

from components.models.channels.base import Channel, Query


class PopularityChannel(Channel):
    name = "popularity"
    fit_order = 3

    def scores(self, ch, q: Query):
        if q.items is not None and q.stats is not None:
            x = ch.log_pop.astype(np.float64)
            b = len(q.histories)
            q.stats[self.name] = (torch.full((b,), float(x.mean())), torch.full((b,), float(x.std(ddof=1))))
        return torch.as_tensor(q.columns(ch.log_pop[None])).expand(len(q.histories), -1)


CHANNEL = PopularityChannel()
