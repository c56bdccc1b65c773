"""LLM text similarity as a channel: each item's text vector against the mean of the user's last
``text_recent`` items' vectors. The only channel that reaches an item nobody has interacted with
yet (an item added through the API); the co-visitation channel falls back to it for such items."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from components.models.channels.base import Channel, Query


class TextChannel(Channel):
    name = "text"
    fit_order = 2

    def scores(self, ch, q: Query):
        if ch.text is None:
            return None
        k = ch.cfg.text_recent
        prof = torch.zeros(len(q.histories), ch.text.shape[1])
        for r, h in enumerate(q.histories):
            h = np.asarray(h, dtype=np.int64)[-k:]
            h = h[(h >= 0) & (h < len(ch.text))]
            if len(h):
                prof[r] = F.normalize(ch.text[torch.as_tensor(h)].mean(0), dim=0)
        if q.items is None:
            return prof @ ch.text.T
        if q.stats is not None:
            q.stats[self.name] = ch.text_moments().of(prof)
        return prof @ ch.text[torch.as_tensor(q.items)].T


CHANNEL = TextChannel()
