"""Popularity as a channel: log1p of each item's training interactions (0 for items added later)."""

from __future__ import annotations

import torch

from components.models.channels.base import Channel, Query


class PopularityChannel(Channel):
    name = "popularity"
    fit_order = 3

    def scores(self, ch, q: Query):
        if q.items is not None and q.stats is not None:
            mean, std = ch.popularity_stats()
            q.stats[self.name] = (torch.full((len(q.histories),), mean), torch.full((len(q.histories),), std))
        return torch.as_tensor(q.columns(ch.log_pop[None])).expand(len(q.histories), -1)


CHANNEL = PopularityChannel()
