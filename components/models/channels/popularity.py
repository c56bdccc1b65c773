"""Popularity as a channel: log1p of each item's training interactions (0 for items added later)."""

from __future__ import annotations

import torch

from components.models.channels.base import Channel, Query


class PopularityChannel(Channel):
    name = "popularity"
    fit_order = 3

    def scores(self, ch, q: Query):
        return torch.as_tensor(ch.log_pop)[None].expand(len(q.histories), -1)


CHANNEL = PopularityChannel()
