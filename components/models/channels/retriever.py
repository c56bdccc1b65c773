"""The sequence retriever as a channel: <u, i> of the user and item vectors (the caller computes
it: it owns the user vector). Always on, weight 1 (or 0 when co-visitation alone wins on valid)."""

from __future__ import annotations

from components.models.channels.base import Channel, Query


class RetrieverChannel(Channel):
    name = "retriever"
    fit_order = 0
    default_weight = 1.0

    def scores(self, ch, q: Query):
        return q.retriever.float()


CHANNEL = RetrieverChannel()
