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
        k, table = ch.cfg.text_recent, ch.text
        prof = torch.zeros(len(q.histories), table.shape[1])
        for r, h in enumerate(q.histories):
            h = np.asarray(h, dtype=np.int64)[-k:]
            h = h[(h >= 0) & (h < len(table))]
            if len(h):
                prof[r] = F.normalize(table[torch.as_tensor(h)].float().mean(0), dim=0)
        if q.stats is not None and q.items is not None:
            q.stats[self.name] = ch.text_moments().of(prof)
        if q.items is None:  # the whole catalog in the table's precision (serving may keep it in
            return (prof.to(table.dtype) @ table.T).float()  # float16: half the memory traffic)
        # a pool (serving's ANN path): its rows gathered (index_select: ~4x faster than advanced
        # indexing) and scored in float32, which CPUs compute natively
        return prof @ table.index_select(0, torch.as_tensor(q.items, dtype=torch.long)).float().T


CHANNEL = TextChannel()
